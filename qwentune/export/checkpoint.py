"""Reading a base model directory: its config, its dtype, the model class, a meta-device skeleton."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import QwentuneError
from .quant import DTYPES


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QwentuneError(f"cannot read JSON: {exc}", where=str(path)) from exc
    if not isinstance(data, dict):
        raise QwentuneError("expected a JSON object", where=str(path))
    return data


def config_dtype(cfg: dict) -> torch.dtype:
    for holder in (cfg, cfg.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            value = holder.get(key)
            if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
                return DTYPES[value.removeprefix("torch.")]
    return torch.float32


def text_config(cfg: dict) -> dict:
    return cfg.get("text_config") or cfg


def untie_config_dict(cfg: dict) -> None:
    cfg["tie_word_embeddings"] = False
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"]["tie_word_embeddings"] = False


def model_class(config: Any):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def load_model(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_class(config).from_pretrained(path, dtype=dtype)


def meta_skeleton(base_dir: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    cls = model_class(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    return model
