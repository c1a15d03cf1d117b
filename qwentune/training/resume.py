"""Resume after preemption: checkpoints marked complete once saved, and `training.resume` continuing from the newest
complete checkpoint of the run dir — refused when the recipe changed. (Stopping on SIGTERM/SIGINT: stopping.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..errors import QwentuneError
from ..files import atomic_write_json, atomic_write_text, public_tree
from ..logs import log
from ..recipe import Recipe, dump_recipe
from .metrics import read_metrics
from .rundir import run_dir_for, run_state

# may differ between the first run and its resumption; output.dir: the recorded recipe is read from the run dir
# itself, so a run dir that was moved (another absolute path) is still the same run
RESUME_IGNORED = ("training.resume", "output.overwrite", "output.dir")
CHECKPOINT_FILES = ("scheduler.pt", "trainer_state.json")  # and the adapter's and the optimizer's state
MODEL_FILES = ("adapter_model.safetensors", "pytorch_model_fsdp_0/.metadata")  # the second: FSDP's sharded state
COMPLETE_MARKER = "qwentune-complete.json"  # written last, by CheckpointMarker: the checkpoint is whole


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def recipe_changes(recorded_yaml: str, recipe: Recipe) -> list[str]:
    """`key: old → new` for every recipe key that differs from the recorded recipe.yaml (resume keys ignored)."""
    import yaml

    old, new = _flatten(yaml.safe_load(recorded_yaml) or {}), _flatten(yaml.safe_load(dump_recipe(recipe)))
    return [
        f"  {key}: {old.get(key, '(absent)')!r} → {new.get(key, '(absent)')!r}"
        for key in sorted(set(old) | set(new))
        if key not in RESUME_IGNORED and old.get(key) != new.get(key)
    ]


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[-1])


def is_complete(checkpoint: Path) -> bool:
    """Written in full: the marker CheckpointMarker writes after Trainer saved everything names this step. A
    checkpoint without it (killed mid-save, or saved by a qwentune before the marker existed) is not used."""
    try:
        marker = json.loads((checkpoint / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("step") == checkpoint_step(checkpoint)
        and all((checkpoint / name).is_file() for name in CHECKPOINT_FILES)
        and any((checkpoint / name).is_file() for name in MODEL_FILES)
        and optimizer_saved(checkpoint)
    )


def optimizer_saved(checkpoint: Path) -> bool:
    """Trainer's optimizer.pt, under FSDP's sharded state dict `optimizer_0/` (a torch.distributed.checkpoint dir: its
    `.metadata` is written last), or under DeepSpeed its own layout: `latest` names a dir (global_stepN) holding each
    process's `*optim_states.pt`."""
    if (checkpoint / "optimizer.pt").is_file() or (checkpoint / "optimizer_0" / ".metadata").is_file():
        return True
    try:
        tag = (checkpoint / "latest").read_text(encoding="utf-8").strip()
    except OSError:
        return False
    return bool(tag) and any((checkpoint / tag).glob("*optim_states.pt"))


def latest_checkpoint(run_dir: Path, *, note: bool = True) -> Path | None:
    """The newest complete `checkpoints/checkpoint-N`; newer incomplete ones are skipped (with a note)."""
    found = sorted(
        (d for d in (run_dir / "checkpoints").glob("checkpoint-*") if d.name.rsplit("-", 1)[-1].isdigit()),
        key=checkpoint_step,
        reverse=True,
    )
    for checkpoint in found:
        if is_complete(checkpoint):
            return checkpoint
        if note:
            log(f"{checkpoint}: skipped, it was not saved completely (no {COMPLETE_MARKER}: killed while saving?)")
    return None


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once Trainer has written all of it (on_save runs after model, optimizer,
    scheduler and trainer_state.json are on disk): `checkpoint-N/qwentune-complete.json`, atomically, main process.
    Its files get the umask's modes first (`public_tree`)."""

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's files (rng state) are written before the marker says so
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                public_tree(checkpoint)  # Trainer's adapter_model.safetensors is 0600: umask modes first
                atomic_write_json(checkpoint / COMPLETE_MARKER, {"step": state.global_step})


def check_same_recipe(recipe: Recipe, run_dir: Path) -> None:
    """Refuse to continue a run dir that was started with another recipe (resume keys aside), naming what changed."""
    recorded = run_dir / "recipe.yaml"
    if recorded.is_file():
        changes = recipe_changes(recorded.read_text(encoding="utf-8"), recipe)
        if changes:
            raise QwentuneError(
                "cannot resume: the recipe differs from the one this run dir was started with:\n" + "\n".join(changes),
                where=str(recorded),
                hint="resume with the same recipe and overrides, or start a new run in another output.dir",
            )


def resume_checkpoint(recipe: Recipe) -> Path | None:
    """With `training.resume`: the checkpoint to continue from (None: the run dir has none yet, start at step 0).
    Call it before `prepare_run_dir` records the new recipe: a run dir started with another recipe is refused.
    (A run whose training ended but whose merge did not is finished by `run.finish_trained_run` instead.)"""
    run_dir = run_dir_for(recipe)
    if not recipe.training.resume:
        if not run_state(run_dir) and latest_checkpoint(run_dir):
            log(f"{run_dir} holds checkpoints of an unfinished run; starting over (continue it with --resume)")
        return None
    if run_state(run_dir):
        raise QwentuneError(
            "run dir already holds a finished run: nothing to resume",
            where=str(run_dir),
            hint="drop --resume, and pick another output.dir or set output.overwrite=true",
        )
    check_same_recipe(recipe, run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint:
        log(f"resuming from {checkpoint}")
    elif list((run_dir / "checkpoints").glob("checkpoint-*")):
        log(
            f"no complete checkpoint in {run_dir} (checkpoints saved by a qwentune older than {COMPLETE_MARKER}, "
            "or killed while saving, cannot be resumed): starting at step 0"
        )
    else:
        log(f"no checkpoint in {run_dir}: starting at step 0")
    return checkpoint


def trim_metrics(run_dir: Path, step: int) -> None:
    """Log lines after the checkpoint's step are logged again by the resumed run: drop them."""
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    if (run_dir / "metrics.jsonl").exists():
        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
