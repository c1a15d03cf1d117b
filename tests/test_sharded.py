"""FSDP2 and DeepSpeed ZeRO on 2 CPU processes (gloo), run through benchmarks/multi_process.py (the harness that
benchmarks/gpu_check.sh runs on GPUs): the adapter equals one process with accumulation 2, is saved complete, its merge
equals the one-process merge, a SIGTERM'd run resumes to the same adapter; what cannot be sharded is refused before a
model loads. One FSDP LoRA test runs by default; the rest (several minutes on 2 cores): python -m pytest -m sharding
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "benchmarks" / "multi_process.py"


def harness(tmp_path: Path, *args: str) -> tuple[list[dict], Path]:
    out = tmp_path / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(HARNESS), "--shape", "tiny", "--device", "cpu", "--out", str(out)]
    result = subprocess.run(
        [*cmd, "--json-out", str(out / "rows.json"), *args], env=env, capture_output=True, text=True, timeout=1500
    )
    assert (out / "rows.json").is_file(), result.stderr[-4000:]
    print(result.stdout)
    return json.loads((out / "rows.json").read_text()), out


def check_equal(row: dict, out: Path, tolerance: float = 1e-6) -> None:
    log = (out / f"{row['config']}-{row['peft']}.log").read_text()
    assert row["rc"] == 0, log[-4000:]
    assert row["complete"] and row["tensors"] == 28  # every LoRA tensor, whole (2 layers × 7 modules × A, B)
    # the merged model is bf16 (the tiny model's dtype): an adapter off by rounding may move a weight by one bf16 step
    assert row["adapter_diff"] <= tolerance and row["merged_diff"] <= (1e-3 if row["adapter_diff"] else 0), row
    assert set(row["peak_mib"]) >= {"0", "1"}
    if row["config"] == "fsdp":  # really sharded: FSDP2 DTensors gathered for the save, no DDP reducer
        assert "FSDP: the adapter's 28 tensors gathered whole from 2 ranks" in log
        assert "find_unused_parameters" not in log


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp_lora_on_two_processes_equals_one_process_with_accumulation(tmp_path):
    """The multi-GPU check's CPU dry run (benchmarks/gpu_check.sh --shape tiny --gpus 2): FSDP2 LoRA on 2 CPU ranks."""
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    cmd = ["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--shape", "tiny", "--gpus", "2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    print(result.stdout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (row,) = json.loads((tmp_path / "gpu_check/multi.json").read_text())
    check_equal(row, tmp_path / "gpu_check/multi")
    assert "| fsdp | lora |" in result.stdout  # the table


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.sharding
def test_fsdp_qlora_keeps_its_4bit_weights_on_every_rank(tmp_path):
    (row,), out = harness(tmp_path, "--configs", "fsdp", "--peft", "qlora")
    check_equal(row, out, tolerance=1e-5)
    log = (out / "fsdp-qlora.log").read_text()
    assert "FSDP: all 14 4-bit layers kept packed 4-bit weights and quant_state (every rank)" in log


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.sharding
def test_zero3_qlora_with_fp32_compute_equals_one_process(tmp_path):
    """ZeRO-3 partitions and gathers the 4-bit layers without loss: with fp32 compute the QLoRA adapter equals one
    process within 1e-6 (8.9e-8 measured). In the default bf16 compute it is 5.3e-4 off, float order: ZeRO-3 puts an
    identity autograd Function on every module's inputs and outputs, which regroups the sums of the gradients of a
    tensor read by several modules; bf16 rounds the regrouped sums differently, and AdamW's update of an element whose
    gradient is near its eps (1e-8) moves by up to lr/2. One process with the same identity Functions and no DeepSpeed
    gives ZeRO-3's adapter bit for bit (docs/memory-and-launch.md)."""
    pytest.importorskip("deepspeed")
    fp32 = "peft.quant.compute_dtype=float32"
    (row,), out = harness(tmp_path, "--configs", "zero3", "--peft", "qlora", "--set", fp32)
    check_equal(row, out)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.sharding
@pytest.mark.parametrize("config", ["fsdp", "zero2", "zero3"])
def test_sigterm_then_resume_ends_at_the_one_process_adapter(tmp_path, config):
    if config.startswith("zero"):
        pytest.importorskip("deepspeed")
    (row,), out = harness(tmp_path, "--configs", config, "--peft", "lora", "--resume")
    assert row["stopped"]["rc"] == 143 and 3 <= row["stopped"]["after_step"] < 6, row
    assert row["resumed_from"] and Path(row["resumed_from"]).name.startswith("checkpoint-"), row
    check_equal(row, out)


def test_estimate_per_process_under_each_launch_config():
    """`qwentune estimate --launch`: FSDP / ZeRO-3 split weights, LoRA, gradients and optimizer state over the
    processes and add what is gathered whole while in use; ZeRO-2 splits gradients and optimizer state; DDP adds its
    gradient buckets; offload moves states (and ZeRO-3's parameters) to CPU RAM."""
    from qwentune.model.memory_estimate import estimate, estimate_for_launch
    from qwentune.recipe.load import load_recipe

    recipe = load_recipe(ROOT / "recipes/qwen2.5-3b-instruct/sft_lora.yaml")

    def per_process(name: str, n: int = 2):
        est = estimate_for_launch(estimate(recipe), ROOT / "launch" / f"{name}.yaml", n)
        return est, {line.name.split(" (")[0]: line.bytes for line in est.lines if line.counted}

    one = {line.name.split(" (")[0]: line.bytes for line in estimate(recipe).lines if line.counted}
    ddp, d = per_process("ddp")
    fsdp, f = per_process("fsdp")
    zero2, z2 = per_process("deepspeed_zero2")
    zero3_off, z3o = per_process("deepspeed_zero3_offload", 4)
    assert d["DDP gradient buckets"] == d["gradients"] == one["gradients"] and "ddp over 2" in ddp.setting
    assert f["weights bf16"] == one["weights bf16"] / 2 and f["optimizer"] == one["optimizer"] / 2
    assert 0 < f["gathered while in use"] < one["weights bf16"] / 2
    assert fsdp.total < ddp.total and zero2.total < ddp.total
    assert z2["weights bf16"] == one["weights bf16"] and z2["gradients"] == one["gradients"] / 2
    assert z3o["weights bf16"] == z3o["optimizer"] == 0 and "optimizer and param offloaded" in zero3_off.setting
    assert "zero3 over 4 processes" in zero3_off.setting


def test_fsdp_on_cpu_patch_is_scoped_and_checks_accelerate(monkeypatch):
    """patches/sharding.py: active only for an FSDP launch without CUDA, restores AcceleratorState.__init__, and
    refuses (LibraryChanged) an accelerate whose AcceleratorState.__init__ takes other parameters."""
    from accelerate.state import AcceleratorState

    from qwentune.patches import fsdp_on_cpu
    from qwentune.patches.machinery import LibraryChanged

    original = AcceleratorState.__init__
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with fsdp_on_cpu():
        assert AcceleratorState.__init__ is original  # no FSDP launch: nothing done
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with fsdp_on_cpu():
        assert AcceleratorState.__init__ is not original
    assert AcceleratorState.__init__ is original

    def changed(self, mixed_precision=None, cpu=False, fsdp_plugin=None):
        pass

    monkeypatch.setattr(AcceleratorState, "__init__", changed)
    with pytest.raises(LibraryChanged, match="accelerate"), fsdp_on_cpu():
        pass


def test_token_rows_under_fsdp_are_refused_before_anything_loads(tmp_path, monkeypatch):
    """Trainable token rows (peft.train_new_tokens: auto, the default) under FSDP crashed every rank in accelerate's
    FSDP2 wrap (`model.embed_tokens.weight` is neither a parameter, buffer, nor extra state; 2 CPU ranks, tied model):
    each rank now refuses in one line, exit 2, before the run dir is written or a model loads. `off` goes through."""
    import yaml
    from cli_in_process import run_main

    recipe = {"model": {"source": str(tmp_path / "no-model-here")}, "output": {"dir": str(tmp_path / "run")},
              "data": {"train": str(ROOT / "data/instructions.jsonl")}}  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with launch/fsdp.yaml gives each rank
    code, err = run_main(["train", str(path)])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: peft.train_new_tokens: auto"), err
    assert "hint: set peft.train_new_tokens=off" in lines[0] and not (tmp_path / "run").exists()
    code, err = run_main(["train", str(path), "peft.train_new_tokens=off"])
    assert code == 2 and "train_new_tokens" not in err  # past the check: the missing model is what stops it


def test_an_fsdp_sharded_checkpoint_counts_as_complete(tmp_path):
    """Under FSDP (SHARDED_STATE_DICT) Trainer writes the model and optimizer as torch.distributed.checkpoint dirs
    (`pytorch_model_fsdp_0/`, `optimizer_0/`, each with its `.metadata`), no adapter_model.safetensors or
    optimizer.pt: such a checkpoint, marked, is resumable (it was skipped, and `--resume` started over)."""
    from qwentune.training.resume import COMPLETE_MARKER, is_complete, latest_checkpoint

    checkpoint = tmp_path / "checkpoints" / "checkpoint-4"
    for name in ("pytorch_model_fsdp_0/.metadata", "scheduler.pt", "trainer_state.json"):
        (checkpoint / name).parent.mkdir(parents=True, exist_ok=True)
        (checkpoint / name).write_bytes(b"x")
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"step": 4}))
    assert not is_complete(checkpoint)  # no optimizer state
    (checkpoint / "optimizer_0").mkdir()
    assert not is_complete(checkpoint)  # cut before its .metadata (written last)
    (checkpoint / "optimizer_0" / ".metadata").write_bytes(b"x")
    assert is_complete(checkpoint) and latest_checkpoint(tmp_path, note=False) == checkpoint
    (checkpoint / "pytorch_model_fsdp_0" / ".metadata").unlink()
    assert not is_complete(checkpoint)  # no model state
