"""Loading: tokenizer, base model (full precision or 4-bit), and the LoRA adapter on top."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import QwentuneError
from .recipe import Recipe
from .tokens import patch_output_bias

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Precision:
    """What the trainer runs in: the weights' dtype and the autocast flags for TrainingArguments."""

    weights: torch.dtype
    bf16: bool
    fp16: bool

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


def resolve_precision(recipe: Recipe) -> Precision:
    """`training.precision: auto` is bf16 on a GPU that has it, else fp32 (CPU runs opt into bf16 explicitly)."""
    wanted = recipe.training.precision
    if wanted == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        wanted = "bf16" if cuda_bf16 else "fp16" if torch.cuda.is_available() else "fp32"
    if recipe.model.dtype != "auto":
        weights = _DTYPES[recipe.model.dtype]
    else:
        weights = {"bf16": torch.bfloat16, "fp16": torch.float32, "fp32": torch.float32}[wanted]
    return Precision(weights=weights, bf16=wanted == "bf16", fp16=wanted == "fp16")


def load_tokenizer(model_path: Path, recipe: Recipe):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
    )
    if tokenizer.pad_token is None:
        # Qwen tokenizers pad with <|endoftext|>; never pad with <|im_end|>, which is trained.
        tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def device_for_this_process() -> str | int:
    """Each process puts its (4-bit) model on its own GPU; a shared device_map="auto" would pile them onto GPU 0."""
    if torch.cuda.is_available():
        return int(os.environ.get("LOCAL_RANK", 0))
    return "cpu"


def quantization_config(recipe: Recipe):
    from transformers import BitsAndBytesConfig

    q = recipe.peft.quant
    compute = _DTYPES[q.compute_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,  # lets FSDP shard the packed 4-bit weights alongside the bf16 ones
    )


def load_base_model(recipe: Recipe, model_path: Path, precision: Precision | None = None):
    """The frozen base: in the precision's dtype for LoRA, or bitsandbytes 4-bit for QLoRA."""
    from transformers import AutoConfig, AutoModelForCausalLM

    precision = precision or resolve_precision(recipe)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=recipe.model.trust_remote_code)
    kwargs = dict(
        revision=recipe.model.revision,
        trust_remote_code=recipe.model.trust_remote_code,
        attn_implementation=recipe.model.attn_implementation,
        use_safetensors=True,
    )
    if recipe.peft.method == "qlora":
        kwargs.update(quantization_config=quantization_config(recipe), device_map={"": device_for_this_process()})
        kwargs["dtype"] = _DTYPES[recipe.peft.quant.compute_dtype]
    else:
        kwargs["dtype"] = precision.weights
    if config.model_type == "qwen2_vl":
        from transformers import Qwen2VLForConditionalGeneration

        model = Qwen2VLForConditionalGeneration.from_pretrained(model_path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.config.use_cache = False
    if recipe.peft.method == "qlora":
        keep_4bit_layers_differentiable(model)
    return model


def keep_4bit_layers_differentiable(model) -> None:
    """bitsandbytes (0.50) on a CPU with AVX512-BF16 repacks a Linear4bit's weight for a bf16 inference kernel the
    first time the layer runs in eval mode without grad (an evaluation before training; precomputed DPO reference
    log-probs) and uses that kernel from then on, in training too. It has no autograd: no gradient flows back through
    the frozen 4-bit layers any more (torch only warns), and it asserts on widths that are not a multiple of 32.
    Keep every 4-bit layer on the dequantize + matmul path, in eval as in training."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_config(recipe: Recipe, model, trainable_token_ids: list[int] | None = None):
    from peft import LoraConfig

    p = recipe.peft
    targets: str | list[str] = "all-linear" if p.target_modules == ["all-linear"] else list(p.target_modules)
    if targets == "all-linear" and getattr(model.config, "model_type", "") == "qwen2_vl":
        # Language-model linears only: the vision tower (qkv, proj, fc1, fc2, merger) stays frozen.
        targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    token_indices = None
    whole = [layer for layer in ("embed_tokens", "lm_head") if layer in p.modules_to_save]  # trained in full
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    if trainable_token_ids and not (whole and tied):
        # Both layers, always, with the same ids: on a tied model PEFT ties one token adapter to both, untied each
        # gets its own rows, so nothing hangs on reading the tie from a config (Qwen2-VL's text_config has none).
        # A layer in modules_to_save already trains every row (PEFT refuses both on one layer, or on a tied pair).
        token_indices = {
            layer: list(trainable_token_ids) for layer in ("embed_tokens", "lm_head") if layer not in whole
        }
    return LoraConfig(
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=targets,
        use_rslora=p.use_rslora,
        use_dora=p.use_dora,
        modules_to_save=list(p.modules_to_save) or None,
        trainable_token_indices=token_indices,
        task_type="CAUSAL_LM",
    )


def _prepare_for_adapter(recipe: Recipe, model):
    """k-bit preparation (QLoRA) and non-reentrant gradient checkpointing, before PEFT wraps the model."""
    from peft import prepare_model_for_kbit_training

    gc_kwargs = {"use_reentrant": False}
    if recipe.peft.method == "qlora":
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.training.gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs,
        )
    if recipe.training.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.20 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    return model


def add_adapter(recipe: Recipe, model, trainable_token_ids: list[int] | None = None):
    """Wrap the base in a PEFT LoRA model (QLoRA: after k-bit preparation)."""
    from peft import get_peft_model

    model = _prepare_for_adapter(recipe, model)
    peft_model = get_peft_model(model, lora_config(recipe, model, trainable_token_ids))
    patch_output_bias(peft_model)
    return peft_model


def load_adapter_for_training(recipe: Recipe, model, adapter_dir: Path):
    """Continue training an existing adapter (e.g. DPO after SFT), prepared exactly like a fresh one."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise QwentuneError("not an adapter dir (no adapter_config.json)", where=str(adapter_dir))
    model = _prepare_for_adapter(recipe, model)
    peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    patch_output_bias(peft_model)
    return peft_model
