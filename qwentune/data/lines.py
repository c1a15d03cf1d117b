"""Data files read line by line, so that every physical line is accounted for: each line decoded on its own (an
invalid UTF-8 line is one bad row, not the end of the file), and CSV records with the physical line they start on.

Python's csv module, given the whole file, lets a stray quote swallow every line up to the next quote (or the end of
the file) into one field, so rows vanish without a count. Here each record is parsed from its own first line: a record
whose quoted field does not close, or whose field count differs from the header's, counts its first line as one bad
row (`csv_malformed`) and the next line is read as a fresh record. A quoted field that legitimately spans lines and
gives the header's field count is one record, at its first line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from ..errors import BadRow, QwentuneError


def decode_line(line: bytes, *, first: bool = False) -> str | BadRow | None:
    """One physical line as text; None when blank (whitespace only); BadRow bad_encoding when not UTF-8."""
    try:
        text = line.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        return BadRow("bad_encoding", f"not UTF-8: byte {line[e.start]:#04x} at column {e.start + 1}")
    return text if text.strip() else None


def _record(lines: list[str | BadRow | None], i: int) -> tuple[list[str] | None, int, str]:
    """The CSV record starting at line index i: (fields, index after its last line, error). A record never runs
    over a line that is not UTF-8; fields is None when the csv module refuses it (a quote that never closes)."""
    end = i

    def feed() -> Iterator[str]:
        nonlocal end
        while end < len(lines) and isinstance(lines[end], str):
            end += 1
            yield lines[end - 1]  # type: ignore[misc]

    try:
        return next(csv.reader(feed(), strict=True)), end, ""
    except csv.Error as e:
        return None, end, str(e)


def read_csv(path: Path, key: str) -> Iterator[tuple[int, str | BadRow | None]]:
    """(1-based physical line, the record as a JSON object text keyed by the header) for every record of a CSV
    file; a bad line as its BadRow (bad_encoding, csv_malformed), a blank line as None. The header is the first
    non-blank record; it is no row."""
    raw = path.read_bytes()
    lines = [decode_line(line, first=n == 0) for n, line in enumerate(raw.splitlines(keepends=True))]
    del raw
    header: list[str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line is None or isinstance(line, BadRow):
            if header is None and isinstance(line, BadRow):
                raise QwentuneError(
                    f"the CSV header is not UTF-8 ({line.detail})",
                    where=f"{key}: {path}:{i + 1}",
                    hint="save as UTF-8",
                )
            yield i + 1, line
            i += 1
            continue
        fields, end, error = _record(lines, i)
        if header is None:
            if fields is None:
                raise QwentuneError(
                    f"cannot read the CSV header: {error}", where=f"{key}: {path}:{i + 1}", hint="check its quotes"
                )
            header, i = fields, end
            continue
        if fields is not None and len(fields) == len(header):
            yield i + 1, json.dumps(dict(zip(header, fields)), ensure_ascii=False)
            i = end
            continue
        yield i + 1, BadRow("csv_malformed", _malformed(fields, len(header), end - i, error))
        i += 1


def _malformed(fields: list[str] | None, columns: int, spanned: int, error: str) -> str:
    if fields is None:
        return f"a quoted field opened on this line never closes ({error}); the line is counted alone"
    if spanned > 1:
        return (
            f"a quoted field opened on this line runs over {spanned} lines into a record of {len(fields)} fields, "
            f"the header has {columns}; the line is counted alone"
        )
    return f"{len(fields)} fields, the header has {columns}"


__all__ = ["decode_line", "read_csv"]
