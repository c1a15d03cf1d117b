"""Several processes: 2-process DDP on CPU (gloo, via `accelerate launch`) trains exactly what one process does with
gradient accumulation over the same rows; only the main process writes the run dir; each rank's 4-bit model goes on
its own GPU."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import tiny_model_dir, tiny_training

from qwentune.training.resume import latest_checkpoint

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


def logged_steps(run_dir: Path, key: str = "loss") -> list[int]:
    """The steps of metrics.jsonl's rows holding `key` (loss: training steps, eval_loss: evaluations)."""
    path = run_dir / "metrics.jsonl"
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:  # the last line, half written while the run goes on
            continue
        if key in row:
            found.append(row["step"])
    return found


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_stop_on_sigterm_with_a_checkpoint_and_nothing_after_it(tmp_path):
    """SIGTERM to the launcher and both ranks at once (as Slurm and Ctrl-C deliver it; torchrun forwards it again):
    both ranks stop after the same step, save one checkpoint, skip the end-of-epoch evaluation, the merge and the
    sample, and exit 143; `--resume` on two processes ends with the adapter of one uninterrupted process with
    accumulation 2."""
    model_dir = tiny_model_dir(tmp_path)
    recipe = write_recipe(tmp_path, model_dir)
    settings = yaml.safe_load(recipe.read_text())
    settings["data"] |= {"limit": 16, "eval": [str(ROOT / DATA["sft"])], "eval_limit": 4}
    settings["training"]["max_steps"] = 8
    settings["output"] = {"merge": True, "sample_tokens": 4}
    recipe.write_text(yaml.safe_dump(settings))
    one, two = tmp_path / "one", tmp_path / "two"
    launch = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "launch/cpu_2proc.yaml")]
    launch += ["--main_process_port", str(free_port()), "-m", "qwentune", "train", str(recipe)]
    launch += ["training.grad_accum=1"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")

    proc = subprocess.Popen(
        [*launch, f"output.dir={two}"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while not [s for s in logged_steps(two) if s >= 2] and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=600)
    took = time.monotonic() - sent
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-4000:]
    stopped = max(logged_steps(two))
    assert 2 <= stopped < 8, stderr[-4000:]
    said = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert said and all(f"stopped after step {stopped} (no evaluation, merge or sample)" in line for line in said)
    assert latest_checkpoint(two).name == f"checkpoint-{stopped}"
    assert [s for s in logged_steps(two, "eval_loss") if s > 0] == []  # only the evaluation before training ran
    assert not [p for p in ("adapter", "merged", "sample.txt", "metrics.json") if (two / p).exists()]
    print(f"2 processes: SIGTERM after step {stopped} → exit {proc.returncode} in {took:.2f} s")
    assert took < 30  # torchrun kills the ranks 30 s after forwarding the signal

    run([*launch, f"output.dir={two}", "--resume"], cwd=ROOT)
    assert logged_steps(two) == list(range(1, 9))  # every step logged once
    assert (two / "merged").is_dir() and (two / "sample.txt").is_file()
    run([sys.executable, "-m", "qwentune", "train", str(recipe), "training.grad_accum=2", f"output.dir={one}",
         "output.merge=false"], cwd=ROOT)  # fmt: skip
    assert losses(one) == pytest.approx(losses(two), abs=1e-5, rel=1e-5)
    wa, wb = adapter(one), adapter(two)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-5)


def untrained_im_end_model(tmp_path: Path) -> Path:
    """A tiny (tied) model whose <|im_end|> rows are 10× too short: the token check gives it a trainable row."""
    from safetensors.torch import save_file

    model_dir = tiny_model_dir(tmp_path)
    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    for key in state:
        if "embed_tokens" in key or "lm_head" in key:
            state[key][151645] *= 0.1
    save_file(state, str(path), metadata={"format": "pt"})
    return model_dir


@pytest.mark.slow
@pytest.mark.multiprocess
def test_deepspeed_zero3_on_two_processes_saves_the_whole_adapter_of_one_process(tmp_path):
    """ZeRO-3 as launch/deepspeed_zero3.yaml sets it (stage 3, zero.Init, 16-bit gather on save), on 2 CPU ranks,
    with every parameter partitioned (persistence threshold 0: what a real model's large LoRA matrices get; the tiny
    model's would otherwise stay whole), an eval split, and a trainable token row on the tied head (the fused head
    gathers it). Before: the evaluation before training left DeepSpeed's engine without an optimizer (the first
    backward failed on both ranks), and the adapter was saved from the main rank's empty slices (every tensor
    shape (0,), exit 0), then the merge, run by the main process alone under zero.Init, hung."""
    pytest.importorskip("deepspeed")
    recipe = write_recipe(tmp_path, untrained_im_end_model(tmp_path))
    settings = yaml.safe_load(recipe.read_text())
    settings["data"] |= {"eval": [str(ROOT / DATA["sft"])], "eval_limit": 4}
    settings["peft"]["train_new_tokens"] = "auto"
    settings["output"] = {"merge": True, "sample_tokens": 4}
    recipe.write_text(yaml.safe_dump(settings))
    (tmp_path / "zero3.json").write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
    }))  # fmt: skip
    launch_config = yaml.safe_load((ROOT / "launch/cpu_2proc.yaml").read_text())
    launch_config |= {"distributed_type": "DEEPSPEED", "use_cpu": True}
    launch_config.pop("mixed_precision")  # set by the DeepSpeed file, where there is one
    launch_config["deepspeed_config"] = {
        "deepspeed_config_file": str(tmp_path / "zero3.json"),
        "zero3_init_flag": True,
    }
    (tmp_path / "zero3.yaml").write_text(yaml.safe_dump(launch_config))
    one, three = tmp_path / "one", tmp_path / "zero3"

    launch = [str(ACCELERATE), "launch", "--config_file", str(tmp_path / "zero3.yaml")]
    launch += ["--main_process_port", str(free_port())]
    run([*launch, "-m", "qwentune", "train", str(recipe), "training.grad_accum=1", f"output.dir={three}"], cwd=ROOT)
    run(
        [sys.executable, "-m", "qwentune", "train", str(recipe), "training.grad_accum=2", f"output.dir={one}"],
        cwd=ROOT,
    )

    metrics = json.loads((three / "metrics.json").read_text())
    assert metrics["trainable_tokens"]["made_trainable"] == [151645] and "eval_loss_before" in metrics
    assert metrics["merge"]["max_abs_diff"] <= metrics["merge"]["tolerance"]  # merged by the main process alone
    assert (three / "sample.txt").is_file() and (three / "merged" / "model.safetensors").is_file()
    a, b = losses(one), losses(three)
    assert len(a) == len(b) == 3 and a == pytest.approx(b, abs=1e-6, rel=0), (a, b)
    wa, wb = adapter(one), adapter(three)
    assert wa.keys() == wb.keys() and any("trainable_tokens" in key for key in wa)
    assert {k: v.shape for k, v in wb.items()} == {k: v.shape for k, v in wa.items()}  # every tensor, whole
    for key in wa:  # the same sums, reduced in another order: fp32 rounding
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-6)
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"ZeRO-3, 2 processes vs 1 process × accumulation 2: max |Δadapter| {diff:.1e} over {len(wa)} tensors")


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
