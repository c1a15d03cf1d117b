"""A split's rows as read, on disk: every source's rows written as they are read into one Arrow file (JSON text, the
source and line/row number, and why a line cannot be a row), then memory-mapped. Nothing holds all rows in Python:
peak memory does not grow with the number of rows, and `Dataset.map` workers read the file instead of a pickled copy.

The same pass hashes every row (the mapped rows' cache key) and counts each source's rows and blank lines; each
source's format is detected from its first rows before it is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa

from ..errors import BadRow, QwentuneError
from ..recipe import DataSection
from ..rows import DETECT_ROWS, detect_source_format
from .sources import Source, check_columns, read_source, resolve_sources, smallest, take_rows

BATCH_ROWS = 1024  # rows per Arrow record batch written (a few MB of JSON text at most)
SCHEMA = pa.schema(
    [
        ("_raw", pa.large_string()),  # the row as JSON text ("" for a line that cannot be a row)
        ("_src", pa.int32()),  # the source's index in the split
        ("_row", pa.int64()),  # its line (jsonl, csv; 1-based) or row (0-based)
        ("_read_bad", pa.string()),  # why the line cannot be a row (bad_encoding, csv_malformed), else ""
        ("_read_detail", pa.string()),
    ]
)


@dataclass
class ReadSource:
    source: Source
    fmt: str
    rows: int  # rows read, lines that cannot be rows included (blank lines are not rows)
    blank_lines: int = 0


@dataclass
class RawRows:
    """One split's rows on disk (`dataset`, memory-mapped) and what was read of each source."""

    dataset: datasets.Dataset
    sources: list[ReadSource]
    digest: str  # sha256 of every row's (source, index, text): with the options, the mapped rows' cache key
    path: Path

    def __len__(self) -> int:
        return len(self.dataset)

    def close(self) -> None:
        """Remove the file (the mapped rows are written to a file of their own), and its folder once empty."""
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # another run's rows are still there
            self.path.parent.rmdir()


def _detect(source: Source, forced: str, method: str, texts: list[str]) -> str:
    """The source's format from its first rows' texts (collected while it is read: the file is read once)."""
    fmt = detect_source_format(texts, forced, label=source.label, where=source.key)
    if method == "dpo" and fmt not in ("preference", "unknown"):
        raise QwentuneError(
            f"method is dpo but {source.label} is in {fmt} format, not preference pairs",
            where=source.key,
            hint="DPO needs rows with chosen and rejected (and a prompt)",
        )
    if method != "dpo" and fmt == "preference":
        raise QwentuneError(
            f"{source.label} holds preference pairs (chosen/rejected) but method is {method}",
            where=source.key,
            hint="use method: dpo, or a conversation file for SFT",
        )
    return fmt


def _rows(
    s: int, read: ReadSource, limit: int | None, digest, first: list[str]
) -> Iterator[tuple[str, int, int, str, str]]:
    for index, text in take_rows(read_source(read.source), limit):
        if text is None:
            read.blank_lines += 1
            continue
        read.rows += 1
        if isinstance(text, BadRow):
            yield "", s, index, text.reason, text.detail
            continue
        if len(first) < DETECT_ROWS:
            first.append(text)
        digest.update(f"{s}:{index}:".encode())
        digest.update(text.encode())
        digest.update(b"\0")
        yield text, s, index, "", ""


def raw_folder() -> Path:
    """Where a split's raw rows are written while it is prepared (beside the mapped rows' cache when caching is on)."""
    from .mapped import cache_dir

    folder = cache_dir() / "raw" if datasets.is_caching_enabled() else Path(tempfile.gettempdir()) / "qwentune-raw"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def read_split(data: DataSection, method: str, base_dir: Path, which: str, limit: int | None) -> RawRows:
    """Every row of data.train / data.eval (each source's first `limit` rows, or its own limit) into one Arrow file."""
    digest = hashlib.sha256()
    path = raw_folder() / f"{which}-{os.getpid()}-{uuid.uuid4().hex}.arrow"
    reads: list[ReadSource] = []
    try:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
            for s, source in enumerate(resolve_sources(data, base_dir, which)):
                forced = source.format or data.format
                check_columns(source, forced)
                source_limit = smallest(limit, source.limit)
                read = ReadSource(source, "", 0)
                reads.append(read)
                batch: list[tuple] = []
                first: list[str] = []
                for row in _rows(s, read, source_limit, digest, first):
                    batch.append(row)
                    if len(batch) == BATCH_ROWS:
                        writer.write_batch(_batch(batch))
                        batch = []
                if batch:
                    writer.write_batch(_batch(batch))
                if not read.rows:
                    raise QwentuneError(f"{source.label} has no rows", where=source.key, hint="check the file")
                read.fmt = _detect(source, forced, method, first)
        dataset = datasets.Dataset.from_file(str(path))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return RawRows(dataset, reads, digest.hexdigest(), path)


def _batch(rows: list[tuple]) -> pa.RecordBatch:
    columns = list(zip(*rows))
    return pa.record_batch([pa.array(c, type=f.type) for c, f in zip(columns, SCHEMA)], schema=SCHEMA)


__all__ = ["RawRows", "ReadSource", "read_split"]
