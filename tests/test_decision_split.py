"""The held-out decision split (data/tool_calls_decisions_eval.jsonl) and the mining rows (tool_calls_decisions.jsonl):
counts per decision, tools never seen in training, near-miss "no offered tool fits" rows, rows the template renders,
and `qwentune eval`'s per-decision lines."""

from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path

import pytest

from qwentune.eval.decisions import DECISIONS, summarize_decisions
from qwentune.eval.evaluation import collect, summarize
from qwentune.eval.toolscore import score_tool_calls
from qwentune.rows import convert, load_template
from qwentune.rows.render import render_batch

DATA = Path(__file__).resolve().parent.parent / "data"
SPLIT, MINE = DATA / "tool_calls_decisions_eval.jsonl", DATA / "tool_calls_decisions.jsonl"
TRAIN_FILES = ("tool_calls.jsonl", "preferences.jsonl", "preferences_eval.jsonl")


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tools_of(row: dict) -> dict[str, dict]:
    tools = json.loads(row["tools"]) if isinstance(row["tools"], str) else row["tools"]
    return {t["function"]["name"]: t["function"] for t in tools}


def users(row: dict) -> list[str]:
    msgs = row.get("messages") or row["prompt"]
    return [msgs] if isinstance(msgs, str) else [m["content"] for m in msgs if m["role"] == "user"]


def first_turn(row: dict) -> dict:
    return next(m for m in row["messages"] if m["role"] == "assistant")


def training_tools() -> dict[str, set[str]]:
    """Tool name → its parameter schemas, over every training file and tools.json."""
    out = collections.defaultdict(set)
    for name in TRAIN_FILES:
        for row in rows_of(DATA / name):
            for tool in tools_of(row).values() if "tools" in row else []:
                out[tool["name"]].add(json.dumps(tool["parameters"], sort_keys=True))
    for tool in json.loads((DATA / "tools.json").read_text()):
        out[tool["function"]["name"]].add(json.dumps(tool["function"]["parameters"], sort_keys=True))
    return out


def pattern(template: str) -> re.Pattern:
    """A prompt template (`{placeholders}`, an optional `|implied` tail) as a regex over the texts it makes."""
    parts = re.split(r"\{\w+\}", template.partition("|")[0])
    return re.compile("(.+?)".join(map(re.escape, parts)) + "$")


def test_counts_per_decision():
    split = collections.Counter(r["decision"] for r in rows_of(SPLIT))
    assert split == {"call": 36, "answer": 24, "not_offered": 24, "missing_argument": 24}
    assert all(split[k] >= 20 for k in DECISIONS)
    assert collections.Counter(r["decision"] for r in rows_of(MINE)) == {k: 24 for k in DECISIONS}
    for path in (SPLIT, MINE):
        rows = rows_of(path)
        assert len({tuple(users(r)) for r in rows}) == len(rows), "every prompt differs"
        for row in rows:
            calls = first_turn(row).get("tool_calls")
            assert bool(calls) == (row["decision"] == "call"), row
            assert 2 <= len(tools_of(row)) <= 5


def test_split_tools_are_never_seen_in_training():
    """No tool of the held-out split occurs by name or schema in a training file (nor in the mining rows); the mining
    rows use training tools only; every held-out tool is called at least once and is the missing tool of a row."""
    train = training_tools()
    held = collections.defaultdict(set)
    for row in rows_of(SPLIT):
        for tool in tools_of(row).values():
            held[tool["name"]].add(json.dumps(tool["parameters"], sort_keys=True))
    mined = {name for row in rows_of(MINE) for name in tools_of(row)}
    assert len(held) == 20 and not set(held) & (set(train) | mined)
    assert not set().union(*held.values()) & set().union(*train.values())
    assert mined <= set(train)
    called = {c["function"]["name"] for r in rows_of(SPLIT) for c in first_turn(r).get("tool_calls") or []}
    assert called == set(held)
    train_users = {u for name in TRAIN_FILES + ("instructions.jsonl",) for r in rows_of(DATA / name) for u in users(r)}
    assert not {u for r in rows_of(SPLIT) for u in users(r)} & train_users


def _requested(text: str, pool) -> list:
    """The tools one of whose prompt templates makes `text`."""
    return [t for t in pool if any(pattern(p).match(text) for p in t.prompts)]


@pytest.mark.parametrize("path", [SPLIT, MINE], ids=["held_out", "mining"])
def test_not_offered_rows_offer_a_near_miss_and_ask_rows_miss_an_argument(path):
    """A "no offered tool fits" request is one a known tool serves; that tool is not offered but its near miss (the
    same domain, another action) is. A "missing argument" request is a clarifying template of an offered tool, and
    the reply a question."""
    if str(DATA) not in sys.path:
        sys.path.insert(0, str(DATA))  # data/gen, as make_data.py imports it
    from gen.decision_catalog import DECISION_TOOLS, SIBLINGS, TRAIN_SIBLINGS
    from gen.tool_catalog import TRAIN_TOOLS

    pool, siblings = (DECISION_TOOLS, SIBLINGS) if path == SPLIT else (TRAIN_TOOLS, TRAIN_SIBLINGS)
    wanted = set()
    for row in rows_of(path):
        offered, (text,) = tools_of(row), users(row)
        reply = first_turn(row)["content"]
        if row["decision"] == "not_offered":
            absent = [t for t in _requested(text, pool) if t.name not in offered]
            near = [t for t in absent if set(siblings[t.name]) & set(offered)]
            assert near, (text, list(offered))
            assert reply.startswith("I can't do that")
            wanted.update(t.name for t in near)
        elif row["decision"] == "missing_argument":
            assert reply.endswith("?")
            assert any(pattern(v[0]).match(text) for t in pool if t.name in offered for v in t.vague), text
    assert len(wanted) >= (20 if path == SPLIT else 15)


def test_every_row_renders_and_eval_reads_it_tagged(qwen_tokenizer):
    """Every row renders with the Qwen template as training renders it; `qwentune eval` reads each as one first-turn
    item tagged with its decision, and the per-decision lines count right replies."""
    template = load_template("qwen2.5-instruct")
    for path in (SPLIT, MINE):
        rows = rows_of(path)
        rendered = render_batch([convert(r, "messages") for r in rows], qwen_tokenizer, template)
        assert all(not hasattr(r, "reason") for r in rendered), [getattr(r, "reason", "") for r in rendered]
        assert max(len(r.input_ids) for r in rendered) < 1024
    items, skipped = collect([SPLIT])
    assert not skipped and len(items) == 108
    assert [it.decision for it in items] == [r["decision"] for r in rows_of(SPLIT)]
    assert all((it.kind == "tool_call") == (it.decision == "call") for it in items)

    def records(replies):
        return [{"kind": it.kind, "decision": it.decision, "verdict": score_tool_calls(r, it.expected, it.tools).ok}
                for it, r in zip(items, replies)]  # fmt: skip

    blocks = ["".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>\n" for c in it.expected) for it in items]
    perfect = [b or "Sure." for b in blocks]
    lines = summarize_decisions(records(perfect))
    assert lines == {DECISIONS[k]: {"correct": n, "total": n} for k, n in
                     (("call", 36), ("answer", 24), ("not_offered", 24), ("missing_argument", 24))}  # fmt: skip
    always = '<tool_call>\n{"name": "get_tide_times", "arguments": {"harbor": "Kinsale"}}\n</tool_call>'
    lines = summarize(records([always] * len(items)))
    assert lines["decision: no offered tool fits"] == {"correct": 0, "total": 24}
    assert lines["decision: ask for a missing argument"] == {"correct": 0, "total": 24}
    assert lines["no call: refrained"] == {"correct": 0, "total": 72}
    untagged = summarize([{k: v for k, v in r.items() if k != "decision"} for r in records(perfect)])
    assert not any(name.startswith("decision:") for name in untagged)


def test_cli_prints_the_decision_lines(tmp_path, tiny_model_path):
    from cli_in_process import run_main

    out = tmp_path / "out"
    code, err = run_main(["eval", str(tiny_model_path), "--data", str(SPLIT), "--limit", "6", "--max-new-tokens",
                          "2", "--output", str(out)])  # fmt: skip
    assert code == 0, err
    result = json.loads((out / "eval.json").read_text())
    metrics = result["metrics"][str(tiny_model_path)]
    tags = collections.Counter(r["decision"] for r in rows_of(SPLIT)[:6])
    assert {k: v["total"] for k, v in metrics.items() if k.startswith("decision:")} == {
        DECISIONS[k]: n for k, n in tags.items()
    }
    assert [r["decision"] for r in result["rows"][str(tiny_model_path)]] == [r["decision"] for r in rows_of(SPLIT)[:6]]
    assert "decision: " in (out / "eval.md").read_text()
    pairs, rows = tmp_path / "pairs.jsonl", tmp_path / "rows.jsonl"  # mined: each pair names its row's decision
    rows.write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows_of(MINE) if r["decision"] == "call"][:2]))
    args = ["--data", str(rows), "--max-new-tokens", "4", "--samples", "2", "--pairs", str(pairs)]
    code, err = run_main(["eval", str(tiny_model_path), *args])
    assert code == 0, err
    assert rows_of(pairs) and all(p["meta"]["decision"] == "call" for p in rows_of(pairs))  # the tiny model misses


def test_scripted_pairs_read_as_dpo_rows(qwen_tokenizer):
    """tool_calls_decisions_pairs.jsonl: one pair per mining row, chosen = the row's turn, rejected = a wrong reply of
    the kind the Quickstart makes (a call where none is due or with a made-up argument, no call where one is due);
    then the call pairs (chosen calls, rejected asks for a given argument or refuses), so that at least as many pairs
    choose a call as choose no call over one; every pair converts and renders as `method: dpo` reads it."""
    from qwentune.rows import render_preference_batch

    pairs, mined = rows_of(DATA / "tool_calls_decisions_pairs.jsonl"), rows_of(MINE)
    scripted, extra = pairs[: len(mined)], pairs[len(mined) :]
    assert len(extra) == 72 and all(p["meta"]["rejected"] in ("asked_anyway", "refused_anyway") for p in extra)
    held_out = {text for row in rows_of(SPLIT) for text in users(row)}
    for pair in extra:
        assert pair["chosen"][0]["tool_calls"] and not pair["rejected"][0].get("tool_calls")
        assert not set(users(pair)) & held_out
    choose_call = sum(bool(p["chosen"][0].get("tool_calls")) for p in pairs)
    reject_call = sum(bool(p["rejected"][0].get("tool_calls")) for p in pairs)
    assert choose_call >= reject_call, (choose_call, reject_call)  # else DPO teaches "never call" (issue 27)
    for pair, row in zip(scripted, mined):
        assert pair["meta"]["decision"] == row["decision"] and pair["chosen"] == [first_turn(row)]
        assert pair["prompt"] == row["messages"][: row["messages"].index(first_turn(row))]
        wrong_calls = pair["rejected"][0].get("tool_calls")
        if row["decision"] == "call":
            assert len(wrong_calls or []) < len(first_turn(row)["tool_calls"])
        else:
            assert wrong_calls and all(c["function"]["name"] in tools_of(row) for c in wrong_calls)
    canonical = [convert(p, "preference") for p in pairs]
    rendered = render_preference_batch(canonical, qwen_tokenizer, load_template("qwen2.5-instruct"))
    assert all(not hasattr(r, "reason") for r in rendered)


def test_decision_stage_recipe_validates_before_the_quickstart_ran(monkeypatch):
    """The DPO recipe continues the Quickstart's adapter: `validate` notes it is not there yet; training refuses."""
    from qwentune.errors import QwentuneError
    from qwentune.recipe.load import load_recipe
    from qwentune.training.dpo import check_dpo_recipe
    from qwentune.training.validate import validate_recipe

    root = DATA.parent
    monkeypatch.chdir(root)
    path = "recipes/qwen2.5-coder-0.5b-instruct-offline/dpo_qlora_tools_pairs.yaml"
    recipe = load_recipe(path)
    assert recipe.model.adapter == "runs/quickstart-tools-qlora/adapter"
    if (root / recipe.model.adapter).exists():
        pytest.skip("the Quickstart has run here")
    lines = validate_recipe(path)
    assert lines[0].endswith("ok") and any("model.adapter runs/quickstart-tools-qlora/adapter is not there" in line
                                           for line in lines), lines  # fmt: skip
    with pytest.raises(QwentuneError, match="'model.adapter' is not a PEFT adapter dir"):
        check_dpo_recipe(recipe, path)
