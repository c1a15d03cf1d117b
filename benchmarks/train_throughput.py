"""Training throughput and peak memory: qwentune against a plain TRL + PEFT baseline on the same rows, same model.

    python benchmarks/train_throughput.py --shape tiny --seq 512 --steps 6                 # SFT LoRA, ~2 min on CPU
    python benchmarks/train_throughput.py --shape 0.5b --seq 512 --steps 4 --batch 4       # Qwen2.5-0.5B structure
    python benchmarks/train_throughput.py --shape 0.5b --method dpo --seq 512 --steps 4
    python benchmarks/train_throughput.py --shape 0.5b --peft qlora --seq 512 --steps 4
    python benchmarks/train_throughput.py --shape 3b --seq 2048 --steps 20                 # GPU; skipped on CPU
    python benchmarks/train_throughput.py --arms qwentune --trainer use_liger_kernel=true  # a `trainer:` field

Models are random-weight copies of the real structure (qwentune.model.shapes; nothing is downloaded), saved in bf16
as the published checkpoints are, with the real tokenizer and the official Qwen2.5 instruct template.

Arms, one after the other, each in its own child process (so each starts from the same state and one arm's
monkeypatches, allocator caches and peak memory do not leak into the other):
- `qwentune`: the recipe through qwentune's trainer path (`qwentune.train`: exact masks, bf16 weights for LoRA,
  TRL's fused LM head scoring only the trained positions, the recipe's packing).
- `trl`: plain TRL SFTTrainer (or DPOTrainer) on the same rows as a conversational dataset, model given by path,
  `peft_config=LoraConfig(...)` with the recipe's r/alpha/dropout/targets; every other setting TRL's default
  (SFTConfig/DPOConfig: bf16 autocast on fp32 weights, gradient checkpointing, loss on all tokens for SFT). QLoRA:
  `model_init_kwargs={"quantization_config": BitsAndBytesConfig(nf4, double quant, bf16 compute)}`.
The rows are the bundled data files filtered to those whose rendering fits `--seq`, so neither arm drops or cuts any.

Measured in each child (the first optimizer step is warm-up and not timed):
- tokens/s: non-pad tokens of the training forwards (attention_mask sum, or every token of a padding-free row) over
  the wall time of steps 2..N. DPO counts chosen + rejected tokens of the policy forward; the reference forward is
  part of the time but not counted again.
- peak memory: on CUDA `torch.cuda.max_memory_allocated()`; on CPU the child's peak RSS (`ru_maxrss`) minus its RSS
  once torch/transformers/TRL/PEFT are imported (model, data, optimizer and activations; the interpreter and
  libraries are the same in both arms), and the total peak RSS.
- FLOPs: per token 6·N + 12·L·d·s (TRL's `compute_flops_per_token`: N = matmul parameters including the LM head,
  L layers, d = heads × head_dim, s = --seq; forward + backward = 3 × forward, non-causal attention convention),
  plus 2·N for the DPO reference forward. With LoRA the frozen weights need no weight gradient, so this convention
  overstates the work done by up to 1/3; it is the one MFU figures are usually quoted in. MFU (GPU only) = model
  FLOP/s ÷ the device's dense bf16 peak (TRL's table).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPES = {"tiny": "qwen2.5-0.5b-instruct", "0.5b": "qwen2.5-0.5b-instruct", "3b": "qwen2.5-3b-instruct"}
SFT_FILES = ("data/tool_calls.jsonl", "data/instructions.jsonl")
DPO_FILES = ("data/preferences.jsonl",)
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}


# ------------------------------------------------------------------------------------------------ setup (parent)


def model_dir(shape: str, cache: Path) -> Path:
    """A random-weight bf16 model dir of `shape` with the real tokenizer and official template (built once)."""
    target = cache / f"{shape}-bf16"
    if (target / "model.safetensors").is_file() or (target / "model.safetensors.index.json").is_file():
        return target
    import torch
    from transformers import AutoTokenizer

    from qwentune.model.shapes import build_model, generation_config, real_config, tiny_config

    name = SHAPES[shape]
    config = tiny_config(name) if shape == "tiny" else real_config(name)
    print(f"building a random {shape} model ({name} structure) in {target} ...", file=sys.stderr, flush=True)
    model = build_model(config, seed=0, dtype=torch.bfloat16)
    model.generation_config = generation_config(name)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{shape}-"))
    model.save_pretrained(tmp)
    tok = AutoTokenizer.from_pretrained(ROOT / "tests/assets/qwen2.5-tokenizer")
    tok.chat_template = (ROOT / "qwentune/templates/qwen2.5-instruct.jinja").read_text()
    tok.save_pretrained(tmp)
    tmp.rename(target)
    return target


def fitting_rows(method: str, seq: int, source: Path, out: Path) -> tuple[Path, int]:
    """The bundled rows whose rendering fits `seq` tokens, as one jsonl both arms read."""
    import qwentune

    files = [str(ROOT / f) for f in (DPO_FILES if method == "dpo" else SFT_FILES)]
    rows = [json.loads(line) for f in files for line in Path(f).read_text().splitlines() if line.strip()]
    lengths = []
    for f in files:
        data = qwentune.prepare(
            {"model": {"source": str(source)}, "method": method, "data": {"train": [f], "max_length": 10**6}}
        )
        if method == "dpo":
            lengths += [
                len(p) + max(len(c), len(r))
                for p, c, r in zip(
                    data.train["prompt_input_ids"], data.train["chosen_input_ids"], data.train["rejected_input_ids"]
                )
            ]
        else:
            lengths += [len(ids) for ids in data.train["input_ids"]]
    assert len(lengths) == len(rows), (len(lengths), len(rows))
    kept = [row for row, n in zip(rows, lengths) if n <= seq]
    path = out / "rows.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))
    return path, len(kept)


# ------------------------------------------------------------------------------------------------ arms (children)


class Probe:
    """Installed the same way in both arms: every Trainer gets a step clock and a token counter on its model."""

    def __init__(self):
        self.real = 0  # non-pad tokens of training forwards
        self.padded = 0  # tokens in the batch tensors
        self.steps: list[tuple[float, int, int, float]] = []  # (time, real, padded, CPU s) at each step's end
        self.losses: list[float] = []
        self.longest = 0  # the longest batch row (padded length) a training forward saw

    def install(self) -> None:
        import torch
        import transformers

        probe = self
        original = transformers.Trainer.__init__

        class Clock(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                usage = resource.getrusage(resource.RUSAGE_SELF)
                probe.steps.append((time.perf_counter(), probe.real, probe.padded, usage.ru_utime + usage.ru_stime))

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    probe.losses.append(float(logs["loss"]))

        def count(module, args, kwargs):
            if not torch.is_grad_enabled():  # the DPO reference forward: timed, not counted again
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            probe.padded += ids.numel()
            probe.longest = max(probe.longest, ids.shape[-1])
            probe.real += int(mask.sum()) if mask is not None else ids.numel()

        def init(trainer, *args, **kwargs):
            original(trainer, *args, **kwargs)
            trainer.add_callback(Clock())
            trainer.model.register_forward_pre_hook(count, with_kwargs=True)

        transformers.Trainer.__init__ = init


def qwentune_recipe(a, source: Path, rows: Path, out: Path) -> dict:
    recipe = {
        "model": {"source": str(source)},
        "data": {"train": [str(rows)], "max_length": a.seq},
        "method": a.method,
        "peft": {"method": a.peft, **LORA},
        "training": {
            "max_steps": a.steps,
            "per_device_batch_size": a.batch,
            "grad_accum": 1,
            "precision": "bf16",
            "learning_rate": 2e-4,
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "seed": 0,
        },
        "output": {"dir": str(out / "run"), "merge": False, "sample_tokens": 0},
    }
    if a.packing:
        recipe["sft"] = {"packing": True}
    if a.no_gc:
        recipe["training"]["gradient_checkpointing"] = False
    if a.trainer:  # `trainer:` pass-through fields, typed like command-line overrides
        recipe["trainer"] = dict(qwentune_override(f"trainer.{t}") for t in a.trainer)
    return recipe


def qwentune_override(text: str) -> tuple[str, object]:
    from qwentune.recipe.load import parse_override

    parts, value = parse_override(text)
    return parts[-1], value


def run_qwentune(a, source: Path, rows: Path, out: Path) -> dict:
    import qwentune

    result = qwentune.train(qwentune_recipe(a, source, rows, out))
    return {"trainable_token_rows": len(result.metrics.get("trainable_tokens", {}).get("made_trainable") or [])}


def _plain_json(row: dict) -> dict:
    """JSON-string tool schemas and call arguments as objects (qwentune parses them; TRL passes them on as text,
    and a string schema makes `apply_chat_template` raise)."""
    row = dict(row)
    tools = row.get("tools") or []
    tools = json.loads(tools) if isinstance(tools, str) else tools
    row["tools"] = [json.loads(t) if isinstance(t, str) else t for t in tools]
    for key, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
        if isinstance(row.get(key), str):  # a text pair: as one message, so every row is conversational
            row[key] = [{"role": role, "content": row[key]}]
    for key in ("messages", "prompt", "chosen", "rejected"):
        for message in row.get(key) or []:
            for call in message.get("tool_calls") or []:
                fn = call.get("function", call)
                if isinstance(fn.get("arguments"), str):
                    fn["arguments"] = json.loads(fn["arguments"])
    return row


def run_trl(a, source: Path, rows: Path, out: Path) -> None:
    import torch
    from datasets import Dataset, Features, Json, List
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig

    data = [_plain_json(json.loads(line)) for line in rows.read_text().splitlines()]
    lora = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    common = dict(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1,
        max_steps=a.steps,
        max_length=a.seq,
        learning_rate=2e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=not torch.cuda.is_available(),  # TRL's default bf16=True is refused on CPU without it
    )
    if a.peft == "qlora":
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        common["model_init_kwargs"] = {"quantization_config": bnb}
    tokenizer = AutoTokenizer.from_pretrained(source)
    if a.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        columns = ("prompt", "chosen", "rejected", "tools")
        features = Features({c: List(Json()) for c in columns})
        dataset = Dataset.from_list([{c: row.get(c) or [] for c in columns} for row in data], features=features)
        trainer = DPOTrainer(
            model=str(source),
            args=DPOConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
        )
    else:
        from trl import SFTConfig, SFTTrainer

        features = Features({"messages": List(Json()), "tools": List(Json())})
        dataset = Dataset.from_list(
            [{"messages": row["messages"], "tools": row["tools"]} for row in data], features=features
        )
        trainer = SFTTrainer(
            model=str(source),
            args=SFTConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
        )
    trainer.train()


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(a) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import datasets
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import trl  # noqa: F401

    datasets.disable_progress_bars()
    cuda = torch.cuda.is_available()
    rss_start = rss_bytes()
    probe = Probe()
    probe.install()
    out = Path(a.out)
    run = run_qwentune if a.child == "qwentune" else run_trl
    extra = run(a, Path(a.model_dir), Path(a.rows), out) or {}
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    timed = probe.steps[1:] if len(probe.steps) > 1 else probe.steps
    (t0, r0, p0, c0), (t1, r1, p1, c1) = probe.steps[0], timed[-1]
    seconds = t1 - t0
    return {
        "arm": a.child,
        "steps_timed": len(timed) - (1 if len(probe.steps) > 1 else 0),
        "seconds": seconds,
        "tokens": r1 - r0,
        "padded_tokens": p1 - p0,
        "tokens_per_s": (r1 - r0) / seconds if seconds > 0 else float("nan"),
        "cpu_seconds": c1 - c0,
        "peak_rss": peak_rss,
        "rss_start": rss_start,
        "peak_rss_delta": peak_rss - rss_start,
        "cuda_max_allocated": torch.cuda.max_memory_allocated() if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
        "losses": probe.losses,
        "longest_row": probe.longest,
        **extra,
    }


# ------------------------------------------------------------------------------------------------ report (parent)


def flops_per_token(source: Path, seq: int, method: str) -> float:
    from transformers import AutoConfig
    from trl.trainer.utils import compute_flops_per_token

    config = AutoConfig.from_pretrained(source)
    train = compute_flops_per_token(config, seq)
    return train + (train / 3 if method == "dpo" else 0)  # DPO: + one reference forward (= 1/3 of fwd+bwd)


def mfu(device: str, achieved: float) -> float | None:
    try:
        from trl.trainer.utils import get_peak_flops

        peak = get_peak_flops(device, "bfloat16")
    except (ImportError, TypeError):
        return None
    return achieved / peak if peak else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--method", choices=("sft", "dpo"), default="sft")
    parser.add_argument("--peft", choices=("lora", "qlora"), default="lora")
    parser.add_argument("--seq", type=int, default=512, help="max tokens per row (rows longer are left out)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per arm; the first is not timed")
    parser.add_argument("--batch", type=int, default=4, help="rows (DPO: pairs) per step")
    parser.add_argument("--packing", action="store_true", help="qwentune arm: sft.packing (padding-free BFD)")
    parser.add_argument("--no-gc", action="store_true", help="qwentune arm: training.gradient_checkpointing false")
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        help="CPU: glibc's MALLOC_MMAP_THRESHOLD_ for both arms, e.g. 65536. Without it glibc raises its threshold "
        "after big frees and serves later tensors from a heap that fragments: one arm's peak RSS moved by ±30%% "
        "between identical runs. With it freed tensors leave the resident set (a steadier peak), but every big "
        "allocation faults in fresh pages, so tokens/s are not comparable with a run without it.",
    )
    parser.add_argument("--arms", default="qwentune,trl")
    parser.add_argument("--trainer", action="append", default=[], metavar="FIELD=VALUE", help="qwentune arm: trainer:")
    parser.add_argument("--json-out", help="also write the results, FLOPs/token and the qwentune recipe here")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "qwentune-bench-models"))
    parser.add_argument("--allow-cpu-3b", action="store_true", help="run the 3B shape even without a GPU")
    # internal: one arm in this process
    parser.add_argument("--child", choices=("qwentune", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    a = parser.parse_args()

    if a.child:
        result = child(a)
        Path(a.json).write_text(json.dumps(result))
        return 0

    import torch

    if a.shape == "3b" and not torch.cuda.is_available() and not a.allow_cpu_3b:
        print("the 3b shape is skipped on CPU (use --allow-cpu-3b to run it anyway)")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    source = model_dir(a.shape, cache)
    work = Path(tempfile.mkdtemp(prefix="qwentune-bench-"))
    try:
        rows, n = fitting_rows(a.method, a.seq, source, work)
        print(
            f"{a.method} {a.peft} on the {a.shape} shape: {n} rows fit seq {a.seq}; batch {a.batch}, "
            f"{a.steps} steps per arm (first untimed)",
            flush=True,
        )
        results = {}
        for arm in a.arms.split(","):
            out = work / arm
            out.mkdir()
            result_path = work / f"{arm}.json"
            argv = [
                sys.executable,
                __file__,
                "--child",
                arm,
                "--model-dir",
                str(source),
                "--rows",
                str(rows),
                "--out",
                str(out),
                "--json",
                str(result_path),
                "--shape",
                a.shape,
                "--method",
                a.method,
                "--peft",
                a.peft,
                "--seq",
                str(a.seq),
                "--steps",
                str(a.steps),
                "--batch",
                str(a.batch),
            ]
            argv += ["--packing"] * a.packing + ["--no-gc"] * a.no_gc + [f"--trainer={t}" for t in a.trainer]
            start = time.perf_counter()
            env = dict(os.environ)
            if a.mmap_threshold:  # both arms; see --mmap-threshold
                env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
            proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
            if proc.returncode:
                print(proc.stderr[-4000:], file=sys.stderr)
                print(f"arm {arm} failed (exit {proc.returncode})")
                return 1
            results[arm] = json.loads(result_path.read_text())
            print(f"  {arm}: done in {time.perf_counter() - start:.0f} s", flush=True)
        fpt = flops_per_token(source, a.seq, a.method)
        report(results, fpt)
        if a.json_out:
            recipe = qwentune_recipe(a, source, rows, work)
            Path(a.json_out).write_text(json.dumps({"results": results, "flops_per_token": fpt, "recipe": recipe}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict, fpt: float) -> None:
    gib = 2**30
    print(
        f"\n{'arm':10} {'tokens/s':>9} {'tok/CPU-s':>9} {'pad share':>9} {'peak mem':>10} {'peak RSS':>9} "
        f"{'GFLOP/s':>8} {'MFU':>6}  first/last loss"
    )
    for arm, r in results.items():
        mem = r["cuda_max_allocated"] if r["cuda_max_allocated"] is not None else r["peak_rss_delta"]
        achieved = r["tokens_per_s"] * fpt
        m = mfu(r["device"], achieved) if r["cuda_max_allocated"] is not None else None
        pad = 1 - r["tokens"] / r["padded_tokens"] if r["padded_tokens"] else 0.0
        losses = f"{r['losses'][0]:.3f}/{r['losses'][-1]:.3f}" if r["losses"] else "-"
        per_cpu = r["tokens"] / r["cpu_seconds"] if r["cpu_seconds"] else float("nan")
        print(
            f"{arm:10} {r['tokens_per_s']:9.1f} {per_cpu:9.1f} {pad:9.1%} {mem / gib:8.2f}Gi "
            f"{r['peak_rss'] / gib:7.2f}Gi "
            f"{achieved / 1e9:8.1f} {'' if m is None else f'{m:.1%}':>6}  {losses}"
        )
    if "qwentune" in results and "trl" in results:
        q, t = results["qwentune"], results["trl"]
        key = "cuda_max_allocated" if q["cuda_max_allocated"] is not None else "peak_rss_delta"
        cpu_ratio = (q["tokens"] / q["cpu_seconds"]) / (t["tokens"] / t["cpu_seconds"])
        print(
            f"\nqwentune / trl: tokens/s {q['tokens_per_s'] / t['tokens_per_s']:.2f}x "
            f"(per CPU second {cpu_ratio:.2f}x), "
            f"peak memory {q[key] / t[key]:.2f}x"
            + ("" if key == "cuda_max_allocated" else f" (total peak RSS {q['peak_rss'] / t['peak_rss']:.2f}x)")
        )
    r = next(iter(results.values()))
    print(
        f"device: {r['device']}; memory: "
        + (
            "CUDA max allocated"
            if r["cuda_max_allocated"] is not None
            else "peak RSS of the arm's own process minus its RSS after imports"
        )
        + f"; FLOPs/token {fpt / 1e9:.2f} G"
    )


if __name__ == "__main__":
    sys.exit(main())
