"""Merge a LoRA / QLoRA adapter into its base model and save a checkpoint plain `transformers` loads.

Two entry points:

* `merge_adapter(adapter_dir, output_dir)` — the standalone merge (`qwentune merge`). With `streaming=True` (the
  default) it goes through the base's safetensors shards one tensor at a time (plain file reads and writes, no mmap,
  no whole-shard buffers), applies the adapter's deltas (``B @ A * scaling``; rsLoRA ``alpha / sqrt(r)``,
  ``rank_pattern``/``alpha_pattern``, ``lora_bias``, DoRA on linear layers, LoRA on embeddings, trainable-token rows,
  ``modules_to_save``) and writes the output shards with the same names and a ``model.safetensors.index.json``. Peak
  memory is the largest tensor (plus its fp32 work copy) and the adapter: a 3B/7B model merges on a 24 GiB machine.
  PEFT module names (transformers-5 layout, e.g. ``model.language_model.layers.0...`` for Qwen2-VL) are mapped to the
  checkpoint's keys (which may use the older ``model.layers.0...`` / ``visual...`` layout) by unique suffix match.
  `streaming=False` loads base + adapter as a `PeftModel` and uses PEFT's merge (needed for DoRA on embeddings and
  the rare LoRA variants the streaming path refuses with a clear error).
* `merge_model_in_memory(peft_model, output_dir)` — the end of training: the `PeftModel` is already in memory. A
  full-precision model is merged with PEFT's layer merges, each layer's base weight upcast to fp32 for its merge
  (after the tie fix below), and saved with `save_pretrained`; it gives bitwise the same tensors as the streaming
  merge. A 4-bit (QLoRA) model is never merged into its 4-bit weights: its adapter is exported and merged by the
  streaming path onto the base read from disk. The model is consumed (merged in place).

Modes (`MergeResult.mode`, also in `merge_report.json` and the model card):

* ``"lora"`` — the adapter was trained on the full-precision base; the delta is added in fp32 and the result saved in
  the base model's dtype (``dtype``/``torch_dtype`` of the base config).
* ``"qlora-dequantized"`` (default for QLoRA) — the base is quantized exactly as training did (bitsandbytes nf4/fp4,
  optional double quant, from the dtype the weights were loaded in) and dequantized back with
  `bitsandbytes.functional.dequantize_4bit`, for every weight of a layer transformers would have made `Linear4bit`;
  the delta is added to those dequantized weights in fp32. The merged model computes what was trained (up to the
  compute dtype of the 4-bit matmuls).
* ``"qlora-original-base"`` (``qlora_merge="original"``) — the delta is added to the original full-precision base.
  This differs from the trained model by the 4-bit quantization error of the base.

Tied embeddings (Qwen2.5-0.5B/1.5B/3B, Qwen2-VL-2B tie ``lm_head`` to ``embed_tokens``): when the adapter touches
either matrix (``modules_to_save``, ``trainable_token_indices``, LoRA on them, saved embedding layers) the merged
model is untied deliberately: a separate ``lm_head.weight`` is written and ``tie_word_embeddings`` is set to false
(top level and ``text_config``). Otherwise the tie is kept and no duplicate tensor is written. Each matrix gets
exactly what PEFT's forward pass applied to it: with a list of ``trainable_token_indices`` (or the same indices for
both) PEFT ties a token adapter to ``lm_head`` too, so both get the trained rows; ``modules_to_save=["embed_tokens"]``
or LoRA on one of them changes only that one. (peft 0.21's own ``merge_and_unload`` gets several of these wrong on a
tied model: it merges in place into the shared tensor, so LoRA on ``lm_head``/``embed_tokens`` or token rows on
``lm_head`` leak into the other matrix; the in-memory path unties before merging to avoid that.)

Parity check after every merge: logits of the saved model (loaded normally with ``from_pretrained``) versus base +
adapter as a `PeftModel` (for ``qlora-dequantized`` on the dequantized base, i.e. what the 4-bit layers compute; for
``qlora-original-base`` on the original base) over a few rows (`parity_input_ids`, default four fixed short rows
that include any trained token ids; for Qwen2-VL also one row with a synthetic image, `_parity_image`, so the
vision tower, the merger and any LoRA on them are checked too). Both are computed in fp32; a bf16 model is held in
bf16 and each module is upcast only while it runs (exactly the fp32 result at half the memory; models are loaded one
at a time), and the merge refuses up front when even that does not fit (pass ``check_parity=False``). The max abs
difference is printed and saved in ``output_dir/merge_report.json``. Default tolerances (`default_tolerance`):

* saved in fp32: ``1e-3`` (measured 3e-7 .. 4e-6 on tiny models);
* saved in bf16/fp16: ``max(0.05, 0.02 * max|reference logit|)``: the merged weights are rounded to 8 (bf16) or 11
  (fp16) mantissa bits. Measured on the real Qwen2.5-Coder-0.5B (bf16, LoRA r16 all-linear): 0.08 .. 0.12 at a
  largest logit of ~18 (0.5 %), tolerance 0.37; the adapter itself moved logits by 4.9 and a 2x scaling error by 8.6.
* QLoRA: the same rule by saved dtype, because the reference is the dequantized base. Against the real 4-bit model
  the difference also contains the 4-bit matmuls' compute-dtype rounding: with fp32 compute ~4e-6 (tiny model),
  with bf16 compute about 1-2 % of the largest logit. (bitsandbytes 0.50 on an AVX512-BF16 CPU repacks 4-bit weights
  for inference on the first eval-mode no-grad forward and rounds their absmax to bf16, so eval-mode logits of the
  4-bit model differ slightly from training-mode ones; the merge reproduces the training-time weights.)

Above tolerance: `QwentuneError`, and nothing is left at ``output_dir``.

Atomic output: everything is written to ``output_dir.parent / ".{name}.tmp-XXXX"``, verified, then renamed into place;
an existing ``output_dir`` is renamed aside first and deleted only after the new one is in place. A failure at any
point leaves the previous ``output_dir`` untouched and removes the temp dir (a killed process can leave a
``.{name}.tmp-*`` dir behind, never a half-written target).

Training sidecar ``qwentune_train.json`` (beside ``adapter_config.json``; written by the trainer with
`write_train_sidecar`, read by `merge_adapter`; every key optional, unknown top-level keys ignored)::

    {
      "format": "qwentune-train",            # fixed marker
      "version": 1,
      "quantization": {                       # null/absent: plain LoRA on a full-precision base
        "bits": 4,                            # only 4 (bitsandbytes Linear4bit)
        "quant_type": "nf4",                  # "nf4" | "fp4"
        "double_quant": true,                 # bnb_4bit_use_double_quant
        "compute_dtype": "bfloat16",          # bnb_4bit_compute_dtype (informational for the merge)
        "blocksize": 64,                      # optional, bitsandbytes' default 64
        "load_dtype": "bfloat16",             # optional: dtype the base was loaded in before quantizing
                                              #   (default: compute_dtype, as qwentune's trainer loads it)
        "skip_modules": null                  # optional: llm_int8_skip_modules used at training time
                                              #   (default: qwentune's, shapes.quant_skip_modules: Qwen2-VL
                                              #   keeps lm_head and the vision tower unquantized)
      },
      "chat_template": "...",                 # the template the training data was rendered with
      "model_card": {"data": ..., "recipe": ..., "metrics": {...}},
      "image_processor": {"min_pixels": 3136, "max_pixels": 1003520}   # Qwen2-VL: written into the merged
                                              #   image-processor config (see `merge_adapter`)
    }

`merge_adapter`'s arguments override the sidecar (``quantization=``, ``chat_template=``, ``model_card=``,
``image_processor=``).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import QwentuneError, did_you_mean
from .shapes import is_vl, quant_skip_modules

__all__ = [
    "MergeResult",
    "QuantSpec",
    "SIDECAR_NAME",
    "default_tolerance",
    "merge_adapter",
    "merge_model_in_memory",
    "read_train_sidecar",
    "resolve_base",
    "write_train_sidecar",
]

SIDECAR_NAME = "qwentune_train.json"
SIDECAR_FORMAT = "qwentune-train"
REPORT_NAME = "merge_report.json"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
QWEN_EOS_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>

FP32_TOLERANCE = 1e-3
HALF_TOLERANCE_ABS = 0.05
HALF_TOLERANCE_REL = 0.02

MODE_LORA = "lora"
MODE_QLORA_DEQUANTIZED = "qlora-dequantized"
MODE_QLORA_ORIGINAL = "qlora-original-base"

_PEFT_PREFIX = "base_model.model."
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_AUX_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")
# LoraConfig fields that change what the adapter computes in ways the streaming merge does not implement.
_UNSUPPORTED_STREAMING = {
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
}
# init_lora_weights values that rewrite the base weights at init: the adapter only makes sense on that residual base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")
_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


# --------------------------------------------------------------------------------------------------------------------
# public data types


@dataclass
class MergeResult:
    output_dir: Path
    mode: str  # "lora" | "qlora-dequantized" | "qlora-original-base"
    max_abs_diff: float  # parity: merged logits vs base+adapter (nan when check_parity=False)
    tolerance: float
    untied: bool  # whether tied embeddings were untied deliberately


@dataclass(frozen=True)
class QuantSpec:
    """How the base was quantized for QLoRA training (the sidecar's ``quantization`` block)."""

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    blocksize: int = 64
    load_dtype: str | None = None
    skip_modules: tuple[str, ...] | None = None

    _KEYS = ("bits", "quant_type", "double_quant", "compute_dtype", "blocksize", "load_dtype", "skip_modules")

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "quantization") -> QuantSpec:
        if isinstance(data, QuantSpec):
            return data
        if not isinstance(data, dict):
            raise QwentuneError(f"expected an object, got {type(data).__name__}", where=where)
        for key in data:
            if key not in cls._KEYS:
                raise QwentuneError(f"unknown key '{key}'", where=where, hint=did_you_mean(key, cls._KEYS))
        bits = data.get("bits", 4)
        if bits != 4:
            raise QwentuneError(
                f"bits={bits!r} is not supported", where=where, hint="only 4-bit (bitsandbytes nf4/fp4) QLoRA merges"
            )
        quant_type = data.get("quant_type", "nf4")
        if quant_type not in ("nf4", "fp4"):
            raise QwentuneError(f"quant_type={quant_type!r}", where=where, hint="use 'nf4' or 'fp4'")
        double_quant = data.get("double_quant", True)
        if not isinstance(double_quant, bool):
            raise QwentuneError("double_quant must be true or false", where=where)
        compute_dtype = _dtype_name(data.get("compute_dtype", "bfloat16"), where=f"{where}.compute_dtype")
        load_dtype = data.get("load_dtype")
        if load_dtype is not None:
            load_dtype = _dtype_name(load_dtype, where=f"{where}.load_dtype")
        blocksize = data.get("blocksize", 64)
        if not isinstance(blocksize, int) or blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise QwentuneError(f"blocksize={blocksize!r}", where=where, hint="bitsandbytes uses 64 by default")
        skip = data.get("skip_modules")
        if skip is not None:
            if not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) for s in skip):
                raise QwentuneError("skip_modules must be a list of module names", where=where)
            skip = tuple(skip)
        return cls(4, quant_type, double_quant, compute_dtype, blocksize, load_dtype, skip)

    @classmethod
    def from_bnb_config(cls, qc: Any) -> QuantSpec:
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
        return cls.from_dict(
            {
                "bits": 4,
                "quant_type": get("bnb_4bit_quant_type", "fp4"),
                "double_quant": bool(get("bnb_4bit_use_double_quant", False)),
                "compute_dtype": _dtype_name(compute, where="quantization_config"),
                "skip_modules": list(skip) if skip else None,
            }
        )

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "compute_dtype": self.compute_dtype,
            "blocksize": self.blocksize,
            "load_dtype": self.load_dtype,
            "skip_modules": list(self.skip_modules) if self.skip_modules is not None else None,
        }


def _dtype_name(value: Any, *, where: str) -> str:
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return str(_DTYPES[value.removeprefix("torch.")]).removeprefix("torch.")
    raise QwentuneError(f"unknown dtype {value!r}", where=where, hint="use float32, bfloat16 or float16")


# --------------------------------------------------------------------------------------------------------------------
# hooks and sidecar


def resolve_base(source: str | Path) -> Path:
    """A base-model reference (local dir, hub id, .gguf, offline:…) → a local directory, via the one model resolver."""
    from .sources import resolve_model

    return resolve_model(str(source)).path


def read_train_sidecar(adapter_dir: str | Path) -> dict:
    """The validated ``qwentune_train.json`` beside an adapter, or ``{}`` when there is none."""
    path = Path(adapter_dir) / SIDECAR_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise QwentuneError(f"not valid JSON: {exc}", where=str(path)) from exc
    if not isinstance(data, dict):
        raise QwentuneError("expected a JSON object", where=str(path))
    out: dict[str, Any] = {}
    if data.get("quantization") is not None:
        out["quantization"] = QuantSpec.from_dict(data["quantization"], where=f"{path}: quantization")
    if data.get("chat_template") is not None:
        if not isinstance(data["chat_template"], str):
            raise QwentuneError("chat_template must be a string", where=str(path))
        out["chat_template"] = data["chat_template"]
    if data.get("image_processor") is not None:
        out["image_processor"] = _image_processor_settings(data["image_processor"])
    if data.get("model_card") is not None:
        if not isinstance(data["model_card"], dict):
            raise QwentuneError("model_card must be an object", where=str(path))
        out["model_card"] = data["model_card"]
    return out


def write_train_sidecar(
    adapter_dir: str | Path,
    *,
    quantization: QuantSpec | dict | None = None,
    chat_template: str | None = None,
    model_card: dict | None = None,
    image_processor: dict | None = None,
) -> Path:
    """Write ``qwentune_train.json`` beside an adapter (see the module docstring for the format)."""
    data: dict[str, Any] = {"format": SIDECAR_FORMAT, "version": 1}
    data["quantization"] = QuantSpec.from_dict(quantization).to_dict() if quantization is not None else None
    data["chat_template"] = chat_template
    data["model_card"] = model_card
    data["image_processor"] = _image_processor_settings(image_processor)
    path = Path(adapter_dir) / SIDECAR_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def default_tolerance(save_dtype: torch.dtype, reference_scale: float) -> float:
    """The parity tolerance used when none is given (see the module docstring)."""
    if save_dtype == torch.float32:
        return FP32_TOLERANCE
    return max(HALF_TOLERANCE_ABS, HALF_TOLERANCE_REL * float(reference_scale))


# --------------------------------------------------------------------------------------------------------------------
# public entry points


def merge_adapter(
    adapter_dir: str | Path,
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
    streaming: bool = True,
    check_parity: bool = True,
    image_processor: dict | None = None,
    adapter_label: str | None = None,
) -> MergeResult:
    """Merge the adapter saved in `adapter_dir` into its base and write a plain checkpoint to `output_dir`.

    `quantization` (or the sidecar's ``quantization`` block) marks a QLoRA adapter; `qlora_merge` is then
    ``"dequantized"`` (merge onto the base as the 4-bit layers saw it) or ``"original"`` (onto the full-precision
    base). `check_parity=False` skips the parity check (it loads base + adapter, then the result, one at a time,
    held in the base's dtype and computed in fp32) — for models that do not fit in memory even once.
    `image_processor` (Qwen2-VL): settings such as ``{"min_pixels": ..., "max_pixels": ...}`` written into the
    merged dir's image-processor config (None values are left out; the pixel limits also go into ``size``).
    `adapter_label`: how merge_report.json names the adapter (default: its dir)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise QwentuneError(
            "no adapter_config.json here",
            where=str(adapter_dir),
            hint="pass the directory written by PeftModel.save_pretrained (the training run's adapter output)",
        )
    _check_qlora_merge(qlora_merge)
    sidecar = read_train_sidecar(adapter_dir)
    spec = QuantSpec.from_dict(quantization) if quantization is not None else sidecar.get("quantization")
    chat_template = chat_template if chat_template is not None else sidecar.get("chat_template")
    card = {**sidecar.get("model_card", {}), **(model_card or {})}
    if image_processor is None:
        image_processor = sidecar.get("image_processor")
    adapter_cfg = _read_json(adapter_dir / "adapter_config.json")
    base_ref = base if base is not None else adapter_cfg.get("base_model_name_or_path")
    if not base_ref:
        raise QwentuneError(
            "adapter_config.json names no base model", where=str(adapter_dir), hint="pass base=<local model dir>"
        )
    base_dir = resolve_base(base_ref)
    mode = _mode_for(spec, qlora_merge)
    job = _Job(
        adapter_dir=adapter_dir,
        base_dir=base_dir,
        base_name=str(base_ref),
        mode=mode,
        spec=spec,
        parity_rows=parity_input_ids,
        chat_template=chat_template,
        tokenizer_source=Path(tokenizer_source) if tokenizer_source is not None else None,
        eos_ids=generation_eos_ids,
        card=card,
        tolerance=tolerance,
        parity=check_parity,
        streaming=streaming,
        adapter_label=adapter_label,
        image_processor=_image_processor_settings(image_processor),
    )
    target = _prepare_target(output_dir, forbidden=[adapter_dir, base_dir])
    if streaming:
        return _streaming_merge(job, target)
    return _load_and_merge_in_memory(job, target)


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
    _check_qlora_merge(qlora_merge)
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
    if qc is not None and not _is_4bit(inner):
        raise QwentuneError(
            "the model is quantized, but not with bitsandbytes 4-bit", hint="only 4-bit (nf4/fp4) QLoRA models merge"
        )
    if _is_4bit(inner):
        if base_ref is None:
            raise QwentuneError(
                "a 4-bit model merges onto its base read from disk, and none is known",
                hint="pass base=<local model dir>",
            )
        if quantization is None:
            if qc is None:
                raise QwentuneError("4-bit layers but no quantization_config", hint="pass quantization={...}")
            spec = QuantSpec.from_bnb_config(qc)
            load_dtype = _quantized_from_dtype(inner)
            if load_dtype is not None:
                spec = QuantSpec(**{**spec.__dict__, "load_dtype": _dtype_name(load_dtype, where="model")})
        else:
            spec = QuantSpec.from_dict(quantization)
        target = _prepare_target(output_dir, forbidden=[])
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
    mode = _mode_for(spec, qlora_merge)
    job = _Job(
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
        image_processor=_image_processor_settings(image_processor),
    )
    target = _prepare_target(output_dir, forbidden=[base_dir] if base_dir else [])
    return _merge_peft_model(job, peft_model, adapter_name, target, max_shard_size=max_shard_size)


# --------------------------------------------------------------------------------------------------------------------
# the job and its shared finishing steps


@dataclass
class _Job:
    adapter_dir: Path | None
    base_dir: Path | None
    base_name: str
    mode: str
    spec: QuantSpec | None
    parity_rows: list[list[int]] | None
    chat_template: str | None
    tokenizer_source: Path | None
    eos_ids: list[int] | None
    card: dict
    tolerance: float | None
    parity: bool
    streaming: bool
    report: dict = field(default_factory=dict)
    parity_dtype: torch.dtype = torch.float32
    adapter_label: str | None = None
    image_processor: dict | None = None  # settings written into the merged image-processor config
    parity_image: dict | None = None  # Qwen2-VL: one synthetic image row for the parity check


def _check_qlora_merge(qlora_merge: str) -> None:
    if qlora_merge not in ("dequantized", "original"):
        raise QwentuneError(
            f"qlora_merge={qlora_merge!r}",
            where="qlora_merge",
            hint="'dequantized' (the model as trained) or 'original' (onto the full-precision base)",
        )


def _mode_for(spec: QuantSpec | None, qlora_merge: str) -> str:
    if spec is None:
        return MODE_LORA
    return MODE_QLORA_DEQUANTIZED if qlora_merge == "dequantized" else MODE_QLORA_ORIGINAL


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QwentuneError(f"cannot read JSON: {exc}", where=str(path)) from exc
    if not isinstance(data, dict):
        raise QwentuneError("expected a JSON object", where=str(path))
    return data


def _prepare_target(output_dir: str | Path, *, forbidden: list[Path]) -> Path:
    target = Path(output_dir).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise QwentuneError("exists and is not a directory", where=str(target))
    for other in forbidden:
        if other is not None and target.resolve() == Path(other).expanduser().resolve():
            raise QwentuneError(
                "the output directory is the adapter or base directory", where=str(target), hint="choose a new path"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A temp dir beside `target`; on success it replaces `target` (old one moved aside, then deleted)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, target)


def _publish(tmp: Path, target: Path) -> None:
    old = None
    try:
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rmdir(old)
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            os.rename(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _config_dtype(cfg: dict) -> torch.dtype:
    for holder in (cfg, cfg.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            value = holder.get(key)
            if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
                return _DTYPES[value.removeprefix("torch.")]
    return torch.float32


def _text_cfg(cfg: dict) -> dict:
    return cfg.get("text_config") or cfg


def _untie_config_dict(cfg: dict) -> None:
    cfg["tie_word_embeddings"] = False
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"]["tie_word_embeddings"] = False


def _model_class(config: Any):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def _load_model(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _model_class(config).from_pretrained(path, dtype=dtype)


def _finish(job: _Job, tmp: Path, config_dict: dict, base_gen: dict | None, extra_sources: list[Path]) -> dict:
    """Tokenizer, chat template, generation config, processor files, licence files. Returns facts for the card."""
    facts: dict[str, Any] = {}
    sources = []
    if job.tokenizer_source is not None:
        if not job.tokenizer_source.is_dir():
            raise QwentuneError("no such directory", where=f"tokenizer_source={job.tokenizer_source}")
        sources.append(job.tokenizer_source)
    sources += [s for s in extra_sources if s is not None]
    tok = None
    for src in sources:
        if (src / "tokenizer.json").is_file() or (src / "tokenizer_config.json").is_file():
            tok = _load_tokenizer(src)
            facts["tokenizer_source"] = str(src)
            break
    if tok is None and job.tokenizer_source is not None:
        raise QwentuneError("no tokenizer files here", where=f"tokenizer_source={job.tokenizer_source}")
    if tok is not None:
        if job.chat_template is not None:
            tok.chat_template = job.chat_template
        tok.save_pretrained(tmp)
        expected = tok.chat_template
        from transformers import AutoTokenizer

        reloaded = AutoTokenizer.from_pretrained(tmp)
        if reloaded.chat_template != expected:
            raise QwentuneError("the saved tokenizer's chat template does not read back identical", where=str(tmp))
        facts["chat_template_saved"] = expected is not None
    else:
        print("[qwentune merge] warning: no tokenizer found (adapter dir, base dir); none is saved")
    for src in [job.base_dir, *sources]:
        if src is None:
            continue
        for name in _AUX_FILES:
            if (src / name).is_file() and not (tmp / name).exists():
                shutil.copy2(src / name, tmp / name)
    if job.image_processor and is_vl(config_dict):
        facts["image_processor"] = job.report["image_processor"] = _write_image_processor(tmp, job.image_processor)
    elif job.image_processor:
        print("[qwentune merge] note: image-processor settings ignored (not a vision-language model)")
    if job.base_dir is not None:
        for item in job.base_dir.iterdir():
            if item.is_file() and item.name.upper().startswith(("LICENSE", "NOTICE")):
                shutil.copy2(item, tmp / item.name)

    gen = dict(base_gen) if base_gen else {}
    text = _text_cfg(config_dict)
    if not gen:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = text.get(key, config_dict.get(key))
            if value is not None:
                gen[key] = value
    if job.eos_ids is not None:
        eos = [int(i) for i in job.eos_ids]
    elif tok is not None and IM_END in tok.get_vocab():
        eos = [tok.convert_tokens_to_ids(IM_END)]
        if ENDOFTEXT in tok.get_vocab():
            eos.append(tok.convert_tokens_to_ids(ENDOFTEXT))
    else:
        eos = gen.get("eos_token_id")
    if eos is not None:
        gen["eos_token_id"] = eos
    gen.pop("transformers_version", None)
    import transformers

    gen["transformers_version"] = transformers.__version__
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    facts["eos_token_id"] = eos
    facts["tokenizer"] = tok
    return facts


def _image_processor_settings(settings: dict | None) -> dict | None:
    """Checked image-processor settings, None values dropped (a recipe's unset min/max pixels)."""
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise QwentuneError(f"expected a dict, got {type(settings).__name__}", where="image_processor")
    out = {k: v for k, v in settings.items() if v is not None}
    for key in ("min_pixels", "max_pixels"):
        if key in out and (not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] <= 0):
            raise QwentuneError(f"{key} must be a positive integer, got {out[key]!r}", where="image_processor")
    if out.get("min_pixels", 0) > out.get("max_pixels", math.inf):
        raise QwentuneError(
            f"min_pixels {out['min_pixels']} > max_pixels {out['max_pixels']}", where="image_processor"
        )
    return out or None


def _write_image_processor(tmp: Path, settings: dict) -> dict:
    """Put `settings` into the merged dir's image-processor config: preprocessor_config.json, and the nested
    ``image_processor`` of processor_config.json when there is one (transformers reads that one first). The pixel
    limits go into ``size`` (shortest_edge/longest_edge, where transformers 5 reads them) as well."""
    targets = []
    if (tmp / "preprocessor_config.json").is_file():
        targets.append((tmp / "preprocessor_config.json", None))
    if (tmp / "processor_config.json").is_file():
        if isinstance(_read_json(tmp / "processor_config.json").get("image_processor"), dict):
            targets.append((tmp / "processor_config.json", "image_processor"))
    if not targets:
        raise QwentuneError(
            "image-processor settings were given, but neither the base nor the adapter dir has an image-processor "
            "config (preprocessor_config.json) to put them in",
            where="image_processor",
            hint="pass tokenizer_source=<dir with the processor files>",
        )
    for path, nested in targets:
        data = _read_json(path)
        config = data[nested] if nested else data
        config.update(settings)
        size = dict(config.get("size") or {})
        for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if key in settings:
                size[edge] = settings[key]
                if key in size:  # an older layout keeps the limits under their own names inside size
                    size[key] = settings[key]
        if size:
            config["size"] = size
        path.write_text(json.dumps(data, indent=2) + "\n")
    return settings


def _load_tokenizer(src: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(src)
    except Exception:
        if (src / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
        raise


def _parity_rows(job: _Job, vocab_size: int, special_ids: list[int]) -> list[list[int]]:
    if job.parity_rows is not None:
        rows = job.parity_rows
        if not rows or not all(isinstance(r, (list, tuple)) and r for r in rows):
            raise QwentuneError("parity_input_ids must be a non-empty list of non-empty id lists")
        for row in rows:
            for i in row:
                if not isinstance(i, int) or not 0 <= i < vocab_size:
                    raise QwentuneError(
                        f"token id {i!r} outside the vocabulary (0..{vocab_size - 1})", where="parity_input_ids"
                    )
        return [list(r) for r in rows]
    gen = torch.Generator().manual_seed(1234)
    high = min(vocab_size, 151643)
    rows = [torch.randint(0, high, (8,), generator=gen).tolist() for _ in range(3)]
    specials = [i for i in (151644, 151645, 151643) if i < vocab_size]
    extra = [i for i in special_ids if 0 <= i < vocab_size][:12]
    last = (specials + extra + rows[0])[: max(8, len(specials) + len(extra))]
    rows.append(last)
    return rows


@torch.no_grad()
def _logits(model: Any, rows: list[list[int]], image: dict | None = None) -> list[torch.Tensor]:
    """Logits for each row (then for the image row, if any), computed in fp32 even when the model is held in 16-bit
    (see `_fp32_compute`)."""
    if not rows:
        return []
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    # one batch, right-padded: a causal model's logits at the real positions do not see the padding after them
    ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    with _fp32_compute(model):
        logits = model(input_ids=ids).logits.float().cpu()
        out = [logits[i, : len(row)] for i, row in enumerate(rows)]
        if image is not None:
            out.append(model(**{k: v.to(device) for k, v in image.items()}).logits[0].float().cpu())
    return out


def _parity_image(cfg: dict) -> dict | None:
    """Qwen2-VL: forward inputs of one row holding a synthetic image (fixed random patches on a 4x4 patch grid), so
    the parity check runs the vision tower and merger too (and any LoRA on them). None for text models, and for toy
    vocabularies that do not reach the image token ids."""
    if not is_vl(cfg):
        return None
    vision = cfg.get("vision_config") or {}
    text = _text_cfg(cfg)
    vocab = int(text.get("vocab_size") or cfg.get("vocab_size") or 0)
    image_id = cfg.get("image_token_id", text.get("image_token_id", 151655))
    start = cfg.get("vision_start_token_id", text.get("vision_start_token_id", 151652))
    end = cfg.get("vision_end_token_id", text.get("vision_end_token_id", 151653))
    if max(image_id, start, end) >= vocab:
        return None
    merge = int(vision.get("spatial_merge_size", 2))
    channels = vision.get("in_channels", vision.get("in_chans", 3))  # in_chans: the published config.json's name
    patch_dim = channels * vision.get("temporal_patch_size", 2) * vision.get("patch_size", 14) ** 2
    grid = [1, 2 * merge, 2 * merge]
    patches = math.prod(grid)
    gen = torch.Generator().manual_seed(4321)
    pixel_values = torch.randn(patches, patch_dim, generator=gen)
    ids = torch.tensor([[11, 22, start] + [image_id] * (patches // merge**2) + [end, 33, 44, 55]])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor([grid]),
        "mm_token_type_ids": (ids == image_id).long(),  # 1 marks image tokens; drives the 3-D rotary positions
    }


_HALF = (torch.bfloat16, torch.float16)


def _upcast_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def up(v):
        return v.float() if torch.is_tensor(v) and v.dtype in _HALF else v

    return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}


@contextlib.contextmanager
def _fp32_compute(model: Any) -> Iterator[None]:
    """Run a model held in bf16/fp16 exactly as its fp32 copy would, holding one module in fp32 at a time.

    Every module that owns half-precision parameters gets them swapped for fp32 copies for the duration of its
    forward (and its half inputs upcast); PEFT layers (which read their base weights directly) are swapped as a
    whole. Memory: the 16-bit model plus the largest module in fp32, instead of a full fp32 copy."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        peft_layers: tuple = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    except ImportError:  # pragma: no cover - peft is a dependency
        peft_layers = ()
    if not any(p.dtype in _HALF for p in model.parameters()):
        yield
        return

    def pre(module, args, kwargs):
        saved = []
        params = module.parameters(recurse=isinstance(module, peft_layers))
        for p in dict.fromkeys(params):
            if p.dtype in _HALF:
                saved.append((p, p.data))
                p.data = p.data.float()
        module._qwentune_fp32_saved = saved
        return _upcast_inputs(args, kwargs)

    def post(module, args, kwargs, output):
        for p, data in module._qwentune_fp32_saved:
            p.data = data
        module._qwentune_fp32_saved = []

    handles = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        whole = isinstance(module, peft_layers)
        if whole:
            inside.append(name)
        if any(p.dtype in _HALF for p in module.parameters(recurse=whole)):
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _check_parity(job: _Job, ref: list[torch.Tensor], got: list[torch.Tensor], save_dtype: torch.dtype) -> tuple:
    diff = _max_abs_diff(ref, got)
    scale = max(float(r.abs().max()) for r in ref)
    tol = job.tolerance if job.tolerance is not None else default_tolerance(save_dtype, scale)
    held = str(job.parity_dtype).removeprefix("torch.")
    print(
        f"[qwentune merge] parity ({job.mode}): max |logit diff| = {diff:.3g} over {len(ref)} rows "
        f"(tolerance {tol:.3g}, reference max |logit| {scale:.3g})"
    )
    job.report["parity"] = {
        "max_abs_diff": diff,
        "tolerance": tol,
        "reference_max_abs_logit": scale,
        "rows": len(ref),
        "image_rows": int(job.parity_image is not None),
        "compute_dtype": "float32",
        "weights_held_in": held,
    }
    if not math.isfinite(diff) or diff > tol:
        raise QwentuneError(
            f"merged model does not match base+adapter: max |logit diff| {diff:.4g} > tolerance {tol:.4g}",
            where="merge parity check",
            hint="nothing was written to the output directory; pass tolerance= only if the difference is expected",
        )
    return diff, tol


_MODE_TEXT = {
    MODE_LORA: "LoRA delta added in fp32 to the base weights",
    MODE_QLORA_DEQUANTIZED: "QLoRA: base quantized as in training (bitsandbytes 4-bit) and dequantized, LoRA delta "
    "added in fp32 — the merged model computes what was trained",
    MODE_QLORA_ORIGINAL: "QLoRA adapter merged onto the ORIGINAL full-precision base — differs from the trained "
    "(4-bit) model by the base's quantization error",
}


def _write_card(job: _Job, tmp: Path, title: str, *, dtype: torch.dtype, untied: bool, diff: float, tol: float):
    card = dict(job.card)
    lines = [
        "---",
        f"base_model: {job.base_name}",
        "library_name: transformers",
        f"tags: [qwentune, {'qlora' if job.spec else 'lora'}, merged]",
        "---",
        "",
        f"# {title}",
        "",
        f"Merged with qwentune: base `{job.base_name}` + LoRA adapter, saved as plain transformers safetensors.",
        "",
        f"- **Merge**: `{job.mode}` — {_MODE_TEXT[job.mode]}",
    ]
    if job.spec is not None:
        q = job.spec
        lines.append(
            f"- **Training quantization**: {q.bits}-bit {q.quant_type}, double quant {str(q.double_quant).lower()}, "
            f"compute {q.compute_dtype}"
        )
    lines.append(f"- **dtype**: {str(dtype).removeprefix('torch.')}")
    lines.append(
        "- **Embeddings**: "
        + (
            "untied deliberately (the adapter changed embed_tokens or lm_head); `tie_word_embeddings: false`"
            if untied
            else "as in the base"
        )
    )
    if math.isnan(diff):
        lines.append("- **Parity check**: skipped")
    else:
        lines.append(f"- **Parity check**: max |logit diff| vs base+adapter = {diff:.3g} (tolerance {tol:.3g})")
    for key, title in (("data", "Data"), ("recipe", "Recipe")):
        if card.get(key) is not None:
            lines += ["", f"## {title}", "", _card_value(card.pop(key))]
    metrics = card.pop("metrics", None)
    if metrics:
        lines += ["", "## Metrics", ""]
        if isinstance(metrics, dict):
            lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in metrics.items()]
        else:
            lines.append(_card_value(metrics))
    card.pop("data", None)
    card.pop("recipe", None)
    if card:
        lines += ["", "## Other", ""] + [f"- **{k}**: {_card_value(v)}" for k, v in card.items()]
    (tmp / "README.md").write_text("\n".join(lines) + "\n")


def _card_value(value: Any) -> str:
    if isinstance(value, dict):
        return "\n".join(f"- {k}: {v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "\n".join(f"- {v}" for v in value)
    return str(value)


def _verify_output(tmp: Path) -> None:
    from safetensors import safe_open

    if any(p.suffix == ".bin" for p in tmp.iterdir()):
        raise QwentuneError("a .bin weight file was written", where=str(tmp))
    files = sorted(p for p in tmp.iterdir() if p.suffix == ".safetensors")
    if not files:
        raise QwentuneError("no safetensors weights were written", where=str(tmp))
    for path in files:
        with safe_open(str(path), "pt") as f:
            bad = [k for k in f.keys() if "lora_" in k or "base_layer" in k or "modules_to_save" in k]
        if bad:
            raise QwentuneError(f"adapter keys left in the merged weights: {bad[:3]}", where=str(path))


def _write_report(job: _Job, tmp: Path, result: MergeResult, save_dtype: torch.dtype) -> None:
    report = {
        "mode": result.mode,
        "max_abs_diff": None if math.isnan(result.max_abs_diff) else result.max_abs_diff,
        "tolerance": result.tolerance,
        "untied": result.untied,
        "dtype": str(save_dtype).removeprefix("torch."),
        "base": job.base_name,
        "adapter": job.adapter_label or (str(job.adapter_dir) if job.adapter_dir else "(in memory)"),
        "streaming": job.streaming,
        "quantization": job.spec.to_dict() if job.spec else None,
        **job.report,
    }
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# in-memory path (PEFT merge_and_unload with the tie fix)


def _is_4bit(model: Any) -> bool:
    if getattr(model, "is_loaded_in_4bit", False):
        return True
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def _quantized_from_dtype(model: Any) -> torch.dtype | None:
    """The dtype a 4-bit model's weights had when bitsandbytes quantized them (kept in each weight's quant state).
    Not the embedding's dtype: prepare_model_for_kbit_training upcasts that to fp32 after loading."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "dtype", None) in _DTYPES.values():
            return state.dtype
    emb_weight = getattr(_innermost(model.get_input_embeddings()), "weight", None)
    return emb_weight.dtype if emb_weight is not None and emb_weight.dtype in _DTYPES.values() else None


def _innermost(module: Any) -> Any:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    while True:
        if isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        elif isinstance(module, TrainableTokensWrapper):
            module = module.token_adapter
        elif isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        else:
            return module


def _untie_in_memory(inner: Any) -> bool:
    """Give lm_head its own weight before merging when the adapter touches a tied embedding. True if untied."""
    emb, out = inner.get_input_embeddings(), inner.get_output_embeddings()
    if emb is None or out is None:
        return False
    emb0, out0 = _innermost(emb), _innermost(out)
    if getattr(out0, "weight", None) is None or out0.weight is not emb0.weight:
        return False
    if emb is emb0 and out is out0:
        return False  # tied, untouched: keep the tie
    out0.weight = torch.nn.Parameter(out0.weight.detach().clone(), requires_grad=False)
    return True


def _set_untied(config: Any) -> None:
    config.tie_word_embeddings = False
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        text.tie_word_embeddings = False


def _load_and_merge_in_memory(job: _Job, target: Path) -> MergeResult:
    """merge_adapter(streaming=False): base + PeftModel, then PEFT's merge one layer at a time in fp32."""
    from peft import PeftModel

    _check_adapter_config(_read_json(job.adapter_dir / "adapter_config.json"), streaming=False)
    save_dtype = _config_dtype(_read_json(job.base_dir / "config.json"))
    model = _load_model(job.base_dir, _parity_hold_dtype(job, save_dtype))
    if job.mode == MODE_QLORA_DEQUANTIZED:
        names = _quantized_module_names(model, job.spec)
        _dequantize_modules_inplace(model, names, job.spec, _load_dtype(job))
        job.report["quantized_modules"] = len(names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(model, str(job.adapter_dir))
    return _merge_peft_model(job, pm, pm.active_adapter, target, max_shard_size="2GB")


def _merge_peft_model(job: _Job, pm: Any, adapter_name: str, target: Path, *, max_shard_size) -> MergeResult:
    inner = pm.get_base_model()
    base_cfg = _read_json(job.base_dir / "config.json") if job.base_dir else inner.config.to_dict()
    save_dtype = _config_dtype(base_cfg) if job.base_dir else inner.dtype
    job.parity_dtype = save_dtype if save_dtype in _HALF else torch.float32
    pm.eval()
    vocab = _innermost(inner.get_input_embeddings()).weight.shape[0]
    rows = _parity_rows(job, vocab, _trained_token_ids_in_memory(pm, adapter_name)) if job.parity else []
    job.parity_image = _parity_image(base_cfg) if job.parity else None
    ref = _logits(pm, rows, job.parity_image) if job.parity else []
    untied = _untie_in_memory(inner)
    merged = _merge_layers_fp32(pm, adapter_name)
    if untied:
        _set_untied(merged.config)
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config
    base_gen = None
    if job.base_dir is not None and (job.base_dir / "generation_config.json").is_file():
        base_gen = _read_json(job.base_dir / "generation_config.json")
    elif getattr(merged, "generation_config", None) is not None:
        base_gen = merged.generation_config.to_diff_dict()
    with _staging(target) as tmp:
        merged.to(save_dtype)
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        cfg_dict = _read_json(tmp / "config.json")
        if untied:
            _untie_config_dict(cfg_dict)
        cfg_dict["dtype"] = str(save_dtype).removeprefix("torch.")
        cfg_dict.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
        del merged
        gc.collect()
        _finish(job, tmp, cfg_dict, base_gen, [job.adapter_dir, job.base_dir])
        _verify_output(tmp)
        diff, tol = _parity_on_dir(job, tmp, ref, rows, save_dtype)
        result = MergeResult(target, job.mode, diff, tol, untied)
        _write_card(job, tmp, target.name, dtype=save_dtype, untied=untied, diff=diff, tol=tol)
        _write_report(job, tmp, result, save_dtype)
    return result


def _merge_layers_fp32(pm: Any, adapter_name: str) -> Any:
    """PEFT's merge, layer by layer with that layer's base weights upcast to fp32 (then cast back), then unload.

    Same arithmetic as merging an fp32 copy of the model (what the streaming merge computes), at the memory of the
    16-bit model plus one layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in list(pm.modules()):
            if not isinstance(module, BaseTunerLayer):
                continue
            base = module.get_base_layer()
            held = [(p, p.data) for p in base.parameters(recurse=False) if p.dtype in _HALF]
            for p, _ in held:
                p.data = p.data.float()
            module.merge(safe_merge=True, adapter_names=[adapter_name])
            for p, original in held:  # back into the original storage: no second copy of the model
                original.copy_(p.data)
                p.data = original
        return pm.merge_and_unload(progressbar=False, adapter_names=[adapter_name])


def _parity_on_dir(job: _Job, tmp: Path, ref: list, rows: list, save_dtype: torch.dtype) -> tuple[float, float]:
    if not job.parity:
        print("[qwentune merge] parity check skipped (check_parity=False)")
        job.report["parity"] = "skipped"
        return float("nan"), float(job.tolerance if job.tolerance is not None else float("nan"))
    model = _load_model(tmp, job.parity_dtype)
    got = _logits(model, rows, job.parity_image)
    del model
    gc.collect()
    return _check_parity(job, ref, got, save_dtype)


def _trained_token_ids_in_memory(pm: Any, adapter_name: str) -> list[int]:
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    ids: list[int] = []
    for module in pm.modules():
        if isinstance(module, TrainableTokensLayer):
            ids += list(module.token_indices.get(adapter_name, []))
    return sorted(set(ids))


# --------------------------------------------------------------------------------------------------------------------
# QLoRA: quantize like training did, dequantize back


def _load_dtype(job: _Job) -> torch.dtype:
    """The dtype the base weights had when bitsandbytes quantized them: the sidecar's ``load_dtype``, else the
    compute dtype (qwentune's trainer, like most QLoRA recipes, loads the base in the compute dtype)."""
    if job.spec.load_dtype is not None:
        return _DTYPES[job.spec.load_dtype]
    return _DTYPES[job.spec.compute_dtype]


def _quant_roundtrip(weight: torch.Tensor, spec: QuantSpec, load_dtype: torch.dtype) -> torch.Tensor:
    """The weight a bitsandbytes Linear4bit built from `weight` computes with, in fp32."""
    import bitsandbytes.functional as bnbf

    w = weight.to(load_dtype).contiguous()
    qweight, state = bnbf.quantize_4bit(
        w,
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type=spec.quant_type,
        quant_storage=torch.uint8,
    )
    return bnbf.dequantize_4bit(qweight, state).to(torch.float32)


def _quantized_module_names(skeleton: Any, spec: QuantSpec) -> list[str]:
    """Names of the nn.Linear modules transformers replaces by bnb Linear4bit when loading with this config."""
    from torch import nn

    try:
        from transformers.quantizers.base import HfQuantizer
        from transformers.quantizers.quantizers_utils import should_convert_module

        skip = _skip_modules(skeleton, spec)
        not_convert = HfQuantizer.get_modules_to_not_convert(skeleton, skip, skeleton._keep_in_fp32_modules)
    except (ImportError, AttributeError):  # older/newer transformers: fall back to the documented default
        out = skeleton.get_output_embeddings()
        not_convert = [n for n, m in skeleton.named_modules() if m is out] + list(_skip_modules(skeleton, spec) or [])

        def should_convert_module(name, patterns):
            return not any(name == p or name.endswith("." + p) or name.startswith(p + ".") for p in patterns)

    return [
        name
        for name, module in skeleton.named_modules()
        if type(module) is nn.Linear and should_convert_module(name, not_convert)
    ]


def _skip_modules(skeleton: Any, spec: QuantSpec) -> list[str] | None:
    """The quantization's `llm_int8_skip_modules`: the sidecar's, else what qwentune's trainer passes for this model
    type (Qwen2-VL: the vision tower and lm_head stay unquantized), else None (transformers' default)."""
    if spec.skip_modules is not None:
        return list(spec.skip_modules)
    return quant_skip_modules(skeleton.config)


def _dequantize_modules_inplace(model: Any, names: list[str], spec: QuantSpec, load_dtype: torch.dtype) -> None:
    for name in names:
        module = model.get_submodule(name)
        module.weight.data = _quant_roundtrip(module.weight.data, spec, load_dtype).to(module.weight.dtype)


# --------------------------------------------------------------------------------------------------------------------
# streaming path: adapter parsing


@dataclass
class _LoraDelta:
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    embedding: bool = False
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None  # DoRA

    def delta(self) -> torch.Tensor:
        if self.embedding:
            return (self.B.float() @ self.A.float()).T * self.scaling
        d = (self.B.float() @ self.A.float()) * self.scaling
        return d.T if self.fan_in_fan_out else d


@dataclass
class _KeyOps:
    """What happens to one checkpoint tensor."""

    replace: torch.Tensor | None = None
    lora: _LoraDelta | None = None
    add: torch.Tensor | None = None  # lora_B.bias * scaling
    rows: list[tuple[list[int], torch.Tensor]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return self.replace is None and self.lora is None and self.add is None and not self.rows


@dataclass
class _ModuleParts:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


_LORA_KEY = re.compile(
    r"^(?P<mod>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
    r"lora_embedding_B|lora_magnitude_vector(?:\.weight)?)$"
)
_TT_KEY = re.compile(r"^(?P<mod>.+)\.token_adapter\.trainable_tokens_delta$")
_BASE_LAYER_KEY = re.compile(r"^(?P<mod>.+)\.base_layer\.(?P<param>weight|bias)$")
_FULL_KEY = re.compile(r"^(?P<mod>.+)\.(?P<param>weight|bias)$")


def _check_adapter_config(cfg: dict, *, streaming: bool) -> None:
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise QwentuneError(
            f"peft_type {peft_type!r} is not a LoRA adapter",
            where="adapter_config.json",
            hint="train trainable tokens through LoraConfig(trainable_token_indices=...)",
        )
    if not streaming:
        return
    for key, what in _UNSUPPORTED_STREAMING.items():
        if cfg.get(key):
            raise QwentuneError(
                f"{what} ({key}) is not supported by the streaming merge",
                where="adapter_config.json",
                hint="use streaming=False (PEFT's merge_and_unload)"
                if key != "alora_invocation_tokens"
                else "activated LoRA only applies after its invocation tokens and cannot be merged",
            )
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise QwentuneError(
            f"init_lora_weights={init!r} rewrites the base weights at init, so the adapter does not apply to the "
            "original base",
            where="adapter_config.json",
            hint="save the adapter with path_initial_model_for_weight_conversion=... (a plain LoRA) or merge in "
            "memory with merge_model_in_memory",
        )


def _pattern_key(patterns: dict, name: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _scaling(cfg: dict, module: str, rank: int) -> float:
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rk, ak = _pattern_key(rank_pattern, module), _pattern_key(alpha_pattern, module)
    r = rank_pattern[rk] if rk is not None else cfg.get("r", 8)
    alpha = alpha_pattern[ak] if ak is not None else cfg.get("lora_alpha", 8)
    if r != rank:
        raise QwentuneError(f"{module}: lora_A has rank {rank} but the config says r={r}", where="adapter_config.json")
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _load_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    st = adapter_dir / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    bin_ = adapter_dir / "adapter_model.bin"
    if bin_.is_file():
        return torch.load(bin_, map_location="cpu", weights_only=True)
    raise QwentuneError("no adapter_model.safetensors (or .bin)", where=str(adapter_dir))


@dataclass
class _ParsedAdapter:
    lora: dict[str, _LoraDelta]  # module path -> delta
    lora_bias: dict[str, torch.Tensor]  # module path -> bias delta (already scaled)
    replace: dict[str, torch.Tensor]  # "<module>.<param>" -> full tensor
    rows: dict[str, tuple[list[int], torch.Tensor]]  # module path -> (indices, values)
    token_ids: list[int]


def _parse_adapter(cfg: dict, tensors: dict[str, torch.Tensor]) -> _ParsedAdapter:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    replace: dict[str, torch.Tensor] = {}
    tt: dict[str, torch.Tensor] = {}
    unknown = []
    for key, t in tensors.items():
        if not key.startswith(_PEFT_PREFIX):
            unknown.append(key)
            continue
        rest = key[len(_PEFT_PREFIX) :]
        if m := _LORA_KEY.match(rest):
            part = m["part"].removesuffix(".weight") if "magnitude" in m["part"] else m["part"]
            parts.setdefault(m["mod"], {})[part] = t
        elif m := _TT_KEY.match(rest):
            tt[m["mod"]] = t
        elif m := _BASE_LAYER_KEY.match(rest):
            replace[f"{m['mod']}.{m['param']}"] = t
        elif "lora_" in rest or "trainable_tokens" in rest or "modules_to_save" in rest or "token_adapter" in rest:
            unknown.append(key)
        elif m := _FULL_KEY.match(rest):
            replace[f"{m['mod']}.{m['param']}"] = t  # modules_to_save / bias="all"|"lora_only"
        else:
            unknown.append(key)
    if unknown:
        raise QwentuneError(
            f"adapter tensors the streaming merge does not understand: {unknown[:4]}",
            where="adapter_model.safetensors",
            hint="use streaming=False (PEFT's merge_and_unload)",
        )
    lora: dict[str, _LoraDelta] = {}
    lora_bias: dict[str, torch.Tensor] = {}
    for mod, p in parts.items():
        emb = "lora_embedding_A" in p or "lora_embedding_B" in p
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        if a_key not in p or b_key not in p:
            raise QwentuneError(f"{mod}: incomplete LoRA pair (have {sorted(p)})", where="adapter_model.safetensors")
        A, B = p[a_key], p[b_key]
        scaling = _scaling(cfg, mod, A.shape[0])
        magnitude = p.get("lora_magnitude_vector")
        if magnitude is not None and emb:
            raise QwentuneError(
                f"{mod}: DoRA on an embedding is not supported by the streaming merge",
                hint="use streaming=False (PEFT's merge_and_unload)",
            )
        if magnitude is None and cfg.get("use_dora") and not emb:
            raise QwentuneError(f"{mod}: use_dora is set but no magnitude vector was saved")
        lora[mod] = _LoraDelta(A, B, scaling, emb, bool(cfg.get("fan_in_fan_out")) and not emb, magnitude)
        if "lora_B.bias" in p:
            lora_bias[mod] = p["lora_B.bias"].float() * scaling
    rows: dict[str, tuple[list[int], torch.Tensor]] = {}
    token_ids: list[int] = []
    if tt:
        spec = cfg.get("trainable_token_indices")
        for mod, values in tt.items():
            if isinstance(spec, dict):
                matches = [k for k in spec if mod == k or mod.endswith("." + k)]
                if len(matches) != 1:
                    raise QwentuneError(f"{mod}: cannot tell which trainable_token_indices entry it is ({spec})")
                idx = list(spec[matches[0]])
            elif isinstance(spec, list) and len(tt) == 1:
                idx = list(spec)
            else:
                raise QwentuneError(f"{mod}: trainable token deltas without matching trainable_token_indices")
            if values.shape[0] != len(idx):
                raise QwentuneError(f"{mod}: {values.shape[0]} trained rows for {len(idx)} token indices")
            rows[mod] = (idx, values)
            token_ids += idx
    return _ParsedAdapter(lora, lora_bias, replace, rows, sorted(set(token_ids)))


# --------------------------------------------------------------------------------------------------------------------
# streaming path: checkpoint keys


class _KeyIndex:
    """Map model-side names (PEFT module paths, transformers-5 layout) to the checkpoint's keys by suffix."""

    def __init__(self, keys):
        self.keys = set(keys)
        self.by_suffix: dict[str, list[str]] = {}
        for key in self.keys:
            comps = key.split(".")
            for i in range(len(comps)):
                self.by_suffix.setdefault(".".join(comps[i:]), []).append(key)

    def find(self, name: str) -> str | None:
        if name in self.keys:
            return name
        comps = name.split(".")
        for i in range(1, len(comps) - 1):  # a suffix keeps at least "<module>.<param>"
            hits = self.by_suffix.get(".".join(comps[i:]))
            if not hits:
                continue
            if len(hits) == 1:
                return hits[0]
            raise QwentuneError(
                f"'{name}' matches several checkpoint tensors by suffix: {sorted(hits)[:4]}",
                where="merge key mapping",
            )
        return None


@dataclass
class _BaseCheckpoint:
    root: Path
    shards: list[str]
    key_to_shard: dict[str, str]
    indexed: bool

    @classmethod
    def open(cls, root: Path) -> _BaseCheckpoint:
        from safetensors import safe_open

        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map") or {}
            shards = sorted(set(weight_map.values()))
            key_to_shard = dict(weight_map)
            for shard in shards:
                if not (root / shard).is_file():
                    raise QwentuneError(f"missing shard {shard}", where=str(index))
            return cls(root, shards, key_to_shard, True)
        single = root / "model.safetensors"
        if single.is_file():
            with safe_open(str(single), "pt") as f:
                keys = list(f.keys())
            return cls(root, ["model.safetensors"], {k: "model.safetensors" for k in keys}, False)
        hint = "convert it to safetensors first (the streaming merge reads safetensors shards)"
        if any(root.glob("*.bin")):
            hint += ", or use streaming=False"
        raise QwentuneError("no model.safetensors or model.safetensors.index.json", where=str(root), hint=hint)


def _skeleton(base_dir: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    cls = _model_class(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    return model


# Shards are read and written one tensor at a time with plain file I/O (no mmap, no whole-shard buffers), so the
# streaming merge holds about one tensor (plus its fp32 work copy) besides the adapter.
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class _ShardReader:
    """Reads a safetensors file tensor by tensor into fresh memory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = open(self.path, "rb")  # closed in close() / __exit__
        try:
            (size,) = struct.unpack("<Q", self._fh.read(8))
            header = json.loads(self._fh.read(size))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._fh.close()
            raise QwentuneError(f"not a safetensors file: {exc}", where=str(self.path)) from exc
        self._start = 8 + size
        self.metadata = header.pop("__metadata__", None)
        self._entries = dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))
        for key, info in self._entries.items():
            if info["dtype"] not in _ST_DTYPES:
                self._fh.close()
                raise QwentuneError(f"{key}: unsupported safetensors dtype {info['dtype']}", where=str(self.path))

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self._entries[key]["dtype"]]

    def get(self, key: str) -> torch.Tensor:
        info = self._entries[key]
        begin, end = info["data_offsets"]
        dtype, shape = _ST_DTYPES[info["dtype"]], tuple(info["shape"])
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(end - begin)
        self._fh.seek(self._start + begin)
        if self._fh.readinto(buf) != len(buf):
            raise QwentuneError(f"{key}: file ends early", where=str(self.path))
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> _ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ShardWriter:
    """Writes a safetensors file whose tensors (name, dtype, shape) are known up front, one tensor at a time."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        if sys.byteorder != "little":  # safetensors stores little-endian data
            raise QwentuneError("the streaming merge needs a little-endian machine", hint="use streaming=False")
        self.path = Path(path)
        self.keys = [k for k, _, _ in specs]
        self._specs = {k: (d, tuple(sh)) for k, d, sh in specs}
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, dtype, shape in specs:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        self.nbytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._next = 0
        self._fh = open(self.path, "wb")  # closed in close() / __exit__
        self._fh.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        expected = self.keys[self._next] if self._next < len(self.keys) else None
        dtype, shape = self._specs.get(key, (None, None))
        if key != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise QwentuneError(
                f"internal: wrote {key} {tensor.dtype} {tuple(tensor.shape)}, expected {expected} {dtype} {shape}",
                where=str(self.path),
            )
        if tensor.numel():
            self._fh.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        self._next += 1

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> _ShardWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close()
        if exc_type is None and self._next != len(self.keys):
            raise QwentuneError(f"internal: {len(self.keys) - self._next} tensors not written", where=str(self.path))


def _out_spec(name: str, reader: _ShardReader, key: str, ops: dict, save_dtype: torch.dtype):
    """(name, dtype, shape) of an output tensor made from the checkpoint tensor `key`."""
    dtype = reader.dtype(key)
    out_dtype = save_dtype if dtype.is_floating_point else dtype
    entry = ops.get(name)
    shape = tuple(entry.replace.shape) if entry is not None and entry.replace is not None else reader.shape(key)
    return name, out_dtype, shape


def _streaming_merge(job: _Job, target: Path) -> MergeResult:
    adapter_cfg = _read_json(job.adapter_dir / "adapter_config.json")
    _check_adapter_config(adapter_cfg, streaming=True)
    parsed = _parse_adapter(adapter_cfg, _load_adapter_tensors(job.adapter_dir))
    base_cfg = _read_json(job.base_dir / "config.json")
    save_dtype = _config_dtype(base_cfg)
    ckpt = _BaseCheckpoint.open(job.base_dir)
    skeleton = _skeleton(job.base_dir)

    # tie structure, in the checkpoint's key names
    tied_pairs = dict(getattr(skeleton, "all_tied_weights_keys", None) or {})
    index = _KeyIndex(ckpt.key_to_shard)
    emb_key = head_key = None
    head_virtual = False  # lm_head is not stored (the usual tied checkpoint): it is made from embed_tokens
    for target_name, source_name in tied_pairs.items():
        src = index.find(source_name)
        if src is not None:
            found = index.find(target_name)
            emb_key, head_key, head_virtual = src, found or target_name, found is None
            break
    if head_virtual:
        index = _KeyIndex([*ckpt.key_to_shard, head_key])

    # ops per checkpoint key
    ops: dict[str, _KeyOps] = {}

    def op(name: str, source: str) -> _KeyOps:
        key = index.find(name)
        if key is None:
            raise QwentuneError(
                f"adapter module '{source}' has no tensor '{name}' in the base checkpoint",
                where=str(job.base_dir),
                hint="is this the base the adapter was trained on? (base= overrides adapter_config.json)",
            )
        entry = ops.setdefault(key, _KeyOps())
        entry.sources.append(source)
        return entry

    for name, tensor in parsed.replace.items():
        op(name, name).replace = tensor
    for mod, delta in parsed.lora.items():
        op(f"{mod}.weight", mod).lora = delta
    for mod, bias in parsed.lora_bias.items():
        op(f"{mod}.bias", mod).add = bias
    for mod, (idx, values) in parsed.rows.items():
        op(f"{mod}.weight", mod).rows.append((idx, values))
    # PEFT ties a token adapter on the input embedding to lm_head unless lm_head has its own token deltas
    if emb_key and emb_key in ops and ops[emb_key].rows and not (head_key in ops and ops[head_key].rows):
        ops.setdefault(head_key, _KeyOps()).rows.extend(ops[emb_key].rows)
    untied = bool(emb_key) and (emb_key in ops or head_key in ops)
    if head_virtual and not untied:
        ops.pop(head_key, None)
    make_head = head_virtual and untied

    quantized: set[str] = set()
    qnames: list[str] = []
    if job.mode == MODE_QLORA_DEQUANTIZED:
        qnames = _quantized_module_names(skeleton, job.spec)
        for name in qnames:
            key = index.find(f"{name}.weight")
            if key is None:
                raise QwentuneError(f"no checkpoint tensor for quantized layer {name}", where=str(job.base_dir))
            quantized.add(key)
        for key in quantized & set(ops):
            if ops[key].replace is not None:
                raise QwentuneError(
                    f"{ops[key].sources}: a fully trained copy of a 4-bit layer cannot be merged",
                    where="adapter_model.safetensors",
                )
        job.report["quantized_modules"] = len(quantized)
    load_dtype = _load_dtype(job) if job.spec is not None else None
    del skeleton
    if job.parity:
        job.parity_dtype = _parity_hold_dtype(job, save_dtype)
        _check_parity_memory(ckpt, job.parity_dtype)

    with _staging(target) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        done: set[str] = set()
        for shard in ckpt.shards:
            with _ShardReader(job.base_dir / shard) as reader:
                specs = []
                for key in reader.keys():
                    if key == emb_key and make_head:
                        specs.append(_out_spec(head_key, reader, key, ops, save_dtype))
                    specs.append(_out_spec(key, reader, key, ops, save_dtype))
                with _ShardWriter(tmp / shard, specs) as writer:
                    for key in reader.keys():
                        tensor = reader.get(key)
                        if key == emb_key and make_head:
                            writer.write(
                                head_key,
                                _apply(tensor, ops.get(head_key), False, job.spec, load_dtype, save_dtype, head_key),
                            )
                            done.add(head_key)
                        writer.write(
                            key, _apply(tensor, ops.get(key), key in quantized, job.spec, load_dtype, save_dtype, key)
                        )
                        done.add(key)
                        del tensor
                total += writer.nbytes
                weight_map.update(dict.fromkeys(writer.keys, shard))
            gc.collect()
        missing = set(ops) - done
        if missing:
            raise QwentuneError(
                f"checkpoint tensors never seen while merging: {sorted(missing)[:4]}", where=str(job.base_dir)
            )
        if ckpt.indexed or len(ckpt.shards) > 1:
            index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")

        cfg_out = copy.deepcopy(base_cfg)
        if untied:
            _untie_config_dict(cfg_out)
        emb_rows = _rows_of(emb_key, ops, ckpt, job.base_dir)
        if emb_rows is not None:
            _text_cfg(cfg_out)["vocab_size"] = emb_rows
        cfg_out.pop("quantization_config", None)
        cfg_out["dtype"] = str(save_dtype).removeprefix("torch.")
        if "torch_dtype" in cfg_out:
            cfg_out["torch_dtype"] = cfg_out["dtype"]
        (tmp / "config.json").write_text(json.dumps(cfg_out, indent=2) + "\n")
        base_gen = None
        if (job.base_dir / "generation_config.json").is_file():
            base_gen = _read_json(job.base_dir / "generation_config.json")
        facts = _finish(job, tmp, cfg_out, base_gen, [job.adapter_dir, job.base_dir])
        _verify_output(tmp)
        job.report["shards"] = len(ckpt.shards)
        job.report["untied"] = untied

        specials = list(parsed.token_ids)
        del facts, parsed
        ops.clear()  # the adapter tensors are not needed any more
        gc.collect()
        if job.parity:
            vocab = emb_rows or _text_cfg(cfg_out).get("vocab_size") or 0
            rows = _parity_rows(job, int(vocab), specials)
            job.parity_image = _parity_image(cfg_out)
            ref = _reference_logits(job, qnames, rows)
            diff, tol = _parity_on_dir(job, tmp, ref, rows, save_dtype)
        else:
            diff, tol = _parity_on_dir(job, tmp, [], [], save_dtype)
        result = MergeResult(target, job.mode, diff, tol, untied)
        _write_card(job, tmp, target.name, dtype=save_dtype, untied=untied, diff=diff, tol=tol)
        _write_report(job, tmp, result, save_dtype)
    return result


def _available_memory() -> int | None:
    """MemAvailable in bytes (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _parity_hold_dtype(job: _Job, save_dtype: torch.dtype) -> torch.dtype:
    """The dtype the parity check holds the models in. Their forward always computes in fp32 (`_fp32_compute`), so
    holding a bf16 model in bf16 gives the fp32 result at half the memory. Dequantized weights that a 16-bit dtype
    cannot hold exactly (quantized from fp32) need fp32."""
    if save_dtype not in _HALF:
        return torch.float32
    if job.mode == MODE_QLORA_DEQUANTIZED and _load_dtype(job) != save_dtype:
        return torch.float32
    return save_dtype


def _check_parity_memory(ckpt: _BaseCheckpoint, hold: torch.dtype) -> None:
    """Refuse before merging when the parity check cannot load the model (it loads one model at a time)."""
    available = _available_memory()
    if available is None:
        return
    params = 0
    for shard in ckpt.shards:
        with _ShardReader(ckpt.root / shard) as reader:
            params += sum(math.prod(reader.shape(k)) for k in reader.keys())
    need = params * torch.empty((), dtype=hold).element_size() * 1.15 + (1 << 30)
    if need > available:
        raise QwentuneError(
            f"the parity check loads the model (~{need / 2**30:.1f} GiB) and only {available / 2**30:.1f} GiB are "
            "available",
            where="merge parity check",
            hint="pass check_parity=False (qwentune merge --no-parity) to merge without it, or free memory",
        )


def _rows_of(emb_key: str | None, ops: dict, ckpt: _BaseCheckpoint, base_dir: Path) -> int | None:
    """The embedding's row count when a saved embedding layer changed it (resized vocabulary), else None."""
    if emb_key is None or emb_key not in ops or ops[emb_key].replace is None:
        return None
    from safetensors import safe_open

    with safe_open(str(base_dir / ckpt.key_to_shard[emb_key]), "pt") as f:
        rows = f.get_slice(emb_key).get_shape()[0]
    new = ops[emb_key].replace.shape[0]
    return new if new != rows else None


def _apply(
    tensor: torch.Tensor,
    ops: _KeyOps | None,
    quantized: bool,
    spec: QuantSpec | None,
    load_dtype: torch.dtype | None,
    save_dtype: torch.dtype,
    key: str,
) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    work = None
    if ops is not None and ops.replace is not None:
        if ops.replace.dim() != tensor.dim() or (ops.replace.shape[1:] != tensor.shape[1:]):
            raise QwentuneError(
                f"{key}: adapter tensor of shape {tuple(ops.replace.shape)} for a base tensor of shape "
                f"{tuple(tensor.shape)}",
                where="adapter_model.safetensors",
            )
        tensor = ops.replace
    if quantized:
        work = _quant_roundtrip(tensor, spec, load_dtype)
    if ops is not None and (ops.lora is not None or ops.add is not None or ops.rows):
        work = tensor.float() if work is None else work
        if ops.lora is not None:
            delta = ops.lora.delta()
            if delta.shape != work.shape:
                raise QwentuneError(
                    f"{key}: LoRA delta of shape {tuple(delta.shape)} for a tensor of shape {tuple(work.shape)}",
                    where="adapter_model.safetensors",
                    hint="is this the base the adapter was trained on?",
                )
            if ops.lora.magnitude is not None:  # DoRA: m * (W + dW) / ||W + dW||_row
                merged = work + delta
                norm = torch.linalg.norm(merged, dim=1)
                work = (ops.lora.magnitude.float() / norm).view(-1, 1) * merged
            else:
                work = work + delta
        if ops.add is not None:
            work = work + ops.add
        for idx, values in ops.rows:
            work = work.index_copy(0, torch.tensor(idx, dtype=torch.long), values.to(work.dtype))
    result = tensor if work is None else work
    return result.to(save_dtype).contiguous()


def _reference_logits(job: _Job, qnames: list[str], rows: list[list[int]]) -> list[torch.Tensor]:
    """Base + adapter as a PeftModel in fp32 (on the dequantized base for qlora-dequantized)."""
    from peft import PeftModel

    model = _load_model(job.base_dir, job.parity_dtype)
    if job.mode == MODE_QLORA_DEQUANTIZED:
        _dequantize_modules_inplace(model, qnames, job.spec, _load_dtype(job))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(model, str(job.adapter_dir))
    pm.eval()
    out = _logits(pm, rows, job.parity_image)
    del pm, model
    gc.collect()
    return out
