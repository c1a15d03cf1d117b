"""Loading: tokenizer, base model (full precision or 4-bit), and the LoRA adapter on top."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import QwentuneError, read_json_file
from ..recipe import ModelSection, PeftSection, TrainingSection
from .shapes import is_vl, quant_skip_modules

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Qwen2-VL's vision side by `peft.train_vision` (PEFT matches the whole module name): the merger MLP's two linears
# (mlp.1 is its GELU); "all" adds every vision block's attention and MLP linears.
_MERGER = r"visual\.merger\.mlp\.(?:0|2)"
VISION_TARGETS = {
    "off": None,
    "merger": rf".*{_MERGER}",
    "all": rf".*(?:{_MERGER}|visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2)))",
}
# QLoRA on Qwen2-VL quantizes the language model only: the output layer and the whole vision tower stay unquantized.


@dataclass
class Precision:
    """What the trainer runs in: the weights' dtype and the autocast flags for TrainingArguments."""

    weights: torch.dtype
    bf16: bool
    fp16: bool

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    @property
    def autocast(self) -> bool:
        """Whether the trainer runs the forward under bf16/fp16 autocast."""
        return self.bf16 or self.fp16


def resolve_precision(model: ModelSection, training: TrainingSection) -> Precision:
    """`training.precision: auto` is bf16 on a GPU that has it, else fp32 (CPU runs opt into bf16 explicitly)."""
    wanted = training.precision
    if wanted == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        wanted = "bf16" if cuda_bf16 else "fp16" if torch.cuda.is_available() else "fp32"
    if model.dtype != "auto":
        weights = _DTYPES[model.dtype]
    else:
        weights = {"bf16": torch.bfloat16, "fp16": torch.float32, "fp32": torch.float32}[wanted]
    return Precision(weights=weights, bf16=wanted == "bf16", fp16=wanted == "fp16")


# The small JSON files of a model dir, checked before transformers reads them (its errors name no line).
MODEL_JSON_FILES = ("config.json", "tokenizer_config.json", "generation_config.json", "preprocessor_config.json")


def check_model_files(model_path: Path) -> None:
    """A QwentuneError naming the file and line when a JSON file of a local model dir is damaged."""
    for name in MODEL_JSON_FILES:
        if (Path(model_path) / name).is_file():
            read_json_file(Path(model_path) / name, hint="the model dir is damaged: download or save it again")


def load_tokenizer(model_path: Path, model: ModelSection):
    from transformers import AutoTokenizer

    check_model_files(model_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as e:  # a dir without (readable) tokenizer files: transformers' words are clear
        raise QwentuneError(
            f"cannot load the tokenizer: {str(e).splitlines()[0]}", where=str(model_path), hint="check the model dir"
        ) from None
    if tokenizer.pad_token is None:
        # Qwen tokenizers pad with <|endoftext|>; never pad with <|im_end|>, which is trained.
        tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def device_for_this_process() -> str | int:
    """Each process puts its (4-bit) model on its own GPU; a shared device_map="auto" would pile them onto GPU 0."""
    if torch.cuda.is_available():
        return int(os.environ.get("LOCAL_RANK", 0))
    return "cpu"


def quantization_config(quant, model_type: str = "qwen2"):
    """`quant` (an `export.QuantSpec`) as the BitsAndBytesConfig qwentune loads a QLoRA base with."""
    return quant.bnb_config(quant_skip_modules(model_type))


def load_base_model(
    model: ModelSection, model_path: Path, precision: Precision, *, quant=None, train_vision: str = "off"
):
    """The frozen base: in the precision's dtype for LoRA, or bitsandbytes 4-bit for QLoRA (`quant`, an
    `export.QuantSpec`; passed in rather than built here, since export sits above this floor)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=model.trust_remote_code)
    check_train_vision(train_vision, config.model_type, where=str(model_path))
    kwargs = dict(
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
        attn_implementation=model.attn_implementation,
        use_safetensors=True,
    )
    if quant is not None:
        kwargs.update(
            quantization_config=quantization_config(quant, config.model_type),
            device_map={"": device_for_this_process()},
        )
        kwargs["dtype"] = quant.compute_torch_dtype
    else:
        kwargs["dtype"] = precision.weights
    if is_vl(config):
        from transformers import Qwen2VLForConditionalGeneration

        base = Qwen2VLForConditionalGeneration.from_pretrained(model_path, **kwargs)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    base.config.use_cache = False
    if quant is not None:
        keep_4bit_layers_differentiable(base)
    return base


def keep_4bit_layers_differentiable(model) -> None:
    """bitsandbytes (0.50) on a CPU with AVX512-BF16 repacks a Linear4bit's weight for a bf16 inference kernel the
    first time the layer runs in eval mode without grad (an evaluation before training; precomputed DPO reference
    log-probs) and uses that kernel from then on, in training too. It has no autograd: no gradient flows back through
    the frozen 4-bit layers any more (torch only warns), and it asserts on widths that are not a multiple of 32.
    Keep every 4-bit layer on the dequantize + matmul path, in eval as in training."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def check_train_vision(train_vision: str, model_type: str, where: str = "recipe") -> None:
    """`peft.train_vision` other than off needs a vision tower: refused on a text model rather than ignored."""
    if train_vision != "off" and not is_vl(model_type):
        raise QwentuneError(
            f"'peft.train_vision' is {train_vision!r} but the model ({model_type}) has no vision tower",
            where=where,
            hint="set peft.train_vision: off (it applies to Qwen2-VL models only)",
        )


def _vision_tower(model):
    """Qwen2-VL's `visual` (vision blocks + merger), under `model.model` in the transformers-5 layout."""
    tower = getattr(getattr(model, "model", None), "visual", None)
    return tower if tower is not None else getattr(model, "visual", None)


def lora_targets(p: PeftSection, model) -> str | list[str]:
    """PEFT `target_modules`. Qwen2-VL: a regex for the language model's linears (all of them, or the listed leaf
    names), plus the vision side that `peft.train_vision` asks for; text models: the recipe's list as it is."""
    all_linear = p.target_modules == ["all-linear"]
    if not is_vl(model):
        check_train_vision(p.train_vision, getattr(model.config, "model_type", "?"))
        return "all-linear" if all_linear else list(p.target_modules)
    if all_linear:
        language = rf".*language_model.*\.({'|'.join(LM_LINEARS)})"
    else:
        tower = _vision_tower(model)
        vision_names = {name.rsplit(".", 1)[-1] for name, _ in tower.named_modules()} if tower is not None else set()
        clash = sorted(set(p.target_modules) & (vision_names - set(LM_LINEARS)))
        if clash:
            raise QwentuneError(
                f"'peft.target_modules' names vision-tower modules {clash}",
                hint="target_modules applies to the language model; use peft.train_vision: merger | all for the "
                "vision side",
            )
        names = "|".join(re.escape(name) for name in p.target_modules)
        language = rf"(?:.*\blanguage_model\.(?:.*\.)?)?(?:{names})"  # under language_model, or lm_head itself
    vision = VISION_TARGETS[p.train_vision]
    return language if vision is None else f"(?:{language})|(?:{vision})"


def lora_config(p: PeftSection, model, trainable_token_ids: list[int] | None = None):
    from peft import LoraConfig

    targets = lora_targets(p, model)
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


def _prepare_for_adapter(model, quant, gradient_checkpointing: bool):
    """Freeze the base (QLoRA, `quant` given: 4-bit) and turn on non-reentrant gradient checkpointing, before PEFT
    wraps the model. By hand rather than PEFT's `prepare_model_for_kbit_training`, which also upcasts every frozen
    non-4-bit weight to fp32 (the 3B's embedding alone: 0.6 → 1.2 GiB) and has no switch to skip it: the frozen
    embedding, norms and head stay in the compute dtype they were loaded in; the LoRA and token-row parameters PEFT
    adds are fp32 (`get_peft_model`'s `autocast_adapter_dtype`), and so is their optimizer state."""
    if quant is not None:
        model.requires_grad_(False)
    if gradient_checkpointing:
        gc_kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.20 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    return model


def add_adapter(
    peft: PeftSection,
    model,
    trainable_token_ids: list[int] | None = None,
    *,
    quant=None,
    gradient_checkpointing: bool = True,
):
    """Wrap the base in a PEFT LoRA model (QLoRA, `quant` given: after k-bit preparation)."""
    from peft import get_peft_model

    model = _prepare_for_adapter(model, quant, gradient_checkpointing)
    peft_model = get_peft_model(model, lora_config(peft, model, trainable_token_ids))
    return peft_model


def keep_trainables_in_fp32(model) -> int:
    """Cast every trainable parameter back to fp32 once the trainer is built; returns how many were not. TRL 1.16's
    SFTTrainer and DPOTrainer cast the trainable parameters of a quantized model to bf16 (the QLoRA paper's choice),
    which also makes AdamW keep its state in bf16; qwentune keeps LoRA and token-row parameters and their optimizer
    state in fp32, where small updates at LoRA learning rates are not rounded away. Call before training starts (the
    optimizer is created then)."""
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def load_adapter_for_training(model, adapter_dir: Path, *, quant=None, gradient_checkpointing: bool = True):
    """Continue training an existing adapter (e.g. DPO after SFT), prepared exactly like a fresh one."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise QwentuneError("not an adapter dir (no adapter_config.json)", where=str(adapter_dir))
    model = _prepare_for_adapter(model, quant, gradient_checkpointing)
    peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    return peft_model
