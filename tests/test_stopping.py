"""Stopping on SIGTERM/SIGINT (qwentune/training/stopping.py): a second signal or a signal during the evaluation at
the end of training or during the merge stops at once and leaves a resumable state, named in one line; one request
delivered twice (scheduler + launcher) counts once. The signals are sent by the process to itself from a trainer
callback, so each lands exactly where the test says. (SIGTERM during a step, one process and two: test_resume.py,
test_multiprocess.py.)"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny_models import tiny_model_dir, tiny_training
from transformers import TrainerCallback

import qwentune
from qwentune.training import steps, stopping
from qwentune.training.resume import COMPLETE_MARKER, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def recipe(model_dir: Path, run_dir: Path, *, everything: bool = True, **training) -> dict:
    """`everything`: eval split on (evaluated before training, at the end of the epoch, i.e. after the last step,
    and after training), merge and sample on: all that a stop must skip."""
    data = {"train": [str(ROOT / "data/instructions.jsonl")], "limit": 8, "max_length": 256}
    if everything:
        data |= {"eval": [str(ROOT / "data/instructions.jsonl")], "eval_limit": 2}
    return {
        "model": {"source": str(model_dir)},
        "data": data,
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "train_new_tokens": "off"},
        "training": tiny_training(**{"max_steps": 4, "per_device_batch_size": 2, **training}),
        "output": {"dir": str(run_dir), "merge": everything, "sample_tokens": 4},
    }


class SignalAt(TrainerCallback):
    """Sends this process SIGTERM once, at `event` (step_end, save, prediction_step) of step `step`. Added before
    train(), it runs before qwentune's own callbacks of the same event."""

    def __init__(self, event: str, step: int):
        self.event, self.step, self.sent = event, step, False

    def _maybe(self, event, state):
        if event == self.event and state.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe("step_end", state)

    def on_save(self, args, state, control, **kwargs):
        self._maybe("save", state)

    def on_prediction_step(self, args, state, control, **kwargs):
        self._maybe("prediction_step", state)


def eval_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "eval_loss" in row]


def adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_a_second_signal_during_the_checkpoint_save_leaves_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    model_dir = tiny_model_dir(tmp_path)
    whole = qwentune.train(recipe(model_dir, tmp_path / "whole", everything=False, save_steps=1))
    monkeypatch.setattr(stopping, "DUPLICATE_S", 0.0)  # both signals come from here, within microseconds
    run_dir = tmp_path / "cut"
    run = qwentune.setup(recipe(model_dir, run_dir, everything=False, save_steps=1))
    run.trainer.add_callback(SignalAt("step_end", 3))  # the first: step 3 finishes and is saved...
    run.trainer.add_callback(SignalAt("save", 3))  # ...the second comes after Trainer wrote it, before the marker
    with pytest.raises(stopping.TrainingInterrupted) as info:
        run.train()
    message = str(info.value)
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert "SIGTERM again during the checkpoint save of step 3: stopped at once" in message
    checkpoints = run_dir / "checkpoints"
    assert f"resumable from {checkpoints / 'checkpoint-2'}, the newest complete checkpoint" in message
    assert "--resume" in message and "\n" not in message
    assert (checkpoints / "checkpoint-3").is_dir() and not (checkpoints / "checkpoint-3" / COMPLETE_MARKER).exists()
    assert latest_checkpoint(run_dir).name == "checkpoint-2"
    assert not (run_dir / "adapter").exists()

    resumed = qwentune.train(recipe(model_dir, run_dir, everything=False, save_steps=1), ["training.resume=true"])
    assert resumed.metrics["global_step"] == 4
    a, b = adapter(whole.run_dir), adapter(run_dir)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow
def test_a_signal_during_the_evaluation_at_the_end_of_training_saves_the_adapter(tmp_path, capfd):
    model_dir = tiny_model_dir(tmp_path)
    run_dir = tmp_path / "run"
    run = qwentune.setup(recipe(model_dir, run_dir))
    run.trainer.add_callback(SignalAt("prediction_step", 4))  # step 4 is the last: the end-of-epoch evaluation
    with pytest.raises(stopping.TrainingInterrupted) as info:
        run.train()
    message = str(info.value)
    assert "SIGTERM during the evaluation at the end of training: stopped" in message
    assert f"resumable: the adapter is saved in {run_dir / 'adapter'}; --resume finishes the run" in message
    assert eval_steps(run_dir) == [0]  # the evaluation at step 4 stopped at its first batch, nothing logged
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    for name in ("merged", "sample.txt", "metrics.json", "eval.md"):
        assert not (run_dir / name).exists(), name

    capfd.readouterr()
    finished = qwentune.train(recipe(model_dir, run_dir), ["training.resume=true"])
    assert "finishing the run without retraining" in capfd.readouterr().err
    assert finished.metrics["finished_by_resume"] is True and finished.metrics["global_step"] == 4
    assert (run_dir / "merged").is_dir() and (run_dir / "sample.txt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("step", [0, 2])  # the evaluation before training; one in the middle (eval_steps 2)
def test_a_signal_during_an_evaluation_before_or_during_training(tmp_path, step):
    model_dir = tiny_model_dir(tmp_path)
    run_dir = tmp_path / "run"
    run = qwentune.setup(recipe(model_dir, run_dir, eval_steps=2))
    run.trainer.add_callback(SignalAt("prediction_step", step))
    with pytest.raises(stopping.TrainingInterrupted) as info:
        run.train()
    message = str(info.value)
    if step == 0:  # stopped at its first batch: nothing trained, nothing logged
        assert "SIGTERM during the evaluation before training: stopped; no complete checkpoint" in message
        assert not (run_dir / "metrics.jsonl").exists() or eval_steps(run_dir) == []
        assert not list(run_dir.glob("checkpoints/checkpoint-*"))
    else:  # it finishes, then the checkpoint of its step is saved and the run stops
        checkpoint = run_dir / "checkpoints" / "checkpoint-2"
        assert "SIGTERM: stopped after step 2 (no evaluation, merge or sample)" in message
        assert f"resumable: checkpoint saved in {checkpoint}" in message
        assert eval_steps(run_dir) == [0, 2] and latest_checkpoint(run_dir).name == "checkpoint-2"
    assert not (run_dir / "adapter").exists()


@pytest.mark.slow
def test_a_signal_during_the_merge_stops_at_once_with_the_adapter_saved(tmp_path, monkeypatch):
    model_dir = tiny_model_dir(tmp_path)
    run_dir = tmp_path / "run"
    merge = steps.merge_adapter

    def signalled_merge(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return merge(*args, **kwargs)  # not reached: the handler stops at once

    monkeypatch.setattr(steps, "merge_adapter", signalled_merge)
    with pytest.raises(stopping.TrainingInterrupted) as info:
        qwentune.train(recipe(model_dir, run_dir, max_steps=1))
    assert "SIGTERM during the merge and sample: stopped; resumable: the adapter is saved" in str(info.value)
    assert (run_dir / "adapter").is_dir() and not (run_dir / "metrics.json").exists()
    assert not list(run_dir.glob("*merged*"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


# --- the handler alone -----------------------------------------------------------------------------------------------


def fake_recipe(tmp_path: Path):
    return qwentune.load_recipe({"model": {"source": "x"}, "data": {"train": "x.jsonl"}})


def test_one_request_delivered_twice_counts_once_a_later_signal_stops_at_once(tmp_path, monkeypatch, capfd):
    clock = [100.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: clock[0])
    stop = stopping.GracefulStop(fake_recipe(tmp_path), tmp_path)
    with stop.during("training"):
        stop._handle(signal.SIGTERM, None)  # from Slurm
        clock[0] += 0.01
        stop._handle(signal.SIGTERM, None)  # the same, forwarded by torchrun: nothing more
        assert stop.signum == signal.SIGTERM and not stop.again
        assert "SIGTERM: finishing this step, then saving a checkpoint" in capfd.readouterr().err
        clock[0] += stopping.DUPLICATE_S
        with pytest.raises(stopping.StopNow):
            stop._handle(signal.SIGINT, None)
        stop._handle(signal.SIGTERM, None)  # already leaving: ignored
    assert stop.again and stop.cut_again == "training"
    message = str(stop.interrupted())
    assert "SIGTERM again during training: stopped at once; no complete checkpoint: --resume starts at step 0" in (
        message
    )


def test_the_steps_after_training_stop_at_the_first_signal(tmp_path):
    stop = stopping.GracefulStop(fake_recipe(tmp_path), tmp_path)
    with pytest.raises(stopping.StopNow), stop.during("the merge and sample", at_once=True):
        stop._handle(signal.SIGTERM, None)
    assert stop.cut == "the merge and sample" and not stop.again
    (tmp_path / "adapter").mkdir()
    assert "SIGTERM during the merge and sample: stopped; resumable: the adapter is saved" in str(stop.interrupted())
    (tmp_path / "metrics.json").write_text("{}")
    assert "the run had finished" in str(stop.interrupted())
    with pytest.raises(stopping.StopNow), stop.during("the push", at_once=True):  # asked before it began
        pass


def test_guard_turns_a_stop_into_the_one_line_and_restores_the_handlers(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    stop = stopping.GracefulStop(fake_recipe(tmp_path), tmp_path)
    with pytest.raises(stopping.TrainingInterrupted) as info, stop.guard():
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        with stop.during("the merge and sample", at_once=True):
            os.kill(os.getpid(), signal.SIGINT)
    assert info.value.exit_code == 128 + signal.SIGINT
    assert str(info.value).startswith(f"{tmp_path}: SIGINT during the merge and sample: stopped;")
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_deepspeed_checkpoint_counts_as_complete(tmp_path):
    """Under DeepSpeed, Trainer saves the optimizer's state as DeepSpeed does (no optimizer.pt): the dir `latest`
    names, one file per process. Such a checkpoint, marked, is resumable (the 2-process ZeRO-3 run stopped by SIGTERM
    at step 3 and resumed ended bit for bit at the uninterrupted run's adapter, 2026-12-07)."""
    from qwentune.training.resume import is_complete

    checkpoint = tmp_path / "checkpoints" / "checkpoint-3"
    (checkpoint / "global_step3").mkdir(parents=True)
    for name in ("adapter_model.safetensors", "scheduler.pt", "trainer_state.json"):
        (checkpoint / name).write_bytes(b"x")
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"step": 3}))
    assert not is_complete(checkpoint)  # no optimizer state at all
    (checkpoint / "latest").write_text("global_step3")
    assert not is_complete(checkpoint)
    for rank in (0, 1):
        (checkpoint / "global_step3" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    assert is_complete(checkpoint) and latest_checkpoint(tmp_path) == checkpoint
    (checkpoint / "latest").unlink()
    (checkpoint / "optimizer.pt").write_bytes(b"x")  # Trainer's own layout
    assert is_complete(checkpoint)
