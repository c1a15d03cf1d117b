"""TEMPORARY private loader for `qwentune eval` (to be replaced by `qwentune/inference.py`, built on another branch,
which resolves a MODEL argument and loads model + tokenizer with the same semantics):

- a run dir (holds `recipe.yaml` and `merged/`) → its merged model;
- an adapter dir (holds `adapter_config.json`) → its base (the sidecar `qwentune_train.json`'s model_card.base, else
  the adapter's base_model_name_or_path) with the adapter applied, not merged; the sidecar's chat template is used;
- anything else → `qwentune.sources.resolve_model` (hub id, local dir, .gguf, offline:...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import QwentuneError

SIDECAR = "qwentune_train.json"


@dataclass
class LoadedModel:
    label: str  # what the user passed
    model: Any
    tokenizer: Any


def _adapter_base(adapter_dir: Path) -> tuple[str, str | None]:
    sidecar: dict = {}
    if (adapter_dir / SIDECAR).is_file():
        try:
            sidecar = json.loads((adapter_dir / SIDECAR).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise QwentuneError(f"not valid JSON: {exc}", where=str(adapter_dir / SIDECAR)) from None
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    base = (sidecar.get("model_card") or {}).get("base") or config.get("base_model_name_or_path")
    if not base:
        raise QwentuneError("the adapter names no base model", where=str(adapter_dir), hint="merge it with --base")
    return str(base), sidecar.get("chat_template")


def model_path(spec: str) -> Path:
    """The directory a non-adapter MODEL argument loads from (resolving hub ids, .gguf and offline: sources)."""
    from .sources import resolve_model

    path = Path(spec).expanduser()
    if path.is_dir() and (path / "recipe.yaml").is_file():
        if not (path / "merged").is_dir():
            raise QwentuneError("this run dir has no merged/ model", where=spec, hint="pass its adapter/ dir instead")
        return path / "merged"
    return resolve_model(spec, progress=False).path


def load_model(spec: str, *, dtype: Any = None) -> LoadedModel:
    """Model (eval mode) and tokenizer for a MODEL argument; fp32 on CPU, bf16 on GPU unless `dtype` is given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    path = Path(spec).expanduser()
    try:
        if path.is_dir() and (path / "adapter_config.json").is_file():
            from peft import PeftModel

            base, template = _adapter_base(path)
            base_dir = model_path(base)
            tokenizer = AutoTokenizer.from_pretrained(base_dir)
            if template:
                tokenizer.chat_template = template
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
            model = PeftModel.from_pretrained(model, path)
        else:
            directory = model_path(spec)
            tokenizer = AutoTokenizer.from_pretrained(directory)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except QwentuneError:
        raise
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QwentuneError(f"cannot load the model: {first}", where=spec) from None
    return LoadedModel(spec, model.to(device).eval(), tokenizer)


def check_models(specs: list[str]) -> None:
    """Resolve every MODEL argument before any is loaded, so a bad one fails before minutes of scoring."""
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir() and (path / "adapter_config.json").is_file():
            model_path(_adapter_base(path)[0])
        else:
            model_path(spec)


__all__ = ["LoadedModel", "check_models", "load_model", "model_path"]
