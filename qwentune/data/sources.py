"""Where data comes from: the sources behind data.train / data.eval (files, folders of files, save_to_disk dirs, hub
datasets, data in memory) and their rows as JSON text with their line (jsonl) or row numbers."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import datasets

from ..errors import BadRow, QwentuneError, json_error_text
from ..recipe import DataSection, InMemoryData, path_in
from ..rows import FORMATS, detect_format
from .lines import decode_line, read_csv

DATA_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    key: str  # the recipe key it came from: data.train[0]
    kind: str  # jsonl | json | parquet | csv | disk | hub | memory
    path: str  # a resolved file/dir path, a hub id, or (memory) the placeholder naming the rows
    split: str | None = None  # for save_to_disk DatasetDicts and hub datasets
    rows: InMemoryData | None = field(default=None, compare=False, repr=False)  # kind memory: the rows
    entry: int = 0  # which data.train / data.eval entry (a folder entry gives several sources)
    weight: float | None = None  # the entry's weight in the train mix (None: no mixing)
    limit: int | None = None  # the entry's own row limit
    format: str | None = None  # the entry's own format (None: data.format)

    @property
    def fingerprint(self) -> str | None:
        """In-memory rows: datasets' fingerprint of a Dataset, the sha256 of a list's canonical JSON."""
        return self.rows.fingerprint if self.rows is not None else None

    @property
    def label(self) -> str:
        return self.path + (f"#{self.split}" if self.split and self.kind == "hub" else "")

    @property
    def arrow(self) -> bool:
        """Rows read through Arrow (struct columns): a null there may be a key that was never given."""
        return self.kind in ("parquet", "disk", "hub") or (self.rows is not None and self.rows.is_dataset)

    @property
    def base_dir(self) -> str | None:
        """Where relative image paths in the rows start: the data file's folder (a save_to_disk dir itself), absolute
        (it is part of the mapped rows' cache key, and the rows hold absolute image paths)."""
        if self.kind == "hub":
            return None
        if self.kind == "memory":
            return str(Path.cwd())  # relative image paths in rows built in Python: from the working dir
        path = Path(self.path).resolve()
        return str(path if path.is_dir() else path.parent)

    @property
    def index_kind(self) -> str:
        return "line" if self.kind in ("jsonl", "csv") else "row"


class Unparsed(NamedTuple):
    """A jsonl line that is not JSON (load_rows yields it in place of the row)."""

    text: str
    error: str


def resolve_sources(data: DataSection, base_dir: Path, which: str = "train") -> list[Source]:
    """The sources behind data.train / data.eval: a file, a dir of data files, a save_to_disk dir, or a hub id
    (`owner/name`, optionally `#split`). Relative paths resolve against the current dir, then `base_dir`."""
    out: list[Source] = []
    for i, value in enumerate(getattr(data, which)):
        key = f"data.{which}[{i}]"
        entry: dict[str, Any] = {"entry": i}
        if not isinstance(value, (str, InMemoryData)):  # a mapping entry (recipe.DataSource)
            entry.update(weight=value.weight, limit=value.limit, format=value.format)
            value, entry_split = value.path, value.split
        else:
            entry_split = None
        if isinstance(value, InMemoryData):
            out.append(Source(key, "memory", value.label, rows=value, **entry))
            continue
        name, _, split = value.partition("#")
        split = entry_split or split
        path = data_path(base_dir, name)
        default_split = data.split if which == "train" else None
        if path.is_dir():
            if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
                out.append(Source(key, "disk", str(path), split or default_split, **entry))
                continue
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in DATA_SUFFIXES and p.is_file())
            if not files:
                raise QwentuneError(
                    f"no data files in directory {path}",
                    where=key,
                    hint=f"put {', '.join(DATA_SUFFIXES)} files there, or a dataset saved with save_to_disk",
                )
            out += [Source(key, DATA_SUFFIXES[p.suffix.lower()], str(p), **entry) for p in files]
        elif path.is_file():
            kind = DATA_SUFFIXES.get(path.suffix.lower())
            if kind is None:
                raise QwentuneError(
                    f"unsupported data file type '{path.suffix}': {path}",
                    where=key,
                    hint="use .jsonl, .json, .parquet or .csv files, a save_to_disk dir, or a hub dataset id",
                )
            out.append(Source(key, kind, str(path), **entry))
        elif _looks_like_hub_id(base_dir, name):
            out.append(Source(key, "hub", name, split or default_split or "validation", **entry))
        else:
            raise QwentuneError(
                f"data file not found: {value}",
                where=key,
                hint=f"looked for {path}; relative paths resolve against the current directory, then against the "
                f"recipe's directory ({base_dir})",
            )
    return out


def data_path(base_dir: Path, value: str) -> Path:
    """A path named in the data section, resolved as every recipe path is (`recipe.path_in`)."""
    return path_in(base_dir, value)


def _looks_like_hub_id(base_dir: Path, name: str) -> bool:
    """owner/name with no data-file suffix, whose first part is not a local directory (then it is a missing path)."""
    if not _HUB_ID.match(name) or Path(name).suffix.lower() in DATA_SUFFIXES or name.startswith("."):
        return False
    return not data_path(base_dir, name.split("/")[0]).is_dir()


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)  # dates, decimals, images (the VL path reads image columns itself)


def dump_row(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=_json_default)


def read_source(source: Source, *, streaming: bool = False) -> Iterator[tuple[int, str | BadRow | None]]:
    """(row index, the row as JSON text) for every row of a source, so that every line of a file is accounted for:
    a line that cannot be a row (not UTF-8, a malformed CSV record) comes as its BadRow, a blank line as None.
    jsonl lines are passed on unparsed. Indexes: the 1-based physical line of a .jsonl or .csv file (a CSV record's
    first line), the 0-based row of any other source. `streaming`: a hub dataset is streamed (`load_dataset(...,
    streaming=True)`), not downloaded and prepared first."""
    path = Path(source.path)
    if source.kind == "jsonl":
        yield from _read_jsonl_lines(path)
    elif source.kind == "json":
        yield from _read_json(source)
    elif source.kind == "csv":
        yield from read_csv(path, source.key)
    elif source.kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        i = 0
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise QwentuneError(
                f"cannot read {path} as Parquet: {e}", where=source.key, hint="is the file complete?"
            ) from None
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield i, dump_row(row)
                i += 1
    elif source.kind in ("disk", "hub"):
        ds = _load_arrow_dataset(source, streaming=streaming)
        for i, row in enumerate(ds):
            yield i, dump_row(row)
    elif source.kind == "memory":
        for i, row in enumerate(source.rows):
            yield i, dump_row(row)
    else:
        raise ValueError(source.kind)


def check_columns(source: Source, forced: str) -> None:
    """An in-memory Dataset whose columns fit no format: say which columns it has and which formats fit (one line),
    before its rows are read."""
    columns = source.rows.columns if source.rows is not None else None
    if columns is None or forced != "auto" or detect_format(dict.fromkeys(columns, "")):
        return
    raise QwentuneError(
        f"cannot tell the format of {source.label}: it has columns {columns}",
        where=source.key,
        hint="expected columns `messages`, `conversations`, `instruction`+`output`, `prompt`+`completion` or "
        "`chosen`+`rejected` (rename_column), or force one with data.format (" + ", ".join(FORMATS) + ")",
    )


def smallest(*limits: int | None) -> int | None:
    """The smallest of the limits that are set (None: no limit)."""
    return min((x for x in limits if x is not None), default=None)


def take_rows(
    rows: Iterable[tuple[int, str | BadRow | None]], limit: int | None
) -> Iterator[tuple[int, str | BadRow | None]]:
    """`rows` through the `limit`-th row (blank lines, None, do not count as rows)."""
    n = 0
    for item in rows:
        if limit is not None and n >= limit:
            return
        n += item[1] is not None
        yield item


def _read_jsonl_lines(path: Path) -> Iterator[tuple[int, str | BadRow | None]]:
    """Lines split at \\n and decoded one by one: an invalid UTF-8 line is one bad row, never the whole file."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            yield lineno, decode_line(line, first=lineno == 1)


def _read_json(source: Source) -> Iterator[tuple[int, str | BadRow | None]]:
    path = Path(source.path)
    data_bytes = path.read_bytes()
    try:
        text = data_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data_bytes.count(b"\n", 0, e.start) + 1
        raise QwentuneError(
            f"not UTF-8 text: byte {data_bytes[e.start]:#04x} at byte offset {e.start}",
            where=f"{source.key}: {path}:{line}",
            hint="a .json data file is one JSON document in UTF-8; save it as UTF-8 (or use .jsonl, where a bad line "
            "is one counted bad row)",
        ) from None
    del data_bytes
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and text.strip().count("\n"):  # JSON Lines in a .json file
            rows = (line if line.strip() else None for line in text.splitlines())
            yield from ((i, row) for i, row in enumerate(rows))
            return
        raise QwentuneError(
            f"not valid JSON: {e.msg}", where=f"{path}:{e.lineno}", hint="a .json file holds a list of rows"
        ) from None
    del text
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if detect_format(data):
            data = [data]
        elif len(lists) == 1:
            data = lists[0]
        else:
            raise QwentuneError(
                "a .json data file must hold a list of rows", where=f"{source.key}: {path}", hint="or use .jsonl"
            )
    if not isinstance(data, list):
        raise QwentuneError("a .json data file must hold a list of rows", where=f"{source.key}: {path}")
    for i, row in enumerate(data):
        yield i, dump_row(row)


def _load_arrow_dataset(source: Source, *, streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    try:
        if source.kind == "disk":  # memory-mapped: read row by row either way
            ds = datasets.load_from_disk(source.path)
        else:
            ds = datasets.load_dataset(source.path, split=source.split, streaming=streaming)
    except Exception as e:  # network, missing split, unknown id: all a user's to fix
        raise QwentuneError(
            f"cannot load dataset {source.label}: {type(e).__name__}: {e}",
            where=source.key,
            hint="check the id / path and the split (data.split, or `id#split`); offline, point data.train at files",
        ) from None
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        names = list(ds)
        split = source.split or next((s for s in ("validation", "eval", "test") if s in ds), None)
        if split not in ds:
            raise QwentuneError(
                f"{source.path} has no split {split!r} (it has {', '.join(names)})",
                where=source.key,
                hint="name the split as path#split, or set data.split",
            )
        ds = ds[split]
    return ds


def load_rows(data: DataSection, base_dir: Path, which: str = "train") -> Iterator[tuple[str, int, Any]]:
    """(source, row index, raw row) for data.train or data.eval; the row index is the 1-based line of a .jsonl file
    and the 0-based row of other sources. A jsonl line that is not JSON comes as `Unparsed(text, error)`."""
    for source in resolve_sources(data, base_dir, which):
        for index, text in take_rows(read_source(source), smallest(data.limit, source.limit)):
            if text is None:
                continue
            if isinstance(text, BadRow):
                yield source.label, index, Unparsed("", text.detail)
                continue
            try:
                yield source.label, index, json.loads(text)
            except json.JSONDecodeError as e:
                yield source.label, index, Unparsed(text, json_error_text(e))


__all__ = [
    "DATA_SUFFIXES",
    "Source",
    "Unparsed",
    "check_columns",
    "data_path",
    "dump_row",
    "load_rows",
    "read_source",
    "resolve_sources",
    "smallest",
    "take_rows",
]
