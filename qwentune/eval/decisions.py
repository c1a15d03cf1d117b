"""Per-decision lines of a tool-calling eval: a row may say which decision its first assistant turn tests in a
top-level `"decision"` key (the loaders and the scorer ignore it), as the bundled held-out decision split
`data/tool_calls_decisions_eval.jsonl` does. Its first turn's record then carries the tag and the table gains one
line per decision: the share of those rows scored right (an exact call, or no call where none is due).
"""

from __future__ import annotations

from typing import Any

# Known tags in the order the table shows them, with their line's name.
DECISIONS = {
    "call": "decision: call (exact)",
    "answer": "decision: answer directly",
    "not_offered": "decision: no offered tool fits",
    "missing_argument": "decision: ask for a missing argument",
}


def decision_of(raw: Any) -> str | None:
    """The row's `"decision"` tag: a non-empty string, else None."""
    value = raw.get("decision") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and value.strip() else None


def tag_decisions(items: list, raw: Any) -> list:
    """Tag the items of one row with its decision: only its first assistant turn (the one the tag describes)."""
    decision = decision_of(raw)
    for item in items:
        if item.turn == 1:
            item.decision = decision
    return items


def decision_field(item: Any) -> dict:
    """`{"decision": tag}` for an item's record when it has one, else nothing (untagged records stay as they were)."""
    decision = getattr(item, "decision", None)
    return {"decision": decision} if decision else {}


def summarize_decisions(records: list[dict]) -> dict[str, dict]:
    """One `{"correct", "total"}` per decision tag found in the records (known tags first, then others by name)."""
    tags = {r["decision"] for r in records if r.get("decision") and r.get("verdict") is not None}
    order = [t for t in DECISIONS if t in tags] + sorted(tags - set(DECISIONS))
    out = {}
    for tag in order:
        rows = [r for r in records if r.get("decision") == tag and r.get("verdict") is not None]
        out[DECISIONS.get(tag, f"decision: {tag}")] = {"correct": sum(bool(r["verdict"]) for r in rows),
                                                       "total": len(rows)}  # fmt: skip
    return out


__all__ = ["DECISIONS", "decision_field", "decision_of", "summarize_decisions", "tag_decisions"]
