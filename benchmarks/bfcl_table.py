"""One table for the decision stage (issue 27): base, Quickstart and Quickstart + decision stage, side by side, on
the held-out decision split (tools never seen in training; per decision: call, answer directly, no offered tool fits,
ask for a missing argument) and on public BFCL (benchmarks/bfcl/: simple, multiple, parallel, irrelevance).

    nice -n 10 python benchmarks/bfcl_table.py                     # the three default models, every kept row
    nice -n 10 python benchmarks/bfcl_table.py --limit 50 --output runs/bfcl-table
    python benchmarks/bfcl_table.py --model base=offline:qwen2.5-coder-0.5b-instruct --model mine=runs/my-run

Each model is anything `qwentune eval` takes (a run dir, an adapter dir, a model dir, offline:...). Two
`qwentune.evaluate` calls (the held-out files, then the four BFCL files with one merged possible-answer file), each
loading every model once; `--limit` caps BFCL questions per file (the held-out split is always scored whole, unless
`--held-out-limit`). Prints the table (deltas against the first model) and writes eval.json (every row) and eval.md
under `--output` (default runs/bfcl-table). On 2 CPU cores the real 0.5B model takes about 2-3 s a prompt: the
defaults (108 held-out rows + 400 BFCL questions) are about 20-25 minutes a model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BFCL = ROOT / "benchmarks" / "bfcl"
BFCL_FILES = ["BFCL_v4_simple_python.json", "BFCL_v4_multiple.json", "BFCL_v4_parallel.json",
              "BFCL_v4_irrelevance.json"]  # fmt: skip
HELD_OUT = [ROOT / "data" / "tool_calls_decisions_eval.jsonl"]
MODELS = [
    "base=offline:qwen2.5-coder-0.5b-instruct",
    "quickstart=runs/quickstart-tools-qlora",  # recipes/.../sft_qlora_tools.yaml
    "quickstart+decision=runs/quickstart-decision-dpo",  # recipes/.../dpo_qlora_tools_pairs.yaml
]


def parse_models(specs: list[str]) -> tuple[list[str], list[str]]:
    """(labels, models) from LABEL=MODEL specs (a bare MODEL is its own label)."""
    labels, models = [], []
    for spec in specs:
        label, sep, model = spec.partition("=")
        labels.append(label if sep else spec)
        models.append(model if sep else spec)
    return labels, models


def merged_answers(folder: Path) -> Path:
    """One possible-answer file holding every kept file's answers (ids are unique across categories; extra ids are
    fine), so that one `evaluate` call scores the four files."""
    out = Path(tempfile.mkdtemp(prefix="bfcl-answers-")) / "possible_answer.json"
    answers = [BFCL / "possible_answer" / name for name in BFCL_FILES]
    out.write_text("".join(p.read_text(encoding="utf-8") for p in answers if p.exists()), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", metavar="LABEL=MODEL", help=f"repeatable (default: {MODELS})")
    held_help = f"held-out files, pooled into one set of lines (default: {HELD_OUT[0].relative_to(ROOT)})"
    parser.add_argument("--held-out", action="append", type=Path, help=held_help)
    parser.add_argument("--limit", type=int, default=None, help="BFCL questions per file (default: all kept, 100)")
    parser.add_argument("--held-out-limit", type=int, default=None, help="rows per held-out file (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--output", type=Path, default=Path("runs/bfcl-table"))
    args = parser.parse_args(argv)

    from qwentune import evaluate

    labels, models = parse_models(args.model or MODELS)
    common = {"labels": labels, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    start = time.perf_counter()
    held = evaluate(models, [str(p) for p in args.held_out or HELD_OUT], limit=args.held_out_limit, **common)
    bfcl = evaluate(models, [str(BFCL / name) for name in BFCL_FILES], limit=args.limit,
                    bfcl_answers=merged_answers(BFCL), **common)  # fmt: skip
    for label in labels:  # one table: the held-out lines, then BFCL's
        held.metrics[label] = held.metrics.get(label, {}) | bfcl.metrics.get(label, {})
        held.rows[label] = held.rows.get(label, []) + bfcl.rows.get(label, [])
    held.data += bfcl.data
    held.scored += bfcl.scored
    held.skipped += bfcl.skipped
    held.write(args.output)
    print(held.table())
    print(f"\n{time.perf_counter() - start:.0f} s; eval.json and eval.md in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
