"""A run dir belongs to one process at a time; a new run starts from a clean dir; outputs follow the umask."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from tiny_models import tiny_model_dir, tiny_training

from qwentune.errors import QwentuneError
from qwentune.training.rundir import OWNER_NAME, RunDirLock

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

HOLD = textwrap.dedent(
    """
    import sys, time
    from qwentune.training.rundir import RunDirLock
    lock = RunDirLock(sys.argv[1]).acquire()  # held while the object lives
    print("held", flush=True)
    time.sleep(120)
    """
)


def holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def write_recipe(tmp_path: Path, model_dir: Path, **training) -> Path:
    recipe = {
        "model": {"source": str(model_dir)},
        "data": {"train": [str(ROOT / "data/instructions.jsonl")], "limit": 8, "max_length": 128},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "train_new_tokens": "off"},
        "training": tiny_training(**{"max_steps": 2, "per_device_batch_size": 2, **training}),
        "output": {"merge": False, "sample_tokens": 0},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def train(recipe: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qwentune", "train", str(recipe), *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900, **kwargs)


def logged_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    try:
        with pytest.raises(QwentuneError, match=rf"in use by process {proc.pid} on .*since"):
            RunDirLock(run_dir).acquire()
        sentinel = run_dir / "keep.txt"
        sentinel.write_text("theirs")
        recipe = write_recipe(tmp_path, tmp_path / "no-model-needed")
        refused = train(recipe, f"output.dir={run_dir}")
        assert refused.returncode == 2
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and f"in use by process {proc.pid}" in lines[0] and "hint:" in lines[0]
        assert sentinel.read_text() == "theirs"  # nothing of the holder's run was touched
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path, capfd):
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((run_dir / OWNER_NAME).read_text())["pid"] == proc.pid  # left behind by the dead holder
    lock = RunDirLock(run_dir).acquire()
    try:
        assert f"took over the run dir from process {proc.pid}" in capfd.readouterr().err
        assert json.loads((run_dir / OWNER_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (run_dir / OWNER_NAME).exists()


@pytest.mark.slow
def test_two_trains_into_one_dir_one_is_refused_the_other_intact(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    recipe = write_recipe(tmp_path, model_dir, max_steps=4)
    run_dir = tmp_path / "run"
    cmds = [
        [
            sys.executable,
            "-m",
            "qwentune",
            "train",
            str(recipe),
            f"output.dir={run_dir}",
            f"training.learning_rate={lr}",
        ]
        for lr in ("0.001", "0.005")
    ]
    procs = [subprocess.Popen(c, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True) for c in cmds]
    results = [(p.wait(timeout=900), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = [i for i, (code, _) in enumerate(results) if code == 0][0]
    loser_err = results[1 - winner][1]
    assert "run dir is in use by" in loser_err  # "by process PID …", or "by another process" in the instant before
    # the winner has written who it is
    recorded = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recorded["training"]["learning_rate"] == float(("0.001", "0.005")[winner])
    assert logged_steps(run_dir) == [1, 2, 3, 4]  # one run's lines only
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_overwrite_and_a_new_run_over_an_unfinished_one_start_clean_with_umask_modes(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    recipe = write_recipe(tmp_path, model_dir)
    run_dir = tmp_path / "run"
    umask = {"preexec_fn": lambda: os.umask(0o022)}
    first = train(recipe, f"output.dir={run_dir}", **umask)
    assert first.returncode == 0, first.stderr[-2000:]
    assert logged_steps(run_dir) == [1, 2]

    again = train(recipe, f"output.dir={run_dir}", "output.overwrite=true", "training.max_steps=3", **umask)
    assert again.returncode == 0, again.stderr[-2000:]
    assert logged_steps(run_dir) == [1, 2, 3]  # not 1, 2, 1, 2, 3
    assert "removed the previous run's files" in again.stderr

    # files 0644, dirs 0755 under umask 022 (tempfile alone would give 0600 / 0700)
    for path in [run_dir / "recipe.yaml", run_dir / "metrics.json", run_dir / "adapter" / "adapter_config.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((run_dir / "adapter").stat().st_mode) == 0o755

    # an unfinished run (checkpoints, log lines, no adapter) is not appended to by a new run
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (unfinished / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    new = train(recipe, f"output.dir={unfinished}")
    assert new.returncode == 0, new.stderr[-2000:]
    assert logged_steps(unfinished) == [1, 2]
    assert all(r.get("loss") != 9.0 for r in map(json.loads, (unfinished / "metrics.jsonl").read_text().splitlines()))
    assert not (unfinished / "checkpoints" / "checkpoint-1").exists()
