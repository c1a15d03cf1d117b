"""Eval generation speed: rows/s of batched left-padded greedy generation (`qwentune.eval.generate.greedy_generate`,
batch 8) vs one prompt at a time, on CPU in fp32, on the held-out tool prompts rendered with the official template.
Also checks that both give the same tokens.

    nice -n 10 python benchmarks/eval_batching.py [--model tiny|offline] [--rows 16] [--max-new-tokens 32]

`tiny`: a random model with the Qwen2.5-0.5B-Instruct structure at tiny width (it never stops early, so every row
generates max-new-tokens); `offline`: the real offline:qwen2.5-coder-0.5b-instruct.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "offline"), default="tiny")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwentune.eval.evaluation import _prompt_ids, collect
    from qwentune.eval.generate import greedy_generate
    from qwentune.rows.template import load_template

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "tiny":
        from tiny_models import tiny_model_dir

        path = tiny_model_dir(Path(tempfile.mkdtemp()))
    else:
        from qwentune.model.sources import resolve_model

        path = resolve_model("offline:qwen2.5-coder-0.5b-instruct", progress=False).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    items, _ = collect([ROOT / "data" / "tool_calls_eval.jsonl"], limit=args.rows)
    template = load_template("model", tokenizer)
    prompts = [_prompt_ids(it, tokenizer, template.text) for it in items]
    greedy_generate(model, tokenizer, prompts[:2], max_new_tokens=2, batch_size=2, progress=False)  # warm up

    timings, outputs = {}, {}
    for batch in (1, args.batch_size):
        start = time.perf_counter()
        outputs[batch] = greedy_generate(
            model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=batch, progress=False
        )
        timings[batch] = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs[1])
    print(f"model {args.model} ({path}), {len(prompts)} rows, max_new_tokens {args.max_new_tokens}, "
          f"{torch.get_num_threads()} threads, {tokens} generated tokens")  # fmt: skip
    for batch, seconds in timings.items():
        print(f"batch {batch:>2}: {seconds:7.1f} s  {len(prompts) / seconds:6.2f} rows/s")
    print(f"speed-up at batch {args.batch_size}: {timings[1] / timings[args.batch_size]:.2f}x")
    print(f"same tokens as one-at-a-time: {outputs[1] == outputs[args.batch_size]}")
    # The prompt forward (prefill) alone: one new token. Batching cannot shrink its work on a CPU (it is compute-bound
    # already at batch 1), so it bounds the speed-up: at most total(1) / (prefill + the batched decode).
    prefill = {}
    for batch in (1, args.batch_size):
        start = time.perf_counter()
        greedy_generate(model, tokenizer, prompts, max_new_tokens=1, batch_size=batch, progress=False)
        prefill[batch] = time.perf_counter() - start
    prompt_tokens = sum(len(p) for p in prompts)
    print(f"prefill only ({prompt_tokens} prompt tokens): batch 1 {prefill[1]:.1f} s, batch {args.batch_size} "
          f"{prefill[args.batch_size]:.1f} s = {prefill[1] / timings[1]:.0%} of one-at-a-time")  # fmt: skip


if __name__ == "__main__":
    main()
