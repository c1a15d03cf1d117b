#!/usr/bin/env python3
"""Generate qwentune's bundled example datasets.

Everything here is synthetic: prompts come from our own templates and every answer is computed (arithmetic, unit
factors, `datetime`, running the Python snippets, ...). Weather values, quotes, scores and other tool results are fake
(derived from a SHA-256 hash or the seeded RNG) and the currency rates are a fixed illustrative table.

Deterministic: a fixed seed, `random.Random` instances only, no `hash()`, no clock, no set iteration over strings.
Running it twice gives byte-identical files. One module per dataset kind lives in `gen/`:

    gen/instructions.py (+ tasks_math.py, tasks_text.py)  instructions.jsonl
    gen/tools.py (+ tool_catalog.py, eval_catalog.py)     tool_calls.jsonl, tool_calls_eval.jsonl, tools.json
    gen/preferences.py (+ pref_tools.py)                  preferences.jsonl, preferences_eval.jsonl
    gen/decisions.py (+ decision_catalog.py)              tool_calls_decisions{,_eval,_pairs}.jsonl

    python data/make_data.py              # regenerate the files next to this script
    python data/make_data.py --out DIR    # write the files into DIR instead

Stdlib only. Licence: Apache-2.0 (same as qwentune).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen import tools as tool_rows  # noqa: E402
from gen.common import convert, dumps, safe_eval  # noqa: E402,F401 (tests check results with these)
from gen.decisions import call_pairs, held_out_decisions, mining_decisions  # noqa: E402
from gen.instructions import make_instructions  # noqa: E402
from gen.preferences import make_preferences  # noqa: E402
from gen.tool_catalog import TRAIN_BY_NAME  # noqa: E402

SEED = 20250601
N_INSTRUCTIONS = 300
N_TOOL_TRAIN = tool_rows.N_TOOL_TRAIN
N_TOOL_EVAL = tool_rows.N_TOOL_EVAL
N_PREF_TRAIN = 300
N_PREF_EVAL = 40
# A few schemas for `qwentune chat --tools data/tools.json`.
CHAT_TOOLS = ("get_weather", "calculator", "convert_units", "get_time_in_timezone", "search_recipes")

FILES = (
    "instructions.jsonl",
    "tool_calls.jsonl",
    "tool_calls_eval.jsonl",
    "preferences.jsonl",
    "preferences_eval.jsonl",
    "tool_calls_decisions.jsonl",
    "tool_calls_decisions_eval.jsonl",
    "tool_calls_decisions_pairs.jsonl",
    "tools.json",
)


def prompt_keys(rows: list[dict]) -> set[str]:
    """Every user text in the rows (messages or prompt), used to keep eval prompts out of train."""
    keys = set()
    for row in rows:
        msgs = row.get("messages") or row.get("prompt")
        if isinstance(msgs, str):
            keys.add(msgs)
            continue
        users = [m["content"] for m in msgs if m["role"] == "user"]
        keys.update(users)
        keys.add("\n".join(users))
    return keys


def build() -> dict[str, list[dict]]:
    """All datasets. Eval prompts are kept out of every train file (not only their own), so they are really unseen."""
    instructions = make_instructions(random.Random(SEED), N_INSTRUCTIONS)
    tool_train = tool_rows.make_tool_rows(random.Random(SEED + 1), "train", N_TOOL_TRAIN, set())
    pref_train = make_preferences(random.Random(SEED + 3), "train", N_PREF_TRAIN, set())
    seen = prompt_keys(instructions + tool_train + pref_train)
    tool_eval = tool_rows.make_tool_rows(random.Random(SEED + 2), "eval", N_TOOL_EVAL, seen)
    pref_eval = make_preferences(random.Random(SEED + 4), "eval", N_PREF_EVAL, seen)
    # training tools: a tuned model's misses on them become DPO pairs; the scripted pairs start before any are mined
    mine, mine_pairs = mining_decisions(random.Random(SEED + 5), set())
    decisions_eval = held_out_decisions(random.Random(SEED + 6), seen | prompt_keys(mine))
    mine_pairs += call_pairs(random.Random(SEED + 7), seen | prompt_keys(mine + decisions_eval))
    files = [instructions, tool_train, tool_eval, pref_train, pref_eval, mine, decisions_eval, mine_pairs]
    return dict(zip(FILES[:-1], files, strict=True))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output directory")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in build().items():
        write_jsonl(args.out / name, rows)
        print(f"{name}: {len(rows)} rows")
    tools = [TRAIN_BY_NAME[name].schema for name in CHAT_TOOLS]
    (args.out / "tools.json").write_text(json.dumps(tools, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
