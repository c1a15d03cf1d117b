"""What happened to the rows: a report per source file and split (kept, skipped by reason with the first row
numbers, truncated), and the errors that refuse a whole split before training on the wrong thing."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import QwentuneError
from ..recipe import DataSection
from ..rows import LENGTH_REASONS, ChatTemplate

EXAMPLES_PER_REASON = 3
DUPLICATE = "duplicate"  # data.dedupe: the same conversation as an earlier row (not a bad row: never an error)


@dataclass
class DataReport:
    """What happened to one source file's rows in one split; counted by reason, never silent.

    Every physical line of a jsonl/csv file (every record of any other source) is accounted for:
    total = kept + sum(skipped), and the file's lines = total + blank_lines (+ the CSV header line; a CSV record
    whose quoted field legitimately spans lines is one row). A line that cannot be a row (not UTF-8: bad_encoding; a
    broken CSV record: csv_malformed) is a skipped row at its line. Blank lines are no rows and counted on the train
    report only."""

    source: str
    detected_format: str
    total: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # reason -> first (row index, detail)
    truncated: int = 0
    split: str = "train"
    index_kind: str = "line"  # "line": 1-based physical line of a .jsonl/.csv file; "row": 0-based row otherwise
    blank_lines: int = 0  # whitespace-only lines (no rows)
    fingerprint: str | None = None  # in-memory data (source is its placeholder): Dataset._fingerprint / sha256
    weight: float | None = None  # a weighted train mix: the entry's weight
    drawn: int | None = None  # a weighted train mix: kept rows drawn into it (repeats included)
    repeated: int = 0  # drawn rows that repeat a row already drawn (the entry's quota is above its rows)
    streamed: bool = False  # data.streaming: counts of the rows training read (first pass); drawn: rows trained on

    def where(self, index: int) -> str:
        return f"{self.source}:{index}" if self.index_kind == "line" else f"{self.source} row {index}"

    def summary(self) -> str:
        head = f"{self.source} [{self.split}] format {self.detected_format}: {self.kept} of {self.total} rows kept"
        if self.truncated:
            head += f", {self.truncated} truncated to max_length"
        if self.blank_lines:
            head += f" ({self.blank_lines} blank line{'s' if self.blank_lines > 1 else ''} not counted as rows)"
        if self.streamed:
            head += f" (streamed: the rows read so far); {self.drawn} trained on"
            head += f" (weight {self.weight:g}: shares sampled, not exact)" if self.weight is not None else ""
            if self.repeated:
                head += f", {self.repeated} of them in a later pass"
        elif self.drawn is not None:
            head += f"; {self.drawn} drawn into the mix (weight {self.weight:g})"
            if self.repeated:
                head += f", {self.repeated} of them repeats (the quota is above the rows kept)"
        lines = [head]
        for reason, count in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            shown = ", ".join(
                f"{self.index_kind} {i}" + (f" ({d})" if d and k == 0 else "")
                for k, (i, d) in enumerate(self.examples.get(reason, []))
            )
            lines.append(f"  skipped {count} {reason}: {shown}" + (", …" if count > EXAMPLES_PER_REASON else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["examples"] = {k: [list(e) for e in v] for k, v in self.examples.items()}
        return d


def new_report(source: Any, fmt: str, split: str) -> DataReport:
    """An empty report for one source (`sources.Source`) of a split."""
    return DataReport(source.label, fmt, split=split, index_kind=source.index_kind, fingerprint=source.fingerprint)


def count_skipped(report: DataReport, row: int, reason: str, detail: str, d: DataSection) -> None:
    """A skipped row counted by reason (its first lines kept as examples); an error where the policy says so."""
    if reason in LENGTH_REASONS and d.overlong == "error":
        raise QwentuneError(
            f"row is too long ({reason}: {detail})",
            where=report.where(row),
            hint=f"raise data.max_length ({d.max_length}), or set data.overlong: drop | truncate",
        )
    if reason not in (*LENGTH_REASONS, DUPLICATE) and d.bad_rows == "error":
        raise QwentuneError(
            f"bad row ({reason}): {detail}",
            where=report.where(row),
            hint="fix the row, or set data.bad_rows: skip to count and skip such rows",
        )
    report.skipped[reason] = report.skipped.get(reason, 0) + 1
    examples = report.examples.setdefault(reason, [])
    if len(examples) < EXAMPLES_PER_REASON:
        examples.append((row, detail))


def refuse_tool_rows(
    first: tuple[int, int, int] | None,
    total: int,
    reports: list[DataReport],
    template: ChatTemplate,
    tools: list | None,
    split: str,
) -> None:
    """Rows with tools on a template without tool support: one error up front. Training a tool dataset on such a
    template is a configuration mistake, and skipping would silently train on whatever rows have no tools.
    `first`: (how many rows, the first one's source, its line/row), or None."""
    if first is None:
        return
    count, src, row = first
    raise QwentuneError(
        f"{count} of {total} {split} rows use tools (tool schemas, calls or results), but chat template "
        f"'{template.name}' has no tool support",
        where="data.tools" if tools else reports[src].where(row),
        hint="use a template with tools (data.template: qwen2.5-instruct) or data without tools; "
        "rows are never trained with their tools silently removed",
    )


def refuse_image_rows(first: tuple[int, int, int] | None, total: int, reports: list[DataReport], split: str) -> None:
    """Rows with images for a text model: a configuration mistake, one error up front (never trained without them)."""
    if first is None:
        return
    count, src, row = first
    raise QwentuneError(
        f"{count} of {total} {split} rows have images, but the model is not a vision model",
        where=reports[src].where(row),
        hint="use a Qwen2-VL model (recipes/qwen2-vl-2b-instruct/) or data without images",
    )


def refuse_empty(reports: list[DataReport], total: int, split: str, max_length: int) -> None:
    """Never train on an empty set: say why every row went."""
    counts: dict[str, int] = {}
    for r in reports:
        for reason, c in r.skipped.items():
            counts[reason] = counts.get(reason, 0) + c
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    listed = ", ".join(f"{c} {reason}" for reason, c in ranked)
    first = next(r for r in reports if r.examples)
    reason0, ((row0, detail0), *_) = next(iter(first.examples.items()))
    top = ranked[0][0]
    if top in LENGTH_REASONS:
        hint = f"raise data.max_length ({max_length}) or set data.overlong: truncate"
    elif top == "invalid_json":
        hint = "the file is not JSON Lines (one JSON object per line)?"
    elif top == "bad_encoding":
        hint = "save the file as UTF-8"
    elif top == "csv_malformed":
        hint = "check the CSV's quotes and that every row has the header's number of fields"
    else:
        hint = "check data.format and the rows' roles; `qwentune preview` on a fixed copy shows how rows render"
    raise QwentuneError(
        f"no usable {split} rows: all {total} were skipped ({listed}); first: {reason0} ({detail0})",
        where=first.where(row0),
        hint=hint,
    )


__all__ = ["DataReport", "count_skipped", "new_report", "refuse_empty", "refuse_image_rows", "refuse_tool_rows"]
