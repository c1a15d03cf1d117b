"""`qwentune validate`: everything that can be checked before any weights load."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BadRow, QwentuneError, read_json_file
from ..model import is_vl
from ..recipe import Recipe, load_recipe, resolve_path

SAMPLE_ROWS = 5


def _source_line(recipe: Recipe) -> tuple[str, Path | None]:
    """What the model source is, and its local dir when one exists already (for the template check)."""
    from ..model import classify_source, describe_source

    kind, payload = classify_source(recipe.model.source)
    if kind == "hub" and os.environ.get("HF_HUB_OFFLINE"):
        return f"Hugging Face Hub model {payload} (HF_HUB_OFFLINE is set: not checked)", None
    return describe_source(recipe.model.source), Path(payload) if kind == "local" else None


def _template(recipe: Recipe, model_dir: Path | None):
    """The recipe's template, or None when it is the model's own and the model is not on disk yet."""
    from ..rows import load_template

    spec = recipe.data.template
    if spec == "model":
        if model_dir is None:
            return None
        from ..model import load_tokenizer

        return load_template(spec, load_tokenizer(model_dir, recipe.model))
    return load_template(str(_template_path(recipe, spec)), None)


def _template_path(recipe: Recipe, spec: str) -> str | Path:
    from ..recipe import resolve_path
    from ..rows import BUILTIN_TEMPLATES

    return spec if spec in BUILTIN_TEMPLATES else resolve_path(recipe, spec)


def _data_lines(recipe: Recipe, template) -> list[str]:
    """Every data source exists, its format is detected, and its first rows convert to canonical rows."""
    import json

    from ..data import read_source, resolve_sources, take_rows
    from ..rows import convert, detect_source_format, has_images, needs_tools, row_images

    lines = []
    for which in ("train", "eval"):
        for source in resolve_sources(recipe.data, recipe.base_dir, which):
            read = read_source(source, streaming=recipe.data.streaming)  # a streamed hub dataset: its first rows
            sample = [text for _, text in take_rows(read, SAMPLE_ROWS) if text is not None]
            texts = [text for text in sample if isinstance(text, str)]  # not bad lines (bad_encoding, csv_malformed)
            rows = []
            for text in sample:
                try:
                    rows.append(json.loads(text) if isinstance(text, str) else None)
                except json.JSONDecodeError:
                    rows.append(None)
            if not rows:
                raise QwentuneError(f"{source.label} has no rows", where=source.key, hint="check the file")
            forced = source.format or recipe.data.format
            fmt = detect_source_format(texts, forced, label=source.label, where=source.key)
            good = images = 0
            for i, raw in enumerate(rows):
                try:
                    row = convert(raw, fmt, arrow=source.arrow) if raw is not None else None
                    if row is not None and has_images(row):  # the files exist and open (relative to the data file)
                        images += len(row_images(row, source.base_dir))
                except BadRow:
                    continue
                good += row is not None
                if row is not None and template is not None and not template.supports_tools and needs_tools(row):
                    raise QwentuneError(
                        f"row {i} of {source.label} has tools or tool calls, but template {template.name} has no "
                        "tool support",
                        where=source.key,
                        hint="use a Qwen2.5 template/model for tool calling, or data without tools",
                    )
            shown = f", {images} images open" if images else ""
            lines.append(f"{source.key}: {source.label} ({fmt}; {good}/{len(rows)} sample rows convert{shown})")
            if not good:
                raise QwentuneError(
                    f"none of the first {len(rows)} rows of {source.label} convert as {fmt}",
                    where=source.key,
                    hint="run `qwentune preview` to see why",
                )
    return lines


def _combination_lines(recipe: Recipe) -> list[str]:
    """Combinations that cannot work, refused before anything loads."""
    lines = []
    if recipe.method == "dpo":
        from .dpo import check_dpo_recipe

        check_dpo_recipe(recipe, str(recipe.path or "recipe"), adapter_made_later=True)  # checked again at setup
        lines.append(f"dpo: loss {'+'.join(recipe.dpo.loss_type)}, beta {recipe.dpo.beta}")
    if recipe.method == "grpo":
        from .grpo import check_grpo_recipe

        g = recipe.grpo
        check_grpo_recipe(recipe, str(recipe.path or "recipe"), adapter_made_later=True)  # Python rewards: at setup
        rewards = " + ".join(f"{w}×{n}" for n, w in g.rewards.items())
        lines.append(f"grpo: rewards {rewards}, {g.num_generations} generations, loss {g.loss_type}, beta {g.beta}")
    adapter = recipe.model.adapter if recipe.method in ("dpo", "grpo") else None
    if adapter is not None and not resolve_path(recipe, adapter).exists():
        lines.append(f"note: model.adapter {adapter} is not there yet (train the run that makes it)")
    if recipe.trainer:
        config = {"sft": "SFTConfig", "dpo": "DPOConfig", "grpo": "GRPOConfig"}[recipe.method]
        lines.append(f"trainer: {', '.join(f'{k}={v!r}' for k, v in recipe.trainer.items())} (passed to TRL {config})")
    if recipe.peft.method == "qlora" and recipe.peft.use_dora:
        lines.append("note: DoRA on a 4-bit base merges only through the in-memory path")
    return lines


def _vision_lines(recipe: Recipe, model_dir: Path | None) -> list[str]:
    """`peft.train_vision` needs a Qwen2-VL model: checked here when the model is on disk already."""
    config = model_dir / "config.json" if model_dir is not None else None
    if config is None or not config.is_file():
        return []
    from ..model import check_train_vision

    config_data = read_json_file(config, hint="the model dir is damaged: download or save it again")
    if not isinstance(config_data, dict):
        raise QwentuneError("config.json must hold a JSON object", where=str(config), hint="the model dir is damaged")
    _check_context(recipe, config_data)
    model_type = config_data.get("model_type", "?")
    check_train_vision(recipe.peft.train_vision, model_type, where=str(recipe.path or "recipe"))
    if not is_vl(model_type):
        return []
    return [f"vision: train_vision {recipe.peft.train_vision}"]


def _check_context(recipe: Recipe, config: dict) -> None:
    """data.max_length within the model's context: max_position_embeddings, times a rope_scaling factor if any."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    positions = text.get("max_position_embeddings", config.get("max_position_embeddings"))
    scaling = text.get("rope_scaling") or config.get("rope_scaling") or {}
    factor = scaling.get("factor", 1) if isinstance(scaling, dict) else 1
    if not isinstance(positions, int) or not isinstance(factor, (int, float)) or factor < 1:
        return
    limit = int(positions * factor)
    if recipe.data.max_length > limit:
        raise QwentuneError(
            f"'data.max_length' ({recipe.data.max_length}) is above the model's context of {limit} tokens "
            "(max_position_embeddings" + (f" × rope_scaling factor {factor})" if factor != 1 else ")"),
            where=str(recipe.path or "recipe"),
            hint=f"set data.max_length ≤ {limit}",
        )


def validate_recipe(path: str | Path, overrides: list[str] | None = None) -> list[str]:
    """Check one recipe; returns the lines to print, raises QwentuneError on the first problem."""
    recipe = load_recipe(path, overrides)
    source, model_dir = _source_line(recipe)
    lines = [f"{path}: ok", f"  model: {source}", f"  method: {recipe.method} with {recipe.peft.method}"]
    template = _template(recipe, model_dir)
    if template is None:
        lines.append("  template: the model's own (read when the model is resolved)")
    else:
        lines.append(f"  template: {template.name} ({'with' if template.supports_tools else 'no'} tool support)")
    lines += ["  " + line for line in _data_lines(recipe, template)]
    lines += ["  " + line for line in _combination_lines(recipe)]
    lines += ["  " + line for line in _vision_lines(recipe, model_dir)]
    return lines
