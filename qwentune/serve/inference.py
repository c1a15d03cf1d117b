"""Open what a user trained, for inference: a run dir, an adapter dir, a merged or local model dir, or any model
source the resolver takes (hub id, `.gguf`, `offline:…`). The one loader of `qwentune chat` and `qwentune eval`.

* run dir (holds `merged/` or `adapter/`): its `merged/` model; without one, its `adapter/` on its base.
* adapter dir (`adapter_config.json`): its base plus the adapter through PEFT, not merged. The base is the training
  sidecar `qwentune_train.json`'s `base_model` (as the user wrote it; what training records), else its
  `model_card.base` (a sidecar written by hand or another tool), else `adapter_config.json`'s
  `base_model_name_or_path` (PEFT records the path the base was loaded from, often a machine path).
* anything else goes to `sources.resolve_model`.

The chat template is the one the model was trained with: the adapter sidecar's, else the saved tokenizer's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import QwentuneError
from ..export import read_train_sidecar
from ..model import ACCEPTED_FORMS, is_vision_model, resolve_model

SIDECAR = "qwentune_train.json"
TRAINED_FORMS = f"a training run dir, an adapter dir, or {ACCEPTED_FORMS}"


@dataclass(frozen=True)
class Trained:
    """What `spec` names, resolved to local dirs (nothing loaded yet)."""

    spec: str  # what the user wrote
    kind: str  # "run-merged" | "run-adapter" | "adapter" | "model"
    model_path: Path  # the dir from_pretrained loads: merged/model dir, or the base dir under an adapter
    base: str | None  # adapters: the base as the user wrote it (hub id, offline:…, path)
    adapter_path: Path | None  # adapters: the PEFT adapter dir
    template: str | None  # chat template text the model was trained with (None: the tokenizer has none)
    tokenizer_path: Path  # where the tokenizer is read from

    @property
    def is_vision(self) -> bool:
        return is_vision_model(self.model_path)


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def is_run_dir(path: Path) -> bool:
    return _is_model_dir(path / "merged") or _is_adapter_dir(path / "adapter")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QwentuneError(f"cannot read: {exc}", where=str(path)) from exc
    if not isinstance(data, dict):
        raise QwentuneError("expected a JSON object", where=str(path))
    return data


def _saved_template(model_dir: Path) -> str | None:
    """The chat template saved with a tokenizer (chat_template.jinja, or tokenizer_config.json's), read as text."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        text = _read_json(config).get("chat_template")
        if isinstance(text, str):
            return text
        if isinstance(text, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
            return named.get("default")
    return None


def adapter_base(adapter_dir: Path) -> tuple[str, Path]:
    """(base as the user wrote it, its local dir) for an adapter dir: the sidecar's `base_model` (its recorded
    `base_path` when that dir still exists, so a hub base is not looked up again), else the sidecar's
    `model_card.base`, else adapter_config.json's `base_model_name_or_path`."""
    sidecar = _read_json(adapter_dir / SIDECAR) if (adapter_dir / SIDECAR).is_file() else {}
    card = sidecar.get("model_card") if isinstance(sidecar.get("model_card"), dict) else {}
    base = (
        sidecar.get("base_model")
        or card.get("base")
        or _read_json(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
    )
    if not base:
        raise QwentuneError(
            "the adapter names no base model (no base_model in qwentune_train.json, none in adapter_config.json)",
            where=str(adapter_dir),
            hint="point at the training run dir, or at a merged model dir",
        )
    recorded = sidecar.get("base_path")
    if recorded and _is_model_dir(Path(recorded)):
        return str(base), Path(recorded)
    return str(base), resolve_model(str(base)).path


def resolve_trained(spec: str | Path) -> Trained:
    """What `spec` names (see the module docstring). Bad input: QwentuneError naming the path."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir() and not _is_model_dir(path) and not _is_adapter_dir(path):
        if _is_model_dir(path / "merged"):
            return _model(text, path / "merged", kind="run-merged")
        if _is_adapter_dir(path / "adapter"):
            return _adapter(text, path / "adapter", kind="run-adapter")
        raise QwentuneError(
            "not a model: no config.json, no adapter_config.json, and no merged/ or adapter/ of a run",
            where=text,
            hint=f"pass {TRAINED_FORMS}",
        )
    if path.is_dir() and _is_adapter_dir(path) and not _is_model_dir(path):
        return _adapter(text, path, kind="adapter")
    return _model(text, resolve_model(text).path, kind="model")


def _model(spec: str, model_dir: Path, *, kind: str) -> Trained:
    return Trained(spec, kind, model_dir, None, None, _saved_template(model_dir), model_dir)


def _adapter(spec: str, adapter_dir: Path, *, kind: str) -> Trained:
    base, base_dir = adapter_base(adapter_dir)
    template = read_train_sidecar(adapter_dir).get("chat_template") or _saved_template(adapter_dir)
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer_path = adapter_dir if has_tokenizer else base_dir
    return Trained(spec, kind, base_dir, base, adapter_dir, template or _saved_template(base_dir), tokenizer_path)


def default_dtype() -> Any:
    """bf16 where a GPU is, fp32 on CPU (bf16 matmuls on CPU are slow and round the logits)."""
    import torch

    return "auto" if torch.cuda.is_available() else torch.float32


def load_for_inference(spec: str | Path | Trained, *, dtype: Any = None) -> tuple[Any, Any]:
    """(model in eval mode, on the GPU when there is one; tokenizer with the trained chat template).
    Qwen2-VL loads as AutoModelForImageTextToText; an adapter stays a PeftModel (not merged)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    trained = spec if isinstance(spec, Trained) else resolve_trained(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(trained.tokenizer_path)
        auto = AutoModelForImageTextToText if trained.is_vision else AutoModelForCausalLM
        model = auto.from_pretrained(trained.model_path, dtype=dtype if dtype is not None else default_dtype())
        if trained.adapter_path is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, trained.adapter_path)
    except (OSError, ValueError) as exc:  # a broken dir (missing weights, bad config): one line, not a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QwentuneError(f"cannot load the model: {first}", where=trained.spec) from None
    if trained.template is not None:
        tokenizer.chat_template = trained.template
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tokenizer
