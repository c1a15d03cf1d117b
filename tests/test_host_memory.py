"""`qwentune estimate`'s host RAM per phase (issue 26.6): the phases a `qwentune train` runs in one process, each
after the previous one let go, so the run's peak is the largest phase."""

from __future__ import annotations

import json
import subprocess
import sys

from tiny_models import ROOT

from qwentune.model.host_memory import CUDA_HOST, PROCESS, host_phases

GiB = 1024**3
LAPTOP = ROOT / "recipes" / "qwen2.5-3b-instruct" / "sft_qlora_laptop.yaml"
QUICKSTART = ROOT / "recipes" / "qwen2.5-coder-0.5b-instruct-offline" / "sft_qlora_tools.yaml"


def _estimate(recipe, *args) -> dict:
    done = subprocess.run([sys.executable, "-m", "qwentune", "estimate", str(recipe), "--json", *args],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _host(recipe, *args) -> dict:
    return {p["name"]: p["bytes"] for p in _estimate(recipe, *args)["host"]}


def test_the_3b_laptop_recipes_whole_run_fits_16_gb_of_host_ram():
    host = _host(LAPTOP)
    assert {"load", "train", "merge + parity"} <= set(host)  # eval: only where the recipe turns it on
    assert max(host.values()) < 16e9
    # the parity check holds one bf16 3B model, the merged file is mapped while it loads: the largest phase
    assert max(host, key=host.get) == "merge + parity" and host["merge + parity"] > 2 * 3.0e9 * 2


def test_cpu_phases_follow_the_checkpoint_dtype_and_the_training_estimate():
    """The offline model is stored in fp32 (converted from its GGUF): 4 B a parameter wherever the file or a model
    held in its dtype is counted; training is the process plus the training estimate's tensors."""
    data = _estimate(QUICKSTART, "--device", "cpu")
    host = {p["name"]: p["bytes"] for p in data["host"]}
    params = data["parts"]["params"]
    assert host["train"] == PROCESS + data["total_bytes"]
    assert host["merge + parity"] == PROCESS + 2 * 4 * params  # fp32 weights run as they are: no upcast copy
    assert host["eval"] == PROCESS + 4 * params + 4 * params


def test_gpu_training_keeps_the_tensors_off_the_host():
    phases = host_phases(params=3_000_000_000, checkpoint_bytes=2, trained_weights=2e9, train_tensors=9e9,
                         device="cuda", largest_matrix=151936 * 2048, merge=False, evaluate=False)  # fmt: skip
    assert [p.name for p in phases] == ["load", "train"]
    assert phases[1].bytes == PROCESS + CUDA_HOST
