"""Data handed over in Python rather than named in a recipe file: a `datasets.Dataset` (a `DatasetDict` split), or
a list of row dicts, in any format the data files accept. Only the Python API makes these (`load_recipe` from a dict,
`train_data=` / `eval_data=`); a YAML recipe names files. The recipe keeps the object; what is written to disk
(recipe.yaml, data_report.json) is a placeholder with the row count and a fingerprint."""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from collections.abc import Iterator
from typing import Any

from ..errors import QwentuneError


class InMemoryData:
    """One in-memory source: `rows` is a datasets.Dataset or a list of row dicts."""

    def __init__(self, rows: Any):
        self.rows = rows
        self.is_dataset = not isinstance(rows, list)
        self.kind = "Dataset" if self.is_dataset else "list"
        self.fingerprint = _fingerprint(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)

    @property
    def columns(self) -> list[str] | None:
        """A Dataset's column names (None for a list of dicts)."""
        return list(self.rows.column_names) if self.is_dataset else None

    @property
    def label(self) -> str:
        return f"<in-memory: {self.kind} {len(self)} rows, fingerprint {self.fingerprint[:16]}>"

    def __str__(self) -> str:
        return self.label

    __repr__ = __str__

    def __deepcopy__(self, memo: dict) -> InMemoryData:
        return self  # the rows are the user's object: recipes share it, never copy it

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InMemoryData) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)


def _fingerprint(rows: Any) -> str:
    """datasets' own `_fingerprint` for a Dataset; the sha256 of the canonical JSON of a list of rows."""
    if not isinstance(rows, list):
        return str(getattr(rows, "_fingerprint", "") or id(rows))
    text = json.dumps(rows, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _datasets_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(Dataset types, DatasetDict types); empty when `datasets` was never imported (then no such object exists)."""
    module = sys.modules.get("datasets")
    if module is None:
        return (), ()
    return (module.Dataset,), (module.DatasetDict, module.IterableDatasetDict, module.IterableDataset)


def _is_rows(value: Any) -> bool:
    """A list of rows: it holds a dict and nothing that names a source (a row of the wrong type is a bad row)."""
    if not isinstance(value, list) or not any(isinstance(r, dict) and not is_entry(r) for r in value):
        return False
    dataset_types, _ = _datasets_types()
    return not any(isinstance(r, (str, InMemoryData, *dataset_types)) for r in value)


def in_memory_values(value: Any, where: str) -> list | None:
    """The data.train / data.eval list for a value given in Python, with each in-memory source as an InMemoryData;
    None when `value` holds nothing in memory (paths and hub ids: the recipe checks them as usual)."""
    dataset_types, dict_types = _datasets_types()
    if isinstance(value, InMemoryData):
        return [value]
    if dataset_types and isinstance(value, dataset_types):
        return [InMemoryData(value)]
    if dict_types and isinstance(value, dict_types):
        splits = f" (it has {', '.join(map(str, value))})" if isinstance(value, dict) else ""
        raise QwentuneError(
            f"{where} is a {type(value).__name__}{splits}: pass one split as a datasets.Dataset",
            where=where,
            hint='e.g. dd["train"] (an IterableDataset: Dataset.from_list(list(ds)))',
        )
    if _is_rows(value):
        return [InMemoryData(value)]
    if not isinstance(value, (list, tuple)):
        return None
    out, found = [], False
    for i, item in enumerate(value):
        if is_entry(item):  # {path: rows_or_dataset_or_path, weight: ...}: the path may be in memory
            inner = None if isinstance(item["path"], str) else in_memory_values(item["path"], f"{where}[{i}].path")
            if inner is not None and len(inner) != 1:
                raise QwentuneError(
                    f"{where}[{i}].path names several sources", where=where, hint="one Dataset or list of rows each"
                )
            found |= inner is not None
            out.append({**item, "path": inner[0]} if inner is not None else item)
            continue
        inner = None if isinstance(item, str) else in_memory_values(item, f"{where}[{i}]")
        if isinstance(item, dict):
            raise QwentuneError(
                f"{where}[{i}] is a row, but {where} also names files",
                where=where,
                hint="pass a list of rows alone, or a list of paths / Datasets / lists of rows / "
                "{path: ..., weight: ...} entries",
            )
        found |= inner is not None
        out += inner if inner is not None else [item]
    return out if found else None


ENTRY_KEYS = ("path", "weight", "limit", "split", "format")  # a data entry written as a mapping (sections.DataSource)
# Keys that make a dict a row of one of the data formats, never a data entry.
ROW_KEYS = ("messages", "conversations", "instruction", "output", "prompt", "completion", "chosen", "rejected", "text")


def is_entry(item: Any) -> bool:
    """A data.train / data.eval entry written as a mapping (it has `path` and no row keys), not a row; keys it
    should not have are the recipe's to refuse (did-you-mean)."""
    return isinstance(item, dict) and "path" in item and not set(item) & set(ROW_KEYS)


def stash(value: Any, memory: dict[str, InMemoryData], where: str) -> Any:
    """`value` with each in-memory source replaced by a placeholder string kept in `memory` (load_recipe copies the
    tree through YAML, which cannot hold a Dataset); anything else unchanged."""
    found = in_memory_values(value, where)
    if found is None:
        return value
    out = []
    for item in found:
        entry = item if is_entry(item) else None
        if entry is not None:
            item = entry["path"]
        if isinstance(item, InMemoryData):
            key = f"{item.label}#{uuid.uuid4().hex}"
            memory[key] = item
            item = key
        out.append({**entry, "path": item} if entry is not None else item)
    return out


def stash_in_memory(source: dict, memory: dict[str, InMemoryData]) -> dict:
    """A recipe dict with data.train / data.eval stashed (`stash`); the dict itself is not changed."""
    data = source.get("data")
    if not isinstance(data, dict) or not any(k in data for k in ("train", "eval")):
        return source
    data = {k: (stash(v, memory, f"data.{k}") if k in ("train", "eval") else v) for k, v in data.items()}
    return {**source, "data": data}


def public_value(value: Any) -> Any:
    """An in-memory source as its placeholder text (what recipe.yaml records), in a mapping entry too (whose unset
    keys are left out); anything else unchanged."""
    if isinstance(value, list):
        return [public_value(v) for v in value]
    if isinstance(value, dict):
        return {k: public_value(v) for k, v in value.items() if v is not None}
    return value.label if isinstance(value, InMemoryData) else value


__all__ = ["ENTRY_KEYS", "InMemoryData", "in_memory_values", "is_entry", "public_value", "stash", "stash_in_memory"]
