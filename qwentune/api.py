"""The notebook API: each step callable alone, the same functions the CLI calls."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .recipe import Recipe, load_recipe

if TYPE_CHECKING:
    from .run import TrainResult


def _recipe(recipe: Recipe | str | Path | dict, overrides=None) -> Recipe:
    return (
        recipe
        if isinstance(recipe, Recipe) and not overrides
        else load_recipe(recipe.to_dict() if isinstance(recipe, Recipe) else recipe, overrides)
    )


def _source_and_tokenizer(recipe: Recipe):
    from .model import load_tokenizer
    from .sources import resolve_model

    source = resolve_model(
        recipe.model.source, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
    )
    return source, load_tokenizer(source.path, recipe)


def load_model_tokenizer(recipe: Recipe):
    """The tokenizer of the recipe's model source (no weights loaded)."""
    return _source_and_tokenizer(recipe)[1]


def prepare(recipe: Recipe | str | Path | dict, overrides=None, *, limit: int | None = None):
    """Render and mask the recipe's data: PreparedData(train, eval, reports, template)."""
    from .data import prepare_data
    from .vision import image_settings

    recipe = _recipe(recipe, overrides)
    source, tokenizer = _source_and_tokenizer(recipe)
    return prepare_data(recipe, tokenizer, limit=limit, images=image_settings(source.path, recipe, tokenizer))


def preprocess(
    recipe: Recipe | str | Path | dict, output: str | Path, overrides=None, *, limit: int | None = None
) -> int:
    """Write the rows training will see as jsonl (atomically); returns the number of rows written."""
    from .vision import IMAGE_COLUMNS

    recipe = _recipe(recipe, overrides)
    data = prepare(recipe, limit=limit)
    columns = [c for c in data.train.column_names if c.endswith("input_ids") or c in ("labels", *IMAGE_COLUMNS)]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in data.train.select_columns(columns):
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(data.train)


def preview(recipe: Recipe | str | Path | dict, overrides=None, *, rows: int = 3, color: bool = False) -> str:
    """Tokens of the first rows with the trained ones highlighted, the data report, and the special tokens in trained
    labels with those whose rows look untrained flagged (read from the embedding tensors only, no model load)."""
    from .highlight import preview as render_preview
    from .tokens import flagged_in_model_files
    from .vision import image_settings

    recipe = _recipe(recipe, overrides)
    source, tokenizer = _source_and_tokenizer(recipe)
    flagged = flagged_in_model_files(source.path, tokenizer)
    images = image_settings(source.path, recipe, tokenizer)
    return render_preview(recipe, tokenizer, rows=rows, color=color, flagged=flagged, images=images)


def train(recipe: Recipe | str | Path | dict, overrides=None) -> TrainResult:
    """Run the recipe's method (sft or dpo) end to end: adapter, metrics, merged model."""
    recipe = _recipe(recipe, overrides)
    if recipe.method == "dpo":
        from .dpo import train_dpo

        return train_dpo(recipe)
    from .sft import train_sft

    return train_sft(recipe)


def merge(adapter_dir: str | Path, output: str | Path, *, base: str | None = None, **kwargs):
    """Merge an adapter into its base (shard by shard) with a parity check; returns MergeResult."""
    from .export import merge_adapter

    return merge_adapter(Path(adapter_dir), Path(output), base=base, **kwargs)


def evaluate(models, data, **kwargs):
    """Score one or more models side by side on eval files (tool calls, BFCL, loss, preferences): EvalResult with
    .table(), .markdown(), .metrics, .rows; see `qwentune.evaluate.evaluate` for the keyword arguments."""
    from .evaluate import evaluate as run_eval

    return run_eval(models, data, **kwargs)


__all__ = ["load_recipe", "prepare", "preprocess", "preview", "train", "merge", "evaluate"]
