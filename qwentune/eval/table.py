"""The result of `qwentune eval`: metrics per model, every scored row, and the renderings — a printed table (models
as columns, deltas against the first), eval.json and eval.md (for a model card), written atomically."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..export import public_path
from ..files import atomic_write_json, atomic_write_text


def _cell(metric: dict | None) -> str:
    if metric is None:
        return "-"
    if "correct" in metric:
        total = metric["total"]
        pct = 100.0 * metric["correct"] / total if total else 0.0
        return f"{metric['correct']}/{total} ({pct:.1f}%)"
    return f"{metric['value']:.4g}"


def _delta(first: dict | None, other: dict | None) -> str:
    if first is None or other is None:
        return "-"
    if "correct" in first:
        a = first["correct"] / first["total"] if first["total"] else 0.0
        b = other["correct"] / other["total"] if other["total"] else 0.0
        return f"{100.0 * (b - a):+.1f} pt"
    return f"{other['value'] - first['value']:+.4g}"


@dataclass
class EvalResult:
    models: list[str]
    data: list[str]
    metrics: dict[str, dict[str, dict]] = field(default_factory=dict)  # model → metric → {correct,total}|{value,total}
    rows: dict[str, list[dict]] = field(default_factory=dict)  # model → one record per scored row
    skipped: list[dict] = field(default_factory=list)  # {file, row, reason}
    turns: str = "first"  # which assistant turns of a row were scored: its first, or all
    scored: list[dict] = field(default_factory=list)  # {file, rows, turns}: per data file, rows and turns scored
    pairs: Any = None  # eval.pairs.MinedPairs when --pairs mined the misses
    notes: list[str] = field(default_factory=list)  # one line per endpoint: where its tool calls came from, ...

    def metric_names(self) -> list[str]:
        names: list[str] = []
        for model in self.models:
            names += [n for n in self.metrics.get(model, {}) if n not in names]
        return names

    def _grid(self) -> tuple[list[str], list[list[str]]]:
        header = ["metric", *self.models]
        if len(self.models) > 1:
            header += [f"Δ {m} vs {self.models[0]}" for m in self.models[1:]]
        body = []
        for name in self.metric_names():
            values = [self.metrics.get(m, {}).get(name) for m in self.models]
            body.append([name, *map(_cell, values), *(_delta(values[0], v) for v in values[1:])])
        return header, body

    def table(self) -> str:
        """The plain-text table printed by the CLI, plus one line per skip reason."""
        header, body = self._grid()
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + self.scored_lines() + self.skip_lines() + self.notes)

    def scored_lines(self) -> list[str]:
        """Per data file: `FILE: 3 rows, 14 turns scored (every assistant turn)`, or `FILE: 40 rows scored (the
        first assistant turn of each)`."""
        lines = []
        for s in self.scored:
            rows = f"{s['rows']} row{'' if s['rows'] == 1 else 's'}"
            if self.turns == "all":
                lines.append(f"{s['file']}: {rows}, {s['turns']} turn{'' if s['turns'] == 1 else 's'} scored "
                             "(every assistant turn)")  # fmt: skip
            else:
                lines.append(f"{s['file']}: {rows} scored (the first assistant turn of each)")
        return lines

    def skip_lines(self) -> list[str]:
        by: dict[tuple[str, str], list[int]] = defaultdict(list)
        for s in self.skipped:
            by[(s["file"], s["reason"])].append(s["row"])
        return [
            f"{file}: {len(rows)} row(s) skipped ({reason}: rows {', '.join(map(str, rows[:10]))}"
            f"{', ...' if len(rows) > 10 else ''})"
            for (file, reason), rows in by.items()
        ]

    def markdown(self) -> str:
        """The table as markdown (for a model card: data files by their name, never a machine path)."""
        header, body = self._grid()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        data = ", ".join(f"`{public_path(d)}`" for d in self.data)
        if self.turns == "all":
            rows, turns = sum(s["rows"] for s in self.scored), sum(s["turns"] for s in self.scored)
            data += f" ({rows} rows, {turns} turns: every assistant turn)"
        return f"## Evaluation\n\nData: {data}\n\n" + "\n".join(lines) + "\n"

    def summary(self, *, held_out: bool = False) -> str:
        """One line, e.g. `tool calls on 40 held-out prompts: base 0/40 → tuned 37/40; no call on 10 held-out
        prompts: base 10/10 → tuned 9/10` (tool calls and no-call when scored; else BFCL, preferences or loss)."""
        names = self.metric_names()
        picked = [n for n in ("tool calls: exact", "no call: refrained") if n in names]
        fallback = ("bfcl overall", "preference: accuracy", "vl: exact", "sft: loss", "vl: loss")
        picked = picked or [n for n in fallback if n in names][:1]
        if not picked:
            return "nothing scored"
        return "; ".join(self._summary_part(name, "held-out " if held_out else "") for name in picked)

    def _summary_part(self, name: str, held: str) -> str:
        total = next(self.metrics[m][name]["total"] for m in self.models if name in self.metrics.get(m, {}))
        plural = "" if total == 1 else "s"
        what = {
            "tool calls: exact": f"tool calls on {total} {held}prompt{plural}",
            "no call: refrained": f"no call on {total} {held}prompt{plural}",
            "bfcl overall": f"BFCL on {total} {held}question{plural}",
            "preference: accuracy": f"preference accuracy on {total} {held}pair{plural}",
            "sft: loss": f"loss on {total} {held}row{plural}",
            "vl: exact": f"short answers on {total} {held}image row{plural}",
            "vl: loss": f"loss on {total} {held}image row{plural}",
        }[name]
        parts = []
        for model in self.models:
            metric = self.metrics.get(model, {}).get(name)
            cell = (
                "-"
                if metric is None
                else (f"{metric['correct']}/{metric['total']}" if "correct" in metric else f"{metric['value']:.4g}")
            )
            parts.append(f"{model} {cell}")
        return f"{what}: " + " → ".join(parts)

    def to_dict(self) -> dict:
        out = {"models": self.models, "data": self.data, "turns": self.turns, "scored": self.scored,
               "metrics": self.metrics, "skipped": self.skipped, "rows": self.rows}  # fmt: skip
        out |= {"notes": self.notes} if self.notes else {}
        return out | ({"pairs": self.pairs.to_dict()} if self.pairs is not None else {})

    def write(self, directory: Path) -> tuple[Path, Path]:
        """eval.json (every row: prompt, expected, got, verdict, why) and eval.md, each written atomically."""
        directory = Path(directory)
        atomic_write_json(directory / "eval.json", self.to_dict())
        atomic_write_text(directory / "eval.md", self.markdown())
        return directory / "eval.json", directory / "eval.md"


__all__ = ["EvalResult"]
