"""Test helpers: the real Qwen2.5 tokenizer with a packaged template, and tiny random Qwen models saved as local
model directories that every part of qwentune can load as a model source.

Import from tests as `from tiny_models import tokenizer, tiny_model_dir` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "tests" / "assets" / "qwen2.5-tokenizer"
TEMPLATES_DIR = ROOT / "qwentune" / "templates"
TEMPLATE_NAMES = ("qwen2.5-instruct", "qwen2.5-base", "qwen2-instruct", "qwen2-vl-instruct")

# The official Qwen2-VL image processor settings (preprocessor_config.json of Qwen/Qwen2-VL-2B-Instruct).
QWEN2_VL_PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "rescale_factor": 0.00392156862745098,
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
}


def tiny_training(**overrides: Any) -> dict:
    """The `training` section of the test recipes: fp32, no checkpointing, constant LR without warmup, a log line
    per step, seed 0 — deterministic and quick on a tiny model; `overrides` replace or add keys."""
    return {
        "learning_rate": 1e-3,
        "max_steps": 2,
        "per_device_batch_size": 2,
        "grad_accum": 1,
        "precision": "fp32",
        "gradient_checkpointing": False,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "seed": 0,
        **overrides,
    }


def template_text(name: str) -> str:
    """The packaged official chat template `name` (one of TEMPLATE_NAMES)."""
    path = TEMPLATES_DIR / f"{name}.jinja"
    if not path.is_file():
        raise KeyError(f"no packaged template '{name}'; known: {', '.join(TEMPLATE_NAMES)}")
    return path.read_text()


def tokenizer(template_name: str | None = "qwen2.5-instruct"):
    """A fresh real Qwen2.5 tokenizer (151,936 ids, no BOS, eos <|im_end|>) with the packaged template set as its
    chat_template (None: no template). About 0.8 s; use `shared_tokenizer` when the test does not modify it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.chat_template = template_text(template_name) if template_name else None
    return tok


@functools.cache
def shared_tokenizer(template_name: str | None = "qwen2.5-instruct"):
    """Like `tokenizer`, but one instance per template for the whole session: do not modify it."""
    return tokenizer(template_name)


@functools.lru_cache(maxsize=1)
def _build_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="qwentune-tiny-models-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.cache
def _built(name: str, template: str | None, seed: int, frozen_kwargs: tuple[tuple[str, Any], ...]) -> Path:
    """Build one tiny model directory per distinct request, once per session."""
    from qwentune.model.shapes import build_model, generation_config, shape, tiny_config

    facts = shape(name)
    out = _build_root() / f"{name}-{len(list(_build_root().iterdir()))}"
    config = tiny_config(name, **dict(frozen_kwargs))
    model = build_model(config, seed=seed)
    model.generation_config = generation_config(name)
    model.save_pretrained(out)
    tok = tokenizer(template or facts["template"])
    if facts["template"] == "qwen2.5-base":  # the official base tokenizer ends text with <|endoftext|>
        tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(out)
    if facts["model_type"] == "qwen2_vl":
        (out / "preprocessor_config.json").write_text(json.dumps(QWEN2_VL_PREPROCESSOR, indent=2) + "\n")
    return out


def tiny_model_dir(
    tmp_path: Path,
    name: str = "qwen2.5-0.5b-instruct",
    *,
    template: str | None = None,
    seed: int = 0,
    **tiny_kwargs: Any,
) -> Path:
    """A local HF model directory `tmp_path/tiny-<name>` holding a tiny random model with the structure of `name`
    (see qwentune.model.shapes.tiny_config; kwargs go there), the real tokenizer, the official template for that model
    (or `template`), and its generation_config. Built once per session per arguments, then copied (~40 MB)."""
    built = _built(name, template, seed, tuple(sorted(tiny_kwargs.items())))
    target = Path(tmp_path) / f"tiny-{name}"
    shutil.copytree(built, target)
    return target
