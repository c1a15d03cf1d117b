"""Several processes against one: each launch/ config trains the same rows on N processes (gradient accumulation 1)
and on one process with accumulation N; the table says tokens/s, peak memory per rank, the largest adapter and merged
difference, whether the saved adapter is complete, and (--resume) whether a run stopped by SIGTERM after a checkpoint
and resumed ends at the uninterrupted adapter.

    python benchmarks/multi_process.py --shape tiny --device cpu --configs fsdp --peft lora     # 2 CPU ranks (gloo)
    python benchmarks/multi_process.py --shape 0.5b --device cuda --processes 4                # every config, 4 GPUs
    python benchmarks/multi_process.py --configs zero3 --peft qlora --set peft.quant.compute_dtype=float32

Peak memory per rank: on CPU the peak RSS of each rank's process (VmHWM: loading, training, the adapter save and
the main rank's merge included), on CUDA the largest memory nvidia-smi showed for that process. Models are
random-weight copies of the real structure (benchmarks/train_throughput.py's model_dir); rows come in file order
(training.shuffle: false), so the two arms train exactly the same batches; --set KEY=VALUE: a recipe override, both.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
CONFIGS = {  # name: launch file
    "ddp": "ddp.yaml",
    "fsdp": "fsdp.yaml",
    "zero2": "deepspeed_zero2.yaml",
    "zero2_offload": "deepspeed_zero2_offload.yaml",
    "zero3": "deepspeed_zero3.yaml",
    "zero3_offload": "deepspeed_zero3_offload.yaml",
}
ACCELERATE = Path(sys.executable).with_name("accelerate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_config(name: str, processes: int, device: str, out: Path) -> Path:
    """launch/<file> with `processes` ranks; on CPU its FSDP/DeepSpeed part over launch/cpu_2proc.yaml (torchrun
    ranks joined over gloo)."""
    config = yaml.safe_load((ROOT / "launch" / CONFIGS[name]).read_text())
    if device == "cpu":
        cpu = yaml.safe_load((ROOT / "launch/cpu_2proc.yaml").read_text())
        for part in ("fsdp_config", "deepspeed_config"):
            if part in config:
                cpu[part] = config[part]
        if "deepspeed_config" in config:
            cpu.pop("mixed_precision")  # DeepSpeed's own config decides
        cpu["distributed_type"] = config["distributed_type"] if name != "ddp" else cpu["distributed_type"]
        config = cpu
        if config.get("deepspeed_config", {}).get("zero_stage") == 3:
            config["deepspeed_config"] = zero3_every_parameter(config["deepspeed_config"], out / f"{name}.json")
    config["num_processes"] = processes
    path = out / f"launch-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def zero3_every_parameter(plugin: dict, path: Path) -> dict:
    """The accelerate DeepSpeed keys as a DeepSpeed config file with ZeRO-3's persistence threshold at 0: every
    parameter partitioned, as a real model's LoRA matrices are (the tiny model's would otherwise stay whole)."""
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": True}
    for part in ("optimizer", "param"):
        if plugin.get(f"offload_{part}_device", "none") != "none":
            zero[f"offload_{part}"] = {"device": plugin[f"offload_{part}_device"]}
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                "gradient_clipping": "auto", "zero_optimization": zero}))  # fmt: skip
    return {"deepspeed_config_file": str(path), "zero3_init_flag": True}


def recipe_file(source: Path, peft: str, steps: int, out: Path, *, save_steps: int = 0) -> Path:
    training = {
        "learning_rate": 1e-3, "max_steps": steps, "per_device_batch_size": 1, "grad_accum": 1,
        "precision": "fp32", "gradient_checkpointing": False, "warmup_ratio": 0.0, "lr_scheduler": "constant",
        "logging_steps": 1, "seed": 0, "shuffle": False, "save_steps": save_steps or None,
    }  # fmt: skip
    recipe = {
        "model": {"source": str(source)},
        "data": {"train": [str(ROOT / "data/instructions.jsonl")], "limit": 4 * steps, "max_length": 256},
        "method": "sft",
        "peft": {"method": peft, "r": 8, "alpha": 16, "dropout": 0.0, "train_new_tokens": "off"},
        "training": training,
        "output": {"merge": True, "sample_tokens": 0},
    }
    path = out / f"recipe-{peft}-{steps}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    return found


def _rank(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"RANK=")), None)


def _gpu_mib() -> dict[int, int]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10,
        ).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(p): int(m) for p, m in (line.split(",") for line in out.splitlines() if "," in line)}


def run(cmd: list[str], device: str, log: Path, *, stop_after_step: int = 0, run_dir: Path | None = None) -> dict:
    """Run `cmd`, polling its process tree: peak MiB per rank ("main" without ranks). stop_after_step: SIGTERM to
    the whole group once metrics.jsonl has that step."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        peaks: dict[str, int] = {}
        stopped = None
        while proc.poll() is None:
            tree, stack = [], [proc.pid]
            while stack:
                pid = stack.pop()
                tree.append(pid)
                stack += _children(pid)
            gpu = _gpu_mib() if device == "cuda" else {}
            for pid in tree:
                rank = _rank(pid) or ("main" if pid == proc.pid and "accelerate" not in cmd[0] else None)
                if rank is None:
                    continue
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    mib = int(status.split("VmHWM:")[1].split()[0]) // 1024 if device == "cpu" else gpu.get(pid, 0)
                except (OSError, IndexError):
                    continue
                peaks[rank] = max(peaks.get(rank, 0), mib)
            if stop_after_step and stopped is None and run_dir is not None and _logged(run_dir) >= stop_after_step:
                os.killpg(proc.pid, signal.SIGTERM)
                stopped = time.monotonic()
            time.sleep(0.1)
    return {"rc": proc.returncode, "wall_s": round(time.monotonic() - start, 1), "peak_mib": peaks,
            "stop_to_exit_s": round(time.monotonic() - stopped, 1) if stopped else None}  # fmt: skip


def _logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "loss" in row:
            steps.append(row["step"])
    return max(steps)


def compare(one: Path, many: Path) -> dict:
    """Largest |difference| of adapter and merged weights; whether the adapter has every tensor, whole."""
    from safetensors.torch import load_file

    a = load_file(str(one / "adapter/adapter_model.safetensors"))
    b = load_file(str(many / "adapter/adapter_model.safetensors"))
    complete = a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    result = {"tensors": len(b), "complete": complete}
    if complete:
        result["adapter_diff"] = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    merged = [(one / "merged/model.safetensors"), (many / "merged/model.safetensors")]
    if all(p.is_file() for p in merged):
        ma, mb = (load_file(str(p)) for p in merged)
        result["merged_diff"] = max((ma[k].float() - mb[k].float()).abs().max().item() for k in ma)
    return result


def tokens_per_s(run_dir: Path) -> float | None:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tokens = max((r.get("num_tokens", 0) for r in rows), default=0)
    runtime = json.loads((run_dir / "metrics.json").read_text()).get("train_runtime")
    return round(tokens / runtime, 1) if tokens and runtime else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("tiny", "0.5b", "3b"), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    parser.add_argument("--peft", nargs="+", choices=("lora", "qlora"), default=["lora", "qlora"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resume", action="store_true", help="also: SIGTERM after a checkpoint, then --resume")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, both arms")
    parser.add_argument("--out", type=Path, help="where runs and logs go (default: a temp dir)")
    parser.add_argument("--json-out", type=Path)
    a = parser.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="multi_process-"))
    out.mkdir(parents=True, exist_ok=True)
    from train_throughput import model_dir

    (out / "models").mkdir(exist_ok=True)
    source = model_dir(a.shape, out / "models")
    n = a.processes
    rows = []
    for peft in a.peft:
        steps = max(a.steps, 6) if a.resume else a.steps
        recipe = recipe_file(source, peft, steps, out, save_steps=2 if a.resume else 0)
        one = out / f"one-{peft}"
        single = run([sys.executable, "-m", "qwentune", "train", str(recipe), f"training.grad_accum={n}",
                      f"output.dir={one}", *a.set], a.device, out / f"one-{peft}.log")  # fmt: skip
        print(f"1 process, {peft}: exit {single['rc']}, {single['wall_s']} s", file=sys.stderr, flush=True)
        for name in a.configs:
            many = out / f"{name}-{peft}"
            cmd = [str(ACCELERATE), "launch", "--config_file", str(launch_config(name, n, a.device, out))]
            cmd += ["--main_process_port", str(free_port()), "-m", "qwentune", "train", str(recipe)]
            cmd += ["training.grad_accum=1", f"output.dir={many}", *a.set]
            row = {"config": name, "launch": f"launch/{CONFIGS[name]}", "peft": peft, "processes": n}
            if a.resume:
                stop = run(cmd, a.device, out / f"{name}-{peft}-stop.log", stop_after_step=3, run_dir=many)
                row["stopped"] = {"rc": stop["rc"], "after_step": _logged(many), "s": stop["stop_to_exit_s"]}
                cmd = [*cmd, "--resume"]
            result = run(cmd, a.device, out / f"{name}-{peft}.log")
            log_text = (out / f"{name}-{peft}.log").read_text()
            row |= {"rc": result["rc"], "wall_s": result["wall_s"], "peak_mib": result["peak_mib"]}
            if a.resume:
                row["resumed_from"] = next((ln.split("resuming from ")[1].strip() for ln in log_text.splitlines()
                                            if "resuming from " in ln), None)  # fmt: skip
            if result["rc"] == 0 and single["rc"] == 0:
                row |= compare(one, many) | {"tokens_per_s": tokens_per_s(many)}
            else:
                row["error"] = next((ln for ln in log_text.splitlines() if ln.startswith(("error:", "internal"))), "?")
            row["one_process_peak_mib"] = single["peak_mib"].get("main")
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    steps = f"{max(a.steps, 6)} steps, SIGTERM after step 3 and --resume" if a.resume else f"{a.steps} steps"
    print(f"\n{a.shape} shape, {n} processes on {a.device}, {steps} (1 process: accumulation {n})")
    print("| config | PEFT | tokens/s | peak MiB per rank | adapter Δ vs 1 process | merged Δ | complete | resume |")
    print("|---|---|---:|---|---:|---:|---|---|")
    for r in rows:
        peaks = ", ".join(f"{k}: {v}" for k, v in sorted(r["peak_mib"].items()))
        diff = f"{r['adapter_diff']:.1e}" if "adapter_diff" in r else r.get("error", "-")
        merged = f"{r['merged_diff']:.1e}" if "merged_diff" in r else "-"
        resume = f"from {Path(r['resumed_from']).name}" if r.get("resumed_from") else "-"
        print(f"| {r['config']} | {r['peft']} | {r.get('tokens_per_s') or '-'} | {peaks} | {diff} | {merged} | "
              f"{r.get('complete', '-')} | {resume} |")  # fmt: skip
    if a.json_out:
        a.json_out.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
