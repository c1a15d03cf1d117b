"""Resume after preemption: checkpoints on SIGTERM/SIGINT, and `training.resume` continuing from the newest complete
checkpoint of the run dir — refused when the recipe changed. Used by sft.py and dpo.py around `trainer.train()`."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..errors import QwentuneError
from ..files import atomic_write_json, atomic_write_text, public_tree
from ..logs import is_main_process, log
from ..recipe import Recipe, dump_recipe
from .metrics import read_metrics
from .rundir import run_dir_for, run_state

# may differ between the first run and its resumption; output.dir: the recorded recipe is read from the run dir
# itself, so a run dir that was moved (another absolute path) is still the same run
RESUME_IGNORED = ("training.resume", "output.overwrite", "output.dir")
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")
COMPLETE_MARKER = "qwentune-complete.json"  # written last, by CheckpointMarker: the checkpoint is whole


class TrainingInterrupted(QwentuneError):
    """SIGTERM / SIGINT during training: the step finished, a checkpoint was saved, the run stops unfinished."""

    def __init__(self, message: str, *, signum: int, **kwargs):
        super().__init__(message, **kwargs)
        self.exit_code = 128 + signum


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


def _step(checkpoint: Path) -> int:
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
        and marker.get("step") == _step(checkpoint)
        and all((checkpoint / name).is_file() for name in CHECKPOINT_FILES)
    )


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete `checkpoints/checkpoint-N`; newer incomplete ones are skipped with a note."""
    found = sorted(
        (d for d in (run_dir / "checkpoints").glob("checkpoint-*") if d.name.rsplit("-", 1)[-1].isdigit()),
        key=_step,
        reverse=True,
    )
    for checkpoint in found:
        if is_complete(checkpoint):
            return checkpoint
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


class GracefulStop(TrainerCallback):
    """On SIGTERM or SIGINT: finish the current optimizer step, save a checkpoint, stop. All processes agree on the
    step (the flag is all-reduced), so DDP ranks never wait on each other. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self.stopped_at: int | None = None

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint")

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _agreed_signal(self) -> int:
        import torch
        import torch.distributed as dist

        signum = self.signum or 0
        if dist.is_available() and dist.is_initialized():
            device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([signum], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum

    def on_step_end(self, args, state, control, **kwargs):
        signum = self._agreed_signal()
        if signum:
            self.signum = signum
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True


def _trim_metrics(run_dir: Path, step: int) -> None:
    """Log lines after the checkpoint's step are logged again by the resumed run: drop them."""
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    if (run_dir / "metrics.jsonl").exists():
        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def train_until_stopped(trainer, recipe: Recipe, run_dir: Path, checkpoint: Path | None):
    """`trainer.train()`, resumed from `checkpoint` when given, stopping cleanly on SIGTERM/SIGINT (then raises
    TrainingInterrupted, which says how to resume)."""
    stop = GracefulStop()
    trainer.add_callback(stop)
    trainer.add_callback(CheckpointMarker())
    if checkpoint is not None and is_main_process():
        _trim_metrics(run_dir, _step(checkpoint))
    with stop.installed():
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if stop.stopped_at is None:
        return output
    trainer.accelerator.wait_for_everyone()
    name = signal.Signals(stop.signum).name
    command = f"qwentune train {recipe.path or 'RECIPE'} [the same overrides] --resume"
    raise TrainingInterrupted(
        f"{name}: stopped after step {stop.stopped_at}; checkpoint saved in "
        f"{run_dir / 'checkpoints' / f'checkpoint-{stop.stopped_at}'}",
        signum=stop.signum,
        where=str(run_dir),
        hint=f"resume with: {command} (notebooks: qwentune.train(recipe, ['training.resume=true']))",
    )
