"""Rows/s of `render_batch` (ids + exact masks) against a loop of `apply_chat_template(tokenize=True)` (ids only,
no mask) and against TRL's own SFT dataset preparation, on ~1000 generated tool-calling conversations.

    python benchmarks/preprocess.py [--rows 1000] [--repeat 3] [--no-trl]

Prints the best of `--repeat` runs of each, and the ratios (timings on a shared 2-core machine are noisy).

At scale, the whole pipeline as a user runs it, against TRL 1.16's SFTTrainer dataset preparation of the same rows:

    python benchmarks/preprocess.py --scale 20000,200000,1000000 [--num-proc 1,2] [--workdir DIR]
        [--arms qwentune,trl,train]

writes N unique rows (the bundled tool sessions and instructions, each user turn tagged with its row number; kept in
--workdir between runs), then runs `qwentune preprocess` on them (the Qwen2.5 tokenizer and official template, masks
verified) and TRL's `_prepare_dataset` on `datasets.load_dataset("json")` of the same file (ids only: TRL refuses
masks with the official template), each in a fresh process with an empty cache. Per run: wall seconds, rows per
second, rows per CPU-second (the process and its `num_proc` workers), peak anonymous memory summed over the process
tree (RssAnon sampled every 50 ms; memory-mapped Arrow pages are file-backed and do not count), and the cache's size.
The `train` arm (not run unless named) is `qwentune train` of a tiny random model (Qwen2.5-0.5B's structure, LoRA, one
step of 8 rows, no merge) on the same rows: the data's memory in a training run up to and through its first step.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_web",
            "description": "Search the web and return snippets.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                "required": ["query"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression.",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"],
            },
        },
    },
]
CITIES = ["Paris", "Tokyo", "São Paulo", "Zürich", "北京", "Lagos", "Reykjavík", "Montréal"]
WORDS = "the a weather is looks sunny cold warm rain today tomorrow answer result about roughly 😀 很好".split()


def _sentence(rng: random.Random, n: tuple[int, int] = (4, 30)) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*n))).capitalize() + "."


def make_conversations(n: int, seed: int = 0) -> list[dict]:
    """`n` tool-calling conversations: system (sometimes), 1–3 rounds of user → tool call(s) → results → answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        msgs = [{"role": "system", "content": "You are a helpful assistant with tools."}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": _sentence(rng)})
            if rng.random() < 0.75:
                calls = []
                for _ in range(rng.choice([1, 1, 2, 3])):
                    city = rng.choice(CITIES)
                    calls.append(
                        {
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": {"city": city, "unit": "celsius"}},
                        }
                    )
                content = _sentence(rng, (3, 8)) if rng.random() < 0.3 else ""
                msgs.append({"role": "assistant", "content": content, "tool_calls": calls})
                for call in calls:
                    city = call["function"]["arguments"]["city"]
                    msgs.append(
                        {
                            "role": "tool",
                            "name": "get_weather",
                            "content": f'{{"city": "{city}", "temp": {rng.randint(-10, 35)}}}',
                        }
                    )
            msgs.append({"role": "assistant", "content": _sentence(rng)})
        rows.append({"messages": msgs, "tools": TOOLS})
    return rows


def _best(fn, repeat: int) -> tuple[float, float]:
    """Best wall-clock seconds and best CPU seconds (all threads) over `repeat` runs."""
    walls, cpus = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-trl", action="store_true", help="skip TRL's SFT dataset preparation")
    parser.add_argument(
        "--arms",
        default="qwentune,trl",
        help="--scale: which runs, in order: qwentune (preprocess), trl (its dataset preparation), train (tiny model)",
    )
    parser.add_argument("--scale", default=None, help="row counts for the whole-pipeline runs, e.g. 20000,200000")
    parser.add_argument("--num-proc", default="1,2", help="data.num_proc values for --scale (comma-separated)")
    parser.add_argument("--workdir", type=Path, default=None, help="--scale: keep the row files here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _trl_child(*args.child)
    if args.scale:
        from scale import run_scale

        return run_scale(args, [int(n) for n in args.scale.split(",")], [int(p) for p in args.num_proc.split(",")])

    from transformers import AutoTokenizer

    from qwentune.rows.render import Rendered, render_batch
    from qwentune.rows.template import load_template

    tok = AutoTokenizer.from_pretrained(ROOT / "tests" / "assets" / "qwen2.5-tokenizer")
    template = load_template("qwen2.5-instruct")
    tok.chat_template = template.text
    rows = make_conversations(args.rows)
    out = render_batch(rows, tok, template)
    assert all(isinstance(r, Rendered) for r in out), [r for r in out if not isinstance(r, Rendered)][:3]
    tokens = sum(len(r.input_ids) for r in out)
    print(
        f"{len(rows)} conversations, {tokens / len(rows):.0f} tokens each on average, "
        f"{sum(len(r.trained_spans) for r in out) / len(rows):.1f} trained turns each"
    )

    ours, ours_cpu = _best(lambda: render_batch(rows, tok, template), args.repeat)

    def loop() -> None:
        for row in rows:
            tok.apply_chat_template(row["messages"], tools=row["tools"], tokenize=True)

    plain, plain_cpu = _best(loop, args.repeat)
    n = len(rows)
    print("                                                   rows/s   CPU ms/row   (ratio: wall, CPU)")
    print(f"render_batch (ids + exact masks)               {n / ours:8.0f}   {ours_cpu / n * 1e3:8.3f}")
    print(
        f"apply_chat_template(tokenize=True) loop (ids)  {n / plain:8.0f}   {plain_cpu / n * 1e3:8.3f}"
        f"     {plain / ours:.2f}x, {plain_cpu / ours_cpu:.2f}x"
    )
    if not args.no_trl:
        trl = _trl_prep_seconds(rows, tok, args.repeat)
        if trl is not None:
            print(
                f"TRL SFTTrainer._prepare_dataset (ids)          {n / trl[0]:8.0f}   {trl[1] / n * 1e3:8.3f}"
                f"     {trl[0] / ours:.2f}x, {trl[1] / ours_cpu:.2f}x"
            )


def _trl_prep_seconds(rows: list[dict], tok, repeat: int) -> tuple[float, float] | None:
    """TRL's own `_prepare_dataset` on the same rows (from a datasets.Dataset that keeps the JSON intact), without
    building a model: what SFTTrainer runs before training. assistant_only_loss stays off (TRL refuses the official
    template for it), so TRL does less work here than we do."""
    try:
        import datasets
        from datasets import Dataset, Features, Json, List
        from trl import SFTConfig, SFTTrainer
    except ImportError as exc:
        print(f"(TRL comparison skipped: {exc})")
        return None
    datasets.disable_progress_bars()
    features = Features({"messages": List(Json()), "tools": List(Json())})
    ds = Dataset.from_list(rows, features=features)
    trainer = object.__new__(SFTTrainer)
    trainer._tokenizer = tok
    trainer.processor = tok
    trainer.chat_template = None
    trainer.completion_only_loss = False
    args = SFTConfig(output_dir=os.devnull, report_to=[], max_length=None, use_cpu=True, bf16=False)

    def prep() -> None:
        trainer._prepare_dataset(ds, tok, args, packing=False, formatting_func=None, dataset_name="bench")

    datasets.disable_caching()
    return _best(prep, repeat)


def _trl_child(path: str, num_proc: str) -> None:
    """TRL's SFTTrainer dataset preparation of a jsonl file, in this (measured) process, as before training."""
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from qwentune.rows.template import load_template

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(ROOT / "tests" / "assets" / "qwen2.5-tokenizer")
    tok.chat_template = load_template("qwen2.5-instruct").text
    ds = datasets.load_dataset("json", data_files=path, split="train")
    trainer = object.__new__(SFTTrainer)
    trainer._tokenizer = tok
    trainer.processor = tok
    trainer.chat_template = None
    trainer.completion_only_loss = False
    args = SFTConfig(
        output_dir=os.devnull, report_to=[], max_length=None, use_cpu=True, bf16=False, dataset_num_proc=int(num_proc)
    )
    out = trainer._prepare_dataset(ds, tok, args, packing=False, formatting_func=None, dataset_name="train")
    print(len(out))


if __name__ == "__main__":
    main()
