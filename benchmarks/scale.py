"""The whole data pipeline at scale (`preprocess.py --scale`): qwentune's `preprocess` against TRL's dataset
preparation of the same rows, each in a fresh measured process (see preprocess.py's docstring)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (ROOT / "data" / "tool_calls.jsonl", ROOT / "data" / "instructions.jsonl")


def make_rows(path: Path, n: int) -> None:
    """`n` unique rows: the bundled rows in turn, each first user turn tagged with the row's number."""
    if path.exists():
        return
    base = [line for source in SOURCES for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, line in zip(range(n), itertools.cycle(base)):
            row = json.loads(line)
            user = next(m for m in row["messages"] if m["role"] == "user")
            user["content"] = f"{user['content']} (#{i})"
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.rename(path)


def _tree(pid: int) -> list[int]:
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [q for child in f.read().split() for q in _tree(int(child))]
    except OSError:
        pass
    return out


def _anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("RssAnon:")), 0)
    except OSError:
        return 0


def measure(cmd: list[str], env: dict) -> dict:
    """Wall seconds and peak RssAnon summed over the process tree."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # not a pipe: at 200k rows the progress bars filled one and blocked it
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, sum(_anon_kb(p) for p in set(_tree(proc.pid))))
            time.sleep(0.05)
        wall = time.perf_counter() - start
        log.seek(0)
        err = log.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return {"wall": wall, "peak_anon_mb": peak / 1024}


def _cpu_of(cmd: list[str], env: dict) -> dict:
    """`measure`, with the CPU seconds of the run read from RUSAGE_CHILDREN before and after (this process waits for
    nothing else meanwhile)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = measure(cmd, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20 if folder.exists() else 0.0


def _recipe(work: Path, model: Path, rows: Path, num_proc: int, train: bool) -> Path:
    """The recipe of a qwentune arm: every row, the official template, masks. `train`: the tiny model trained on them
    (LoRA, one step of 8 rows, no merge) — what the data costs a training run (reading, rendering, the mapped set the
    Trainer samples from) up to and through its first step."""
    recipe = work / ("train.yaml" if train else "recipe.yaml")
    text = (
        f"model: {{source: {model}}}\n"
        f"data:\n  train: [{rows}]\n  template: qwen2.5-instruct\n  max_length: 4096\n  num_proc: {num_proc}\n"
    )
    if train:
        text += (
            "peft: {method: lora, r: 8, alpha: 16, train_new_tokens: 'off'}\n"
            "training: {max_steps: 1, per_device_batch_size: 1, precision: fp32, gradient_checkpointing: false}\n"
            f"output: {{dir: {work / 'run-train'}, merge: false, sample_tokens: 0, overwrite: true}}\n"
        )
    recipe.write_text(text, encoding="utf-8")
    return recipe


def run_scale(args, counts: list[int], procs: list[int]) -> None:
    work = args.workdir or Path(tempfile.gettempdir()) / "qwentune-scale"
    work.mkdir(parents=True, exist_ok=True)
    from train_throughput import model_dir

    model = model_dir("tiny", work)  # the real tokenizer and template; its random weights only the train arm loads
    print(
        f"{'rows':>9} {'arm':<22} {'wall s':>8} {'rows/s':>8} {'rows/CPU-s':>10} {'peak anon MB':>12} {'cache MB':>9}"
    )
    wanted = args.arms.split(",")
    if unknown := set(wanted) - {"qwentune", "trl", "train"}:
        raise SystemExit(f"--arms: unknown {sorted(unknown)} (qwentune, trl, train)")
    for n in counts:
        rows = work / f"rows-{n}.jsonl"
        make_rows(rows, n)
        for p in procs:
            results = {}
            for arm in wanted:
                cache = work / f"cache-{arm}"
                shutil.rmtree(cache, ignore_errors=True)
                env = dict(os.environ, HF_DATASETS_CACHE=str(cache), QWENTUNE_DATA_CACHE=str(cache / "qwentune"),
                           HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")  # fmt: skip
                if arm == "trl":
                    child = str(Path(__file__).with_name("preprocess.py"))
                    cmd = [sys.executable, child, "--child", str(rows), str(p)]
                else:
                    recipe = str(_recipe(work, model, rows, p, arm == "train"))
                    out = [] if arm == "train" else ["--output", str(work / "out")]
                    cmd = [sys.executable, "-m", "qwentune", "train" if arm == "train" else "preprocess", recipe, *out]
                r = _cpu_of(cmd, env)
                r["cache_mb"] = _size_mb(cache)
                results[arm] = r
                label = f"{arm} (num_proc {p})"
                print(
                    f"{n:>9,} {label:<22} {r['wall']:>8.1f} {n / r['wall']:>8.0f} {n / r['cpu']:>10.0f} "
                    f"{r['peak_anon_mb']:>12.0f} {r['cache_mb']:>9.0f}",
                    flush=True,
                )
            if "trl" in results and "qwentune" in results:
                q, t = results["qwentune"], results["trl"]
                print(
                    f"{'':>9} {'qwentune / TRL':<22} {t['wall'] / q['wall']:>7.2f}x {'':>8} "
                    f"{t['cpu'] / q['cpu']:>9.2f}x {q['peak_anon_mb'] / t['peak_anon_mb']:>11.2f}x",
                    flush=True,
                )
