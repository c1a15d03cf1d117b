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
    from .training import Run, TrainResult


def _recipe(recipe: Recipe | str | Path | dict, overrides=None, train_data=None, eval_data=None) -> Recipe:
    """The recipe with its overrides; `train_data` / `eval_data` (a datasets.Dataset, a DatasetDict split or a list
    of row dicts) replace data.train / data.eval."""
    if isinstance(recipe, Recipe) and not overrides and train_data is None and eval_data is None:
        return recipe
    path = recipe.path if isinstance(recipe, Recipe) else None
    loaded = load_recipe(
        recipe.to_dict() if isinstance(recipe, Recipe) else recipe,
        overrides,
        train_data=train_data,
        eval_data=eval_data,
    )
    if path is not None:  # relative data paths keep resolving against the recipe file's dir
        loaded.path = path
    return loaded


def load_model_tokenizer(recipe: Recipe):
    """The tokenizer of the recipe's model source (no weights loaded)."""
    from .training import prepare_inputs

    return prepare_inputs(recipe, data=False).tokenizer


def prepare(
    recipe: Recipe | str | Path | dict,
    overrides=None,
    *,
    limit: int | None = None,
    train_data=None,
    eval_data=None,
):
    """Render and mask the recipe's data (or `train_data` / `eval_data` given in memory): PreparedData(train, eval,
    reports, template)."""
    from .quiet import quiet_library_noise
    from .training import prepare_inputs

    quiet_library_noise()
    if limit is not None and limit < 1:
        raise QwentuneError(f"{limit} is not a valid limit (must be ≥ 1, or None for every row)", where="limit")
    return prepare_inputs(_recipe(recipe, overrides, train_data, eval_data), limit=limit).data


def preprocess(
    recipe: Recipe | str | Path | dict, output: str | Path, overrides=None, *, limit: int | None = None
) -> int:
    """Write the rows training will see as jsonl (atomically); returns the number of rows written."""
    from .files import public_mode
    from .rows import IMAGE_COLUMNS

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


def preview(
    recipe: Recipe | str | Path | dict,
    overrides=None,
    *,
    rows: int = 3,
    color: bool = False,
    train_data=None,
    eval_data=None,
) -> str:
    """Tokens of the first rows with the trained ones highlighted, the data report, and the special tokens in trained
    labels with those whose rows look untrained flagged (read from the embedding tensors only, no model load)."""
    from .data import preview as render_preview
    from .model import flagged_in_model_files
    from .quiet import quiet_library_noise
    from .training import prepare_inputs

    quiet_library_noise()
    recipe = _recipe(recipe, overrides, train_data, eval_data)
    source, tokenizer, images, _ = prepare_inputs(recipe, data=False)
    flagged = flagged_in_model_files(source.path, tokenizer)
    return render_preview(recipe, tokenizer, rows=rows, color=color, flagged=flagged, images=images)


def setup(recipe: Recipe | str | Path | dict, overrides=None, *, train_data=None, eval_data=None, rewards=None) -> Run:
    """Everything before training, as objects: `run.trainer` (the configured TRL SFTTrainer / DPOTrainer /
    GRPOTrainer), `run.model`, `run.tokenizer`, `run.data`, `run.run_dir`, `run.recipe`. `run.train()` trains, saves,
    merges and reports (a TrainResult). The run dir is held until `train()` ends or `run.close()` (or `with ... as
    run:`). `rewards` (method grpo): {name: function(completion, reference, tools)} used where grpo.rewards names
    them (weight 1.0 where it does not), docs/grpo.md."""
    import contextlib

    from .logs import is_main_process
    from .quiet import quiet_library_noise
    from .training import owned_run_dir, run_dir_for

    quiet_library_noise()
    recipe = _recipe(recipe, overrides, train_data, eval_data)
    if rewards and recipe.method != "grpo":
        raise QwentuneError(f"rewards= is for method: grpo; this recipe's method is {recipe.method}", where="rewards")
    if rewards:  # a function passed from Python and not named in grpo.rewards counts with weight 1.0
        import dataclasses

        weights = {**recipe.grpo.rewards, **{n: 1.0 for n in rewards if n not in recipe.grpo.rewards}}
        recipe = dataclasses.replace(recipe, grpo=dataclasses.replace(recipe.grpo, rewards=weights))
    held = contextlib.ExitStack()
    try:
        held.enter_context(owned_run_dir(run_dir_for(recipe), is_main=is_main_process()))  # one process per dir
        if recipe.method == "dpo":
            from .training import setup_dpo

            return setup_dpo(recipe, held)
        if recipe.method == "grpo":
            from .training import setup_grpo

            return setup_grpo(recipe, held, rewards)
        from .training import setup_sft

        return setup_sft(recipe, held)
    except BaseException:
        held.close()
        raise


def train(
    recipe: Recipe | str | Path | dict, overrides=None, *, train_data=None, eval_data=None, rewards=None
) -> TrainResult:
    """Run the recipe's method (sft, dpo or grpo) end to end: adapter, metrics, merged model. `setup(...).train()`,
    except that `--resume` on a run killed after training (adapter/ saved, no metrics.json) finishes it without
    training. `rewards`: GRPO reward functions from Python (see `setup`)."""
    from .logs import is_main_process
    from .training import owned_run_dir, run_dir_for, run_state

    recipe = _recipe(recipe, overrides, train_data, eval_data)
    run_dir = run_dir_for(recipe)
    if recipe.training.resume and run_state(run_dir) == "trained":  # e.g. killed during the merge
        from .training import finish_trained_run

        with owned_run_dir(run_dir, is_main=is_main_process()):
            return finish_trained_run(recipe)
    return setup(recipe, rewards=rewards).train()


def merge(adapter_dir: str | Path, output: str | Path, *, base: str | None = None, **kwargs):
    """Merge an adapter into its base (shard by shard) with a parity check; returns MergeResult."""
    from .export import merge_adapter

    return merge_adapter(Path(adapter_dir), Path(output), base=base, **kwargs)


def export_gguf(
    model: str | Path,
    output: str | Path,
    *,
    type: str = "f16",
    ollama: bool = False,
    force: bool = False,
    check_data: list[str | Path] | str | Path | None = None,
    check_limit: int | None = None,
):
    """Write a GGUF (f16, bf16, q8_0; q4_k_m, q5_k_m, q6_k through llama.cpp's quantizer) for llama.cpp / Ollama from
    a merged dir, run dir or model source, verified against the source (logits, greedy tokens, tokenizer ids; greedy
    tokens in llama.cpp when installed); `ollama` also writes a Modelfile. `check_data`: eval files scored on the
    written file in llama.cpp's server next to the source (`check_limit` rows), into export_report.json and
    `report.extra["check_data"]`. Returns GgufReport."""
    from .serve import export_gguf as _export_gguf

    report = _export_gguf(model, output, type=type, ollama=ollama, force=force)
    if check_data is not None:
        from .eval import add_to_report, score_gguf

        data = [check_data] if isinstance(check_data, (str, Path)) else list(check_data)
        report.extra["check_data"] = score_gguf(report.path, report.source, data, limit=check_limit)
        add_to_report(report.path.parent / "export_report.json", report.extra["check_data"])
    return report


def evaluate(models, data, **kwargs):
    """Score one or more models side by side on eval files (tool calls, BFCL, loss, preferences): EvalResult with
    .table(), .markdown(), .metrics, .rows. `turns="all"` scores every assistant turn of a row with tools (one prompt
    per turn); `pairs="OUT.jsonl"` writes the model's misses on training rows as DPO pairs (`samples=K`,
    `temperature=T`, `seed=S` to sample more replies). A model may be an OpenAI-compatible server's URL
    (`http://127.0.0.1:8080/v1`, `served_model="NAME"` when it lists several): the same rows over its API, greedy.
    See `qwentune.eval.evaluation.evaluate` for every keyword."""
    from .eval import evaluate as run_eval

    return run_eval(models, data, **kwargs)


def start_server(model: str | Path, *, backend: str = "auto", host: str = "127.0.0.1", port: int = 8080,
                 wait: float = 600.0, log: str | Path | None = None, extra_args: tuple[str, ...] = ()):  # fmt: skip
    """`qwentune serve` from Python: start an existing OpenAI-compatible server for a run dir / merged dir
    (transformers serve, or vLLM where installed) or a .gguf (llama.cpp) and wait until it answers. Returns a
    RunningServer (.url, .model, .stop(); a context manager):
    `with qwentune.start_server(run_dir) as s: qwentune.evaluate([s.url], data)`.
    `log`: a file for the server's output (default: this process's)."""
    from .serve import plan_server
    from .serve import start_server as _start

    model = getattr(model, "run_dir", model)  # a TrainResult stands for its run dir (its merged/)
    plan = plan_server(model, backend=backend, host=host, port=port, extra_args=extra_args)
    return _start(plan, wait=wait, log=log)


__all__ = [
    "load_recipe",
    "prepare",
    "preprocess",
    "preview",
    "setup",
    "train",
    "merge",
    "evaluate",
    "export_gguf",
    "start_server",
]
