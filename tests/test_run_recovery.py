"""A run survives being killed at any point: a torn metrics line or a half-saved checkpoint is skipped (not fatal),
a run killed during its final merge is finished by `--resume` without retraining, staging dirs left by dead
processes are removed with a note, and what a run publishes has the modes the umask asks for."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_models import tiny_model_dir, tiny_training

from qwentune.errors import QwentuneError
from qwentune.export.outdir import staging
from qwentune.files import LEGACY_STALE_S, remove_stale_staging
from qwentune.training.metrics import plot_losses, read_metrics
from qwentune.training.resume import COMPLETE_MARKER

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
UMASK_022 = {"preexec_fn": lambda: os.umask(0o022)}


def write_recipe(tmp_path: Path, model_dir: Path, *, output: dict, **training) -> Path:
    recipe = {
        "model": {"source": str(model_dir)},
        "data": {"train": [str(ROOT / "data/instructions.jsonl")], "limit": 8, "max_length": 128},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "train_new_tokens": "off"},
        "training": tiny_training(**{"max_steps": 2, "per_device_batch_size": 2, **training}),
        "output": output,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def qwentune(*args: str, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qwentune", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900, **kwargs)


def logged_steps(run_dir: Path) -> list[int]:
    return [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.slow
def test_resume_skips_a_torn_metrics_line_and_a_half_saved_checkpoint(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    recipe = write_recipe(tmp_path, model_dir, output={"merge": False}, max_steps=3, save_steps=1)
    run_dir = tmp_path / "run"
    first = qwentune("train", str(recipe), f"output.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    whole = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    checkpoints = run_dir / "checkpoints"
    for step in (2, 3):  # save_total_limit 2 keeps the last two; each carries the marker written after the save
        assert json.loads((checkpoints / f"checkpoint-{step}" / COMPLETE_MARKER).read_text()) == {"step": step}

    # Killed while saving checkpoint-3 (trainer_state.json half written, no marker yet) and while appending its log
    # line: the run is unfinished, and with the old rule (all files present) checkpoint-3 would be picked and fail.
    for name in ("adapter", "metrics.json", "loss.png"):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    state = checkpoints / "checkpoint-3" / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    (checkpoints / "checkpoint-3" / COMPLETE_MARKER).unlink()
    lines = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 2]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "epoch": 0.75, "lo')

    resumed = qwentune("train", str(recipe), f"output.dir={run_dir}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{checkpoints / 'checkpoint-3'}: skipped, it was not saved completely" in resumed.stderr
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in resumed.stderr
    assert "metrics.jsonl:3: dropped a torn last line" in resumed.stderr
    assert logged_steps(run_dir) == [1, 2, 3]  # the torn line is gone, step 3 logged once
    assert all(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == whole  # as if never interrupted
    assert (run_dir / "loss.png").is_file() and (run_dir / "metrics.json").is_file()


def test_metrics_a_torn_last_line_is_dropped_a_corrupt_middle_line_is_an_error(tmp_path, capfd):
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    assert read_metrics(tmp_path) == rows
    assert f"{path}:3: dropped a torn last line" in capfd.readouterr().err
    assert plot_losses(tmp_path).is_file()

    path.write_text(json.dumps(rows[0]) + "\n" + "garbage\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(QwentuneError) as err:
        read_metrics(tmp_path)
    assert err.value.where == f"{path}:2" and "corrupt" in str(err.value)
    with pytest.raises(QwentuneError):
        plot_losses(tmp_path)


def test_stale_staging_dirs_are_removed_with_a_note_live_and_recent_ones_kept(tmp_path, capfd):
    dead, alive = dead_pid(), os.getppid()
    target = tmp_path / "merged"

    def leftover(name: str, age_s: float = 0) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text("{}")
        if age_s:
            then = time.time() - age_s
            for p in (path / "config.json", path):
                os.utime(p, (then, then))
        return path

    dead_tmp = leftover(f".merged.tmp-{dead}-abcd1234")
    live_tmp = leftover(f".merged.tmp-{alive}-abcd1234")
    legacy_old = leftover(".merged.tmp-k2j4h5g6", age_s=LEGACY_STALE_S + 60)
    legacy_new = leftover(".merged.tmp-q8w7e6r5")
    previous = leftover(f".merged.old-{dead}-zz")  # killed between the two renames: the only copy of merged/
    other = leftover(f".adapter.tmp-{dead}-abcd1234")  # another target's: not ours to judge here

    assert remove_stale_staging(tmp_path, "merged") == sorted([dead_tmp, legacy_old])
    err = capfd.readouterr().err
    assert f"removed the stale staging dir {dead_tmp} (left by process {dead}, no longer running)" in err
    assert f"removed the stale staging dir {legacy_old} (left by an older qwentune" in err
    assert f"{previous} holds the previous merged" in err
    assert live_tmp.is_dir() and legacy_new.is_dir() and previous.is_dir() and other.is_dir()

    target.mkdir()  # once merged/ exists again, the old copy beside it is stale too
    with staging(target) as tmp:  # a new staging dir names its owner and has the umask's mode
        assert tmp.name.startswith(f".merged.tmp-{os.getpid()}-")
        assert mode(tmp) == 0o777 & ~current_umask()
        (tmp / "config.json").write_text("{}")
    assert not previous.exists() and (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")) == sorted(
        [live_tmp.name, legacy_new.name]
    )


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_killed_during_the_merge_resume_finishes_it_without_retraining(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    recipe = write_recipe(tmp_path, model_dir, output={"merge": True, "sample_tokens": 4})
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwentune", "train", str(recipe), f"output.dir={run_dir}"],
        cwd=ROOT,
        env=ENV,
        stderr=subprocess.DEVNULL,
        **UMASK_022,
    )
    deadline = time.monotonic() + 600
    while not list(run_dir.glob(".merged.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    staged = list(run_dir.glob(".merged.tmp-*"))
    assert [p.name.split("-")[1] for p in staged] == [str(proc.pid)], "the merge ended before it could be killed"
    assert not (run_dir / "merged").exists() and not (run_dir / "metrics.json").exists()
    adapter = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    log_lines = (run_dir / "metrics.jsonl").read_bytes()

    # without --resume: the state is named, with both ways out
    refused = qwentune("train", str(recipe), f"output.dir={run_dir}")
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]  # (after the lock note)
    assert len(errors) == 1 and "did not finish" in errors[0] and "Traceback" not in refused.stderr, refused.stderr
    assert (
        "--resume" in errors[0] and f"qwentune merge {run_dir / 'adapter'} --output {run_dir / 'merged'}" in errors[0]
    )

    finished = qwentune("train", str(recipe), f"output.dir={run_dir}", "--resume", **UMASK_022)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "finishing the run without retraining" in finished.stderr
    assert f"removed the stale staging dir {staged[0]} (left by process {proc.pid}" in finished.stderr
    assert not list(run_dir.glob(".merged.*"))
    assert (run_dir / "metrics.jsonl").read_bytes() == log_lines  # no training step ran
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["finished_by_resume"] is True and metrics["global_step"] == 2 and "train_runtime" in metrics
    assert metrics["merge"]["max_abs_diff"] <= metrics["merge"]["tolerance"]  # parity on the first train rows
    assert metrics["sample"]["completion"] and (run_dir / "sample.txt").is_file() and (run_dir / "loss.png").is_file()
    merged = run_dir / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / "README.md").is_file()
    assert mode(merged) == 0o755
    assert {p.name: mode(p) for p in merged.iterdir()} == {p.name: 0o644 for p in merged.iterdir()}
    assert mode(run_dir / "metrics.json") == 0o644

    again = qwentune("train", str(recipe), f"output.dir={run_dir}", "--resume")
    assert again.returncode == 2 and "nothing to resume" in again.stderr


def test_preprocess_output_has_the_umask_mode(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    recipe = write_recipe(tmp_path, model_dir, output={"merge": False})
    out = tmp_path / "rows" / "train.jsonl"
    done = qwentune("preprocess", str(recipe), "--output", str(out), **UMASK_022)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_text().splitlines() and all(json.loads(line)["input_ids"] for line in out.read_text().splitlines())
    assert mode(out) == 0o644
