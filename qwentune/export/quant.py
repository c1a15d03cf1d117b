"""The 4-bit round trip of a QLoRA base (the settings are `qwentune.quantspec.QuantSpec`, re-exported here).

A ``qlora-dequantized`` merge quantizes every weight transformers would have made `Linear4bit` exactly as training
did (bitsandbytes nf4/fp4, optional double quant, from the dtype the weights were loaded in) and dequantizes it back,
so the delta is added to the weights the 4-bit layers computed with."""

from __future__ import annotations

from typing import Any

import torch

from ..model import QuantSpec, quant_skip_modules

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def quant_roundtrip(weight: torch.Tensor, spec: QuantSpec, load_dtype: torch.dtype) -> torch.Tensor:
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


def quantized_module_names(skeleton: Any, spec: QuantSpec) -> list[str]:
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


def dequantize_modules_inplace(model: Any, names: list[str], spec: QuantSpec, load_dtype: torch.dtype) -> None:
    for name in names:
        module = model.get_submodule(name)
        module.weight.data = quant_roundtrip(module.weight.data, spec, load_dtype).to(module.weight.dtype)
