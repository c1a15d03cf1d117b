"""The test oracle: merge a `PeftModel` already in memory (PEFT's layer merges in fp32, tie fixed first).

Only tests use it: it checks that the streaming merge gives the same tensors as PEFT's own merge. A 4-bit model is
merged by exporting its adapter and running `merge_adapter` on the base read from disk."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import torch

from qwentune.errors import QwentuneError
from qwentune.export.job import MergeJob, MergeResult, check_qlora_merge, mode_for
from qwentune.export.merge import innermost, merge_adapter, merge_peft_model, resolve_base
from qwentune.export.outdir import prepare_target
from qwentune.export.quant import DTYPES
from qwentune.export.sidecar import image_processor_settings
from qwentune.model.quantspec import QuantSpec, dtype_name


def merge_model_in_memory(
    peft_model: Any,
    output_dir: str | Path,
    *,
    base: str | Path | None = None,
    qlora_merge: str = "dequantized",
    quantization: QuantSpec | dict | None = None,
    parity_input_ids: list[list[int]] | None = None,
    chat_template: str | None = None,
    tokenizer_source: Path | None = None,
    generation_eos_ids: list[int] | None = None,
    model_card: dict | None = None,
    tolerance: float | None = None,
    check_parity: bool = True,
    max_shard_size: str | int = "2GB",
    image_processor: dict | None = None,
) -> MergeResult:
    """Merge a `PeftModel` that is already in memory (end of training) and write a plain checkpoint.

    The model is consumed (merged in place, like PEFT's ``merge_and_unload``); each layer is merged in fp32 and
    cast back, so the result equals the streaming merge's. `base` (default: the adapter config's
    ``base_model_name_or_path``) supplies the saved dtype, generation config and tokenizer when it is a local dir. A
    4-bit (QLoRA) model is not merged into its 4-bit weights: its adapter is exported and merged onto the base read
    from disk, exactly as `merge_adapter` does (`base` is then required to exist). `image_processor`: as for
    `merge_adapter`."""
    check_qlora_merge(qlora_merge)
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise QwentuneError(
            f"expected a peft.PeftModel, got {type(peft_model).__name__}", where="merge_model_in_memory"
        )
    adapter_name = peft_model.active_adapter
    if not isinstance(adapter_name, str):
        raise QwentuneError("more than one active adapter", hint="set_adapter(<name>) to choose the one to merge")
    peft_cfg = peft_model.peft_config[adapter_name]
    peft_type = str(getattr(peft_cfg.peft_type, "value", peft_cfg.peft_type))
    if peft_type != "LORA":
        raise QwentuneError(f"only LoRA adapters merge here, this one is {peft_type}")
    base_ref = base if base is not None else peft_cfg.base_model_name_or_path
    inner = peft_model.get_base_model()

    qc = getattr(inner.config, "quantization_config", None)
    if qc is not None and not is_4bit(inner):
        raise QwentuneError(
            "the model is quantized, but not with bitsandbytes 4-bit", hint="only 4-bit (nf4/fp4) QLoRA models merge"
        )
    if is_4bit(inner):
        if base_ref is None:
            raise QwentuneError(
                "a 4-bit model merges onto its base read from disk, and none is known",
                hint="pass base=<local model dir>",
            )
        if quantization is None:
            if qc is None:
                raise QwentuneError("4-bit layers but no quantization_config", hint="pass quantization={...}")
            spec = spec_from_bnb_config(qc)
            load_dtype = quantized_from_dtype(inner)
            if load_dtype is not None:
                spec = QuantSpec(**{**spec.__dict__, "load_dtype": dtype_name(load_dtype, where="model")})
        else:
            spec = QuantSpec.from_dict(quantization)
        target = prepare_target(output_dir, forbidden=[])
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.adapter-", dir=target.parent) as tmp_adapter:
            peft_model.save_pretrained(tmp_adapter, selected_adapters=[adapter_name])
            saved = Path(tmp_adapter) / adapter_name if adapter_name != "default" else Path(tmp_adapter)
            return merge_adapter(
                saved,
                target,
                base=base_ref,
                qlora_merge=qlora_merge,
                quantization=spec,
                parity_input_ids=parity_input_ids,
                chat_template=chat_template,
                tokenizer_source=tokenizer_source,
                generation_eos_ids=generation_eos_ids,
                model_card=model_card,
                tolerance=tolerance,
                streaming=True,
                check_parity=check_parity,
                adapter_label="(in memory: 4-bit PeftModel)",
                image_processor=image_processor,
            )

    base_dir = None
    if base_ref is not None:
        with contextlib.suppress(QwentuneError):
            base_dir = resolve_base(base_ref)
    spec = QuantSpec.from_dict(quantization) if quantization is not None else None
    mode = mode_for(spec, qlora_merge)
    job = MergeJob(
        adapter_dir=None,
        base_dir=base_dir,
        base_name=str(base_ref) if base_ref is not None else "(in memory)",
        mode=mode,
        spec=spec,
        parity_rows=parity_input_ids,
        chat_template=chat_template,
        tokenizer_source=Path(tokenizer_source) if tokenizer_source is not None else None,
        eos_ids=generation_eos_ids,
        card=dict(model_card or {}),
        tolerance=tolerance,
        parity=check_parity,
        streaming=False,
        image_processor=image_processor_settings(image_processor),
    )
    target = prepare_target(output_dir, forbidden=[base_dir] if base_dir else [])
    return merge_peft_model(job, peft_model, adapter_name, target, max_shard_size=max_shard_size)


def is_4bit(model: Any) -> bool:
    if getattr(model, "is_loaded_in_4bit", False):
        return True
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def quantized_from_dtype(model: Any) -> torch.dtype | None:
    """The dtype a 4-bit model's weights had when bitsandbytes quantized them (kept in each weight's quant state).
    Not the embedding's dtype: prepare_model_for_kbit_training upcasts that to fp32 after loading."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "dtype", None) in DTYPES.values():
            return state.dtype
    emb_weight = getattr(innermost(model.get_input_embeddings()), "weight", None)
    return emb_weight.dtype if emb_weight is not None and emb_weight.dtype in DTYPES.values() else None


def spec_from_bnb_config(qc: Any) -> QuantSpec:
    """From a `transformers.BitsAndBytesConfig` (a 4-bit model's ``config.quantization_config``)."""
    if isinstance(qc, dict):
        get = qc.get
    else:

        def get(key, default=None):
            return getattr(qc, key, default)

    if not get("load_in_4bit", False):
        raise QwentuneError(
            "the model is quantized but not with bitsandbytes 4-bit", hint="only 4-bit (nf4/fp4) QLoRA merges"
        )
    compute = get("bnb_4bit_compute_dtype", "float32") or "float32"
    skip = get("llm_int8_skip_modules", None)
    return QuantSpec.from_dict(
        {
            "bits": 4,
            "quant_type": get("bnb_4bit_quant_type", "fp4"),
            "double_quant": bool(get("bnb_4bit_use_double_quant", False)),
            "compute_dtype": dtype_name(compute, where="quantization_config"),
            "skip_modules": list(skip) if skip else None,
        }
    )
