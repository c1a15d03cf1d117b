"""Stopping a run on SIGTERM or SIGINT (preemption, scancel, Ctrl-C) so that it can be resumed, within one step plus
a save. What a signal does depends on what runs when it arrives:

- a training step: the step finishes, a checkpoint is saved, the run exits: no evaluation, merge, sample, `eval:`,
  card or push follows (all processes agree on the step);
- an evaluation (eval loss before or after training, or at the last step): it stops at its next batch (all processes
  agree); after training the adapter is then saved, so `--resume` finishes the run without retraining. An
  evaluation in the middle of training (`training.eval_steps`) finishes, then a checkpoint is saved;
- the adapter save: it finishes first;
- the steps after training (merge, sample, `eval:`, card, push; main process): they stop at once, the adapter is
  already saved;
- a second signal, DUPLICATE_S or more after the first: stops at once, wherever the run is.

Every stop ends in one line, `TrainingInterrupted` (exit code 128 + the signal), naming what is resumable: the
checkpoint just saved, the newest complete one, or the saved adapter."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from .. import patches
from ..errors import QwentuneError
from ..logs import is_main_process, log
from ..recipe import Recipe
from .resume import CheckpointMarker, checkpoint_step, latest_checkpoint, trim_metrics
from .rundir import run_state

# One stop request can reach a rank twice within milliseconds: from the scheduler or the terminal (Slurm signals every
# process of the job step; Ctrl-C the whole process group) and again forwarded by the launcher (torchrun forwards
# what it receives). A signal this soon after the first is that same request, not a second one.
DUPLICATE_S = 2.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(QwentuneError):
    """A signal stopped the run; the message names what is resumable. Exit code 128 + the signal (143 SIGTERM)."""

    def __init__(self, message: str, *, signum: int, **kwargs):
        super().__init__(message, **kwargs)
        self.exit_code = 128 + signum


class StopNow(BaseException):
    """Leaves what runs now (a second signal, or a signal during the steps after training). A BaseException, so that
    no library's `except Exception` swallows it; `GracefulStop.guard` turns it into TrainingInterrupted."""


class EvaluationStopped(BaseException):
    """An evaluation stopped at a batch because of a signal (every process at the same batch)."""


class GracefulStop(TrainerCallback):
    """The signal handlers of one run (`guard`), what runs now (`during`), and the trainer callback that stops
    training and evaluation at a step or batch every process agrees on (the signal is all-reduced there)."""

    def __init__(self, recipe: Recipe, run_dir: Path):
        self.run_dir = run_dir
        self.command = f"qwentune train {recipe.path or 'RECIPE'} [the same overrides] --resume"
        self.signum: int | None = None  # the first signal
        self.first_at = 0.0
        self.again = False  # a second signal stopped the run at once
        self.leaving = False  # StopNow was raised: later signals change nothing
        self.phase = "the start of the run"  # what runs now, as the messages name it
        self.at_once = False  # a signal now stops at once (raises StopNow in the handler)
        self.stopped_at: int | None = None  # the step whose checkpoint the stop saved
        self.trained = False  # every training step ran
        self.cut: str | None = None  # what ran when the first signal came (or the evaluation it stopped)
        self.cut_again: str | None = None  # what ran when a second signal came

    # --- the handler ---------------------------------------------------------------------------------------------

    def _handle(self, signum, frame):
        if self.leaving:
            return
        if self.signum is not None:
            if time.monotonic() - self.first_at < DUPLICATE_S:
                return  # the same request, delivered twice
            self.again, self.leaving, self.cut_again = True, True, self.phase
            raise StopNow
        self._note(signum)
        if self.at_once:
            self.leaving = True
            raise StopNow
        name = signal.Signals(signum).name
        if self.cut == "training":
            log(f"{name}: finishing this step, then saving a checkpoint and exiting (no evaluation, merge or sample)")
        else:
            log(f"{name}: stopping {self.cut} at its next batch or save, then exiting")

    def _note(self, signum: int) -> None:
        self.signum, self.first_at = signum, time.monotonic()
        self.cut = "the end of training" if self.phase == "training" and self.trained else self.phase

    @contextlib.contextmanager
    def guard(self):
        """The handlers for the whole run (main thread only: signals reach no other); a StopNow from inside becomes
        TrainingInterrupted naming what is resumable. The previous handlers are back on exit."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        except (StopNow, EvaluationStopped):
            raise self.interrupted() from None
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def during(self, phase: str, *, at_once: bool = False):
        """`phase` runs inside (messages name it). `at_once`: a signal stops it at once (the steps after training,
        which write atomically and leave the saved adapter resumable); else at its next step, batch or save."""
        before = self.phase, self.at_once
        self.phase, self.at_once = phase, at_once
        try:
            if at_once and self.signum is not None:  # asked before it began
                self.leaving = True
                raise StopNow
            yield
        finally:
            self.phase, self.at_once = before

    # --- what every process agrees on -------------------------------------------------------------------------

    def agreed(self) -> int:
        """The signal, if any process got one (all-reduced: every process must call this at the same point)."""
        import torch
        import torch.distributed as dist

        signum = self.signum or 0
        if dist.is_available() and dist.is_initialized():
            device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([signum], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        if signum and self.signum is None:  # another process got it
            self._note(signum)
        return signum

    def evaluate(self, trainer, phase: str) -> dict | None:
        """`trainer.evaluate()` as `phase`; None when a signal came before it or stopped it at a batch."""
        if self.agreed():
            return None
        self.attach(trainer)
        with self.during(phase):
            try:
                return trainer.evaluate()
            except EvaluationStopped:
                return None

    # --- the trainer callback -------------------------------------------------------------------------------------

    def attach(self, trainer) -> None:
        """This callback on `trainer` (once), so that its steps and evaluation batches see the signal."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)

    def on_step_end(self, args, state, control, **kwargs):
        if self.agreed():
            self._stop_here(state, control)
        elif state.global_step >= state.max_steps:
            self.trained = True  # what evaluates now is the end-of-training evaluation

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.phase == "training" and not self.trained:
            return  # an evaluation in the middle of training finishes; on_evaluate saves and stops
        if self.agreed():
            self.cut = "the evaluation at the end of training" if self.phase == "training" else self.phase
            raise EvaluationStopped

    def on_evaluate(self, args, state, control, **kwargs):
        if self.phase == "training" and not self.trained and self.stopped_at is None and self.agreed():
            self._stop_here(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # the checkpoint is saved: no end-of-epoch evaluation or second save
            control.should_evaluate = False
            control.should_save = False

    def _stop_here(self, state, control) -> None:
        self.stopped_at = state.global_step
        self.phase = f"the checkpoint save of step {state.global_step}"
        control.should_save = True
        control.should_evaluate = False
        control.should_training_stop = True

    # --- the one line -----------------------------------------------------------------------------------------------

    def interrupted(self) -> TrainingInterrupted:
        """What stopped, and what is resumable: the saved adapter, else the newest complete checkpoint."""
        name = signal.Signals(self.signum or signal.SIGTERM).name
        if self.again:
            what = f"{name} again during {self.cut_again}: stopped at once"
        elif self.stopped_at is not None:
            what = f"{name}: stopped after step {self.stopped_at} (no evaluation, merge or sample)"
        else:
            what = f"{name} during {self.cut}: stopped"
        hint = f"resume with: {self.command} (notebooks: qwentune.train(recipe, ['training.resume=true']))"
        state = run_state(self.run_dir)
        if state == "finished":
            resumable = "the run had finished (metrics.json is written)"
            hint = "nothing to resume" + (
                f"; push it again with: qwentune push {self.run_dir} OWNER/NAME" if self.cut == "the push" else ""
            )
        elif state == "trained":
            resumable = (
                f"resumable: the adapter is saved in {self.run_dir / 'adapter'}; --resume finishes the run "
                "(merge, sample, eval, metrics.json) without retraining"
            )
        else:
            checkpoint = latest_checkpoint(self.run_dir, note=False)
            if checkpoint is None:
                resumable = "no complete checkpoint: --resume starts at step 0"
            elif self.stopped_at == checkpoint_step(checkpoint):
                resumable = f"resumable: checkpoint saved in {checkpoint}"
            else:
                resumable = f"resumable from {checkpoint}, the newest complete checkpoint"
        return TrainingInterrupted(
            f"{what}; {resumable}", signum=self.signum or signal.SIGTERM, where=str(self.run_dir), hint=hint
        )


def train_until_stopped(trainer, stop: GracefulStop, checkpoint: Path | None):
    """`trainer.train()`, resumed from `checkpoint` when given. A signal during a step: the step finishes, a
    checkpoint is saved, TrainingInterrupted is raised. A signal during the evaluation at the end of training stops it
    (its TrainOutput then has no metrics): every step ran, the caller saves the adapter and stops."""
    from transformers.trainer_utils import TrainOutput

    stop.attach(trainer)
    trainer.add_callback(CheckpointMarker())
    trainer.add_callback(patches.heap_trimmer())  # RSS stays at what a step holds (glibc keeps freed pages)
    if stop.agreed():  # a signal before training began (during the evaluation before it)
        raise stop.interrupted()
    if checkpoint is not None and is_main_process():
        trim_metrics(stop.run_dir, checkpoint_step(checkpoint))
    try:
        with stop.during("training"):
            output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except EvaluationStopped:
        if not stop.trained:
            raise
        return TrainOutput(trainer.state.global_step, float("nan"), {})
    if stop.stopped_at is None:
        return output
    trainer.accelerator.wait_for_everyone()
    raise stop.interrupted()


__all__ = ["GracefulStop", "StopNow", "TrainingInterrupted", "train_until_stopped"]
