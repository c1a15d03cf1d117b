"""Several processes: 2-process DDP on CPU (gloo, via `accelerate launch`) trains exactly what one process does with
gradient accumulation over the same rows; only the main process writes the run dir; each rank's 4-bit model goes on
its own GPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import tiny_model_dir, tiny_training

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
DATA = {"sft": "data/instructions.jsonl", "dpo": "data/preferences.jsonl"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_recipe(tmp_path: Path, model_dir: Path, method: str = "sft") -> Path:
    """Short rows, fp32, no dropout, constant lr, rows in file order: the runs below differ only in how the
    4 rows of each optimizer step are spread over processes and accumulation steps."""
    recipe = {
        "model": {"source": str(model_dir)},
        "data": {"train": [str(ROOT / DATA[method])], "limit": 8, "max_length": 256},
        "method": method,
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "train_new_tokens": "off"},
        "training": tiny_training(max_steps=3, per_device_batch_size=1, shuffle=False, grad_accum=8),
        "output": {"merge": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")  # two ranks on a small machine: don't oversubscribe the cores
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_two_processes_equal_one_process_with_accumulation(tmp_path, method):
    model_dir = tiny_model_dir(tmp_path)
    recipe = write_recipe(tmp_path, model_dir, method)
    one, two = tmp_path / "one", tmp_path / "two"

    single = run(
        [sys.executable, "-m", "qwentune", "train", str(recipe), "training.grad_accum=2", f"output.dir={one}"],
        cwd=ROOT,
    )
    launch = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "launch/cpu_2proc.yaml")]
    launch += ["--main_process_port", str(free_port())]
    ddp = run(
        [*launch, "-m", "qwentune", "train", str(recipe), "training.grad_accum=1", f"output.dir={two}"],
        cwd=ROOT,
    )

    # the same effective batch, said once (by the main process) and recorded
    unit = " pairs" if method == "dpo" else ""
    assert f"effective batch 2{unit} = 1 per device × 2 accumulation × 1 process(es)" in single.stderr
    said = [line for line in ddp.stderr.splitlines() if "effective batch" in line]
    assert len(said) == 1 and f"effective batch 2{unit} = 1 per device × 1 accumulation × 2 process(es)" in said[0]
    for run_dir, processes in ((one, 1), (two, 2)):
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["effective_batch"] == 2 and metrics["processes"] == processes
        assert metrics["global_step"] == 3

    # the same loss curve and the same adapter
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 3, (a, b)
    assert a == pytest.approx(b, abs=1e-5, rel=1e-5), (a, b)
    assert a[-1] != a[0]  # it trained
    wa, wb = adapter(one), adapter(two)
    assert wa.keys() == wb.keys()
    assert any(v.abs().max() > 0 for k, v in wa.items() if "lora_B" in k)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-5)
    loss_diff = max(abs(x - y) for x, y in zip(a, b))
    weight_diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"1 process × accumulation 2 vs 2 processes: max |Δloss| {loss_diff:.1e}, max |Δadapter| {weight_diff:.1e}")

    # only the main process wrote the run dir: the same files, one log line per step, nothing half-written
    def listing(run_dir: Path) -> set[str]:
        return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}

    assert listing(one) == listing(two)
    assert not [name for name in listing(two) if ".tmp" in name]
    assert len((two / "metrics.jsonl").read_text().splitlines()) == len(
        (one / "metrics.jsonl").read_text().splitlines()
    )
    json.loads((two / "data_report.json").read_text())


def test_each_rank_puts_its_4bit_model_on_its_own_gpu(monkeypatch, tmp_path):
    from qwentune.model import loading as model
    from qwentune.model.quantspec import QuantSpec
    from qwentune.recipe.load import load_recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert model.device_for_this_process() == 1
    monkeypatch.delenv("LOCAL_RANK")
    assert model.device_for_this_process() == 0  # a plain single-process run

    # and load_base_model hands exactly that to transformers for QLoRA (no shared device_map="auto")
    monkeypatch.setenv("LOCAL_RANK", "3")
    seen = {}

    class Stop(Exception):
        pass

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise Stop

    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    recipe = load_recipe(
        {"model": {"source": str(tiny_model_dir(tmp_path))}, "data": {"train": "x.jsonl"}, "peft": {"method": "qlora"}}
    )
    with pytest.raises(Stop):
        model.load_base_model(
            recipe.model,
            Path(recipe.model.source),
            model.Precision(torch.bfloat16, True, False),
            quant=QuantSpec.for_peft(recipe.peft),
        )
    assert seen["device_map"] == {"": 3}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model.device_for_this_process() == "cpu"
