"""The notebook API: each step callable alone, the same functions the CLI calls."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import QwentuneError
from .recipe import Recipe, load_recipe

if TYPE_CHECKING:
    from .run import TrainResult


def _recipe(recipe: Recipe | str | Path | dict, overrides=None) -> Recipe:
    return (
        recipe
        if isinstance(recipe, Recipe) and not overrides
        else load_recipe(recipe.to_dict() if isinstance(recipe, Recipe) else recipe, overrides)
    )


def load_model_tokenizer(recipe: Recipe):
    """The tokenizer of the recipe's model source (no weights loaded)."""
    from .inputs import prepare_inputs

    return prepare_inputs(recipe, data=False).tokenizer


def prepare(recipe: Recipe | str | Path | dict, overrides=None, *, limit: int | None = None):
    """Render and mask the recipe's data: PreparedData(train, eval, reports, template)."""
    from .inputs import prepare_inputs

    if limit is not None and limit < 1:
        raise QwentuneError(f"{limit} is not a valid limit (must be ≥ 1, or None for every row)", where="limit")
    return prepare_inputs(_recipe(recipe, overrides), limit=limit).data


def preprocess(
    recipe: Recipe | str | Path | dict, output: str | Path, overrides=None, *, limit: int | None = None
) -> int:
    """Write the rows training will see as jsonl (atomically); returns the number of rows written."""
    from .runinfo import public_mode
    from .vision import IMAGE_COLUMNS

    recipe = _recipe(recipe, overrides)
    output = Path(output)
    if output.is_dir():
        raise QwentuneError("is a directory", where=f"--output {output}", hint="name a .jsonl file, e.g. rows.jsonl")
    data = prepare(recipe, limit=limit)
    columns = [c for c in data.train.column_names if c.endswith("input_ids") or c in ("labels", *IMAGE_COLUMNS)]
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    except OSError as e:
        raise QwentuneError(
            f"cannot write here: {e.strerror or e}", where=f"--output {output}", hint="pick a writable path"
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in data.train.select_columns(columns):
                f.write(json.dumps(row) + "\n")
        public_mode(Path(tmp))  # mkstemp makes 0600: the output gets the mode an ordinary create would
        os.replace(tmp, output)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise QwentuneError(f"cannot write: {e.strerror or e}", where=f"--output {output}") from None
        raise
    return len(data.train)


def preview(recipe: Recipe | str | Path | dict, overrides=None, *, rows: int = 3, color: bool = False) -> str:
    """Tokens of the first rows with the trained ones highlighted, the data report, and the special tokens in trained
    labels with those whose rows look untrained flagged (read from the embedding tensors only, no model load)."""
    from .highlight import preview as render_preview
    from .inputs import prepare_inputs
    from .tokens import flagged_in_model_files

    recipe = _recipe(recipe, overrides)
    source, tokenizer, images, _ = prepare_inputs(recipe, data=False)
    flagged = flagged_in_model_files(source.path, tokenizer)
    return render_preview(recipe, tokenizer, rows=rows, color=color, flagged=flagged, images=images)


def train(recipe: Recipe | str | Path | dict, overrides=None) -> TrainResult:
    """Run the recipe's method (sft or dpo) end to end: adapter, metrics, merged model."""
    from .logs import is_main_process
    from .runinfo import owned_run_dir, run_dir_for, run_state

    recipe = _recipe(recipe, overrides)
    run_dir = run_dir_for(recipe)
    with owned_run_dir(run_dir, is_main=is_main_process()):  # one process per run dir
        if recipe.training.resume and run_state(run_dir) == "trained":  # killed after training, e.g. in the merge
            from .run import finish_trained_run

            return finish_trained_run(recipe)
        if recipe.method == "dpo":
            from .dpo import train_dpo

            return train_dpo(recipe)
        from .sft import train_sft

        return train_sft(recipe)


def merge(adapter_dir: str | Path, output: str | Path, *, base: str | None = None, **kwargs):
    """Merge an adapter into its base (shard by shard) with a parity check; returns MergeResult."""
    from .export import merge_adapter

    return merge_adapter(Path(adapter_dir), Path(output), base=base, **kwargs)


__all__ = ["load_recipe", "prepare", "preprocess", "preview", "train", "merge"]
