"""Score a model on the bundled held-out tool-calling split (data/tool_calls_eval.jsonl).

    python benchmarks/score_tool_data.py MODEL_DIR [MODEL_DIR ...] [--data FILE] [--batch-size 8] [--limit N]

Each row is cut before its first assistant turn and rendered with the model's chat template and the row's tools (up
to the generation prompt); the model continues greedily. A row whose first assistant turn calls tools scores exact
when the `<tool_call>` blocks parse and name the same functions with the same arguments (JSON values compared as
values, 3 == 3.0; parallel calls in any order). A row whose first assistant turn makes no call (a direct answer or a
clarifying question) scores whether the model refrained from calling. A small stand-in until `qwentune eval` lands.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def canon(value):
    """JSON values as values: 3 and 3.0 compare equal, key order does not matter."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return [canon(v) for v in value]
    return {k: canon(v) for k, v in sorted(value.items())}


def call_key(name: str, args) -> str:
    if isinstance(args, str):
        args = json.loads(args)
    return json.dumps([name, canon(args)], sort_keys=True)


def parse_calls(text: str) -> list[str] | None:
    """The calls in a reply as comparable keys; None when a <tool_call> block is not valid JSON."""
    keys = []
    for block in CALL.findall(text):
        try:
            obj = json.loads(block)
            keys.append(call_key(obj["name"], obj.get("arguments", {})))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
    return keys


def category(row: dict) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    from gen.tools import category as data_category  # the generator's own labels

    return data_category(row)


def load(path: Path, limit: int | None) -> list[dict]:
    items = []
    for line in path.read_text(encoding="utf-8").splitlines()[:limit]:
        row = json.loads(line)
        tools = json.loads(row["tools"]) if isinstance(row.get("tools"), str) else row.get("tools")
        msgs = row["messages"]
        i = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        expected = [
            call_key(c["function"]["name"], c["function"]["arguments"]) for c in msgs[i].get("tool_calls") or []
        ]
        items.append({"prompt": msgs[:i], "tools": tools, "expected": expected, "category": category(row)})
    return items


def generate(model_dir: str, items: list[dict], batch_size: int, max_new_tokens: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    texts = [tok.apply_chat_template(it["prompt"], tools=it["tools"], add_generation_prompt=True, tokenize=False)
             for it in items]  # fmt: skip
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [""] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for i, seq in zip(idx, gen[:, enc["input_ids"].shape[1] :], strict=True):
            out[i] = tok.decode(seq, skip_special_tokens=False).split("<|im_end|>")[0]
        print(f"  {min(start + batch_size, len(order))}/{len(order)} rows", file=sys.stderr, flush=True)
    return out


def score(items: list[dict], replies: list[str]) -> dict:
    per = collections.defaultdict(lambda: [0, 0])
    rows = []
    for it, reply in zip(items, replies, strict=True):
        got = parse_calls(reply)
        if it["expected"]:
            ok = got is not None and sorted(got) == sorted(it["expected"])
        else:
            ok = "<tool_call>" not in reply
        per[it["category"]][0] += ok
        per[it["category"]][1] += 1
        rows.append({"category": it["category"], "ok": ok, "expected": it["expected"], "reply": reply})
    calls = [r for r in rows if r["expected"]]
    refrain = [r for r in rows if not r["expected"]]
    return {
        "exact": [sum(r["ok"] for r in calls), len(calls)],
        "no_call": [sum(r["ok"] for r in refrain), len(refrain)],
        "per_category": {k: v for k, v in sorted(per.items())},
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[1] / "data/tool_calls_eval.jsonl"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--output", type=Path, help="write every row's reply and verdict here (JSON)")
    args = parser.parse_args(argv)
    items = load(args.data, args.limit)
    report = {}
    for model in args.models:
        t0 = time.time()
        result = score(items, generate(model, items, args.batch_size, args.max_new_tokens))
        e, c = result["exact"], result["no_call"]
        print(f"{model}: exact {e[0]}/{e[1]}, no-call {c[0]}/{c[1]}, per category {result['per_category']} "
              f"({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
        report[model] = result
    if args.output:
        args.output.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
