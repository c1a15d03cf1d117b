"""The 4-bit settings of a QLoRA run (`QuantSpec`): the one form built from the recipe's `peft.quant`, recorded in the
training sidecar and read back by the merge, and the facts the memory estimate counts. Plain values, no torch at import
(`qwentune estimate` reads it without loading torch); the 4-bit round trip itself is `export/quant.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import QwentuneError, did_you_mean
from ..recipe import PeftSection, QuantSection

DTYPE_NAMES = {  # accepted names → the canonical one
    "float32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "half": "float16",
}


@dataclass(frozen=True)
class QuantSpec:
    """How the base was quantized for QLoRA training: the one form of the 4-bit settings. Built from the recipe
    (`from_section`), it makes the `BitsAndBytesConfig` training loads with (`bnb_config`), the sidecar's
    ``quantization`` block (`to_dict` / `from_dict`) and the estimate's 4-bit facts.

    ``bits``: only 4 merges (bitsandbytes Linear4bit); ``quant_type``: nf4 | fp4; ``double_quant``; ``compute_dtype``;
    ``blocksize`` (bitsandbytes' default 64); ``load_dtype``: the dtype the base was loaded in before quantizing
    (None: the compute dtype, as qwentune's trainer loads it); ``skip_modules``: ``llm_int8_skip_modules`` used in
    training (None: qwentune's, `shapes.quant_skip_modules`)."""

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    blocksize: int = 64
    load_dtype: str | None = None
    skip_modules: tuple[str, ...] | None = None

    _KEYS = ("bits", "quant_type", "double_quant", "compute_dtype", "blocksize", "load_dtype", "skip_modules")

    @classmethod
    def from_section(cls, section: QuantSection) -> QuantSpec:
        """The recipe's `peft.quant` (already validated by the recipe schema)."""
        return cls(section.bits, section.quant_type, section.double_quant, section.compute_dtype)

    @classmethod
    def for_peft(cls, peft: PeftSection) -> QuantSpec | None:
        """The 4-bit settings a recipe trains with: its `peft.quant` for QLoRA, None for LoRA."""
        return cls.from_section(peft.quant) if peft.method == "qlora" else None

    def bnb_config(self, skip_modules: list[str] | None):
        """The `transformers.BitsAndBytesConfig` that loads a base quantized with these settings."""
        from transformers import BitsAndBytesConfig

        compute = self.compute_torch_dtype
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=compute,  # lets FSDP shard the packed 4-bit weights alongside the bf16 ones
            llm_int8_skip_modules=skip_modules,
        )

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
        compute_dtype = dtype_name(data.get("compute_dtype", "bfloat16"), where=f"{where}.compute_dtype")
        load_dtype = data.get("load_dtype")
        if load_dtype is not None:
            load_dtype = dtype_name(load_dtype, where=f"{where}.load_dtype")
        blocksize = data.get("blocksize", 64)
        if not isinstance(blocksize, int) or blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise QwentuneError(f"blocksize={blocksize!r}", where=where, hint="bitsandbytes uses 64 by default")
        skip = data.get("skip_modules")
        if skip is not None:
            if not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) for s in skip):
                raise QwentuneError("skip_modules must be a list of module names", where=where)
            skip = tuple(skip)
        return cls(4, quant_type, double_quant, compute_dtype, blocksize, load_dtype, skip)

    @property
    def compute_torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.compute_dtype)

    @property
    def weights_dtype(self) -> Any:
        """The torch dtype the base weights had when bitsandbytes quantized them: ``load_dtype``, else the compute
        dtype (qwentune's trainer, like most QLoRA recipes, loads the base in the compute dtype)."""
        import torch

        return getattr(torch, self.load_dtype or self.compute_dtype)

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


def dtype_name(value: Any, *, where: str) -> str:
    """The canonical name (float32 | bfloat16 | float16) of a dtype given by name or as a torch dtype."""
    name = str(value).removeprefix("torch.") if isinstance(value, str) or type(value).__name__ == "dtype" else None
    if name in DTYPE_NAMES:
        return DTYPE_NAMES[name]
    raise QwentuneError(f"unknown dtype {value!r}", where=where, hint="use float32, bfloat16 or float16")


__all__ = ["DTYPE_NAMES", "QuantSpec", "dtype_name"]
