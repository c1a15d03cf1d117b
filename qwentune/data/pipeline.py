"""The one data pipeline that `preprocess`, `preview` and the trainers use:

    files (`datafiles`) ──► format per file (`formats`) ──► the mapped step (`datamap`: convert, render, fit)
    ──► bad rows counted per reason and removed (`datareport`), never dropped silently.

Image rows (Qwen2-VL, `images` given): each image is opened and sized in the mapped step, its single template pad
expanded to its token count, and its file kept in `image_files` for the collator (`images.py`).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ..errors import BadRow, QwentuneError
from ..recipe import DataSection
from ..rows import (
    ChatTemplate,
    ImageSettings,
    load_template,
    normalize_tools,
)
from .eval_parts import by_entry_parts
from .mapped import map_rows, row_options
from .mix import mix
from .raw import RawRows, ReadSource, read_split
from .report import (
    DUPLICATE,
    DataReport,
    count_skipped,
    new_report,
    refuse_empty,
    refuse_image_rows,
    refuse_tool_rows,
)
from .sources import data_path, smallest


@dataclass
class PreparedData:
    train: datasets.Dataset  # SFT: input_ids, labels, length; DPO: DPO_COLUMNS
    eval: datasets.Dataset | None
    reports: list[DataReport]
    template: ChatTemplate
    method: str = "sft"
    images: ImageSettings | None = None  # a vision model's: rows carry image_files / image_sizes
    stream: Any = None  # data.streaming: the Stream behind `train` (an IterableDataset), its counters and place
    first: datasets.Dataset | None = None  # data.streaming: the first train rows (token check, parity, sample)
    eval_parts: dict[str, datasets.Dataset] | None = None  # data.eval with several entries: each one's rows, by name

    @property
    def head(self) -> datasets.Dataset:
        """Train rows at hand: every mapped row, or a stream's first rows."""
        return self.first if self.first is not None else self.train


# ---------------------------------------------------------------- the pipeline


def default_tools(data: DataSection, base_dir: Path) -> list | None:
    """data.tools: the tools offered to every row that has none (a JSON list of function schemas), or None."""
    if not data.tools:
        return None
    path = data_path(base_dir, data.tools)
    if not path.is_file():
        raise QwentuneError(f"tools file not found: {data.tools}", where="data.tools", hint=f"looked for {path}")
    try:
        return normalize_tools(path.read_text(encoding="utf-8"))
    except BadRow as bad:
        raise QwentuneError(
            f"{path}: {bad.detail}", where="data.tools", hint="a JSON list of function schemas"
        ) from None


def prepare_data(
    data: DataSection,
    method: str,
    base_dir: Path,
    tokenizer: Any,
    *,
    limit: int | None = None,
    quiet: bool = False,
    keep_origin: bool = False,
    images: ImageSettings | None = None,
    streaming: bool = False,
) -> PreparedData:
    """Load, convert, render and length-fit data.train (and data.eval, or an eval_fraction of train) for `method`
    (sft | dpo); relative paths resolve against the current dir, then `base_dir` (the recipe's dir).
    `limit` (and data.limit) keeps the first N rows of each file. Prints the per-file reports to stderr unless
    `quiet`. `keep_origin` keeps the `_src`/`_row` columns (preview uses them to name rows). `images`: a vision
    model's image settings (`vision.image_settings`); rows then keep their image files and expanded image pads.
    `streaming` (training) with data.streaming: train is an endless IterableDataset read as training goes
    (`streamed`); eval is mapped."""
    d = data
    template = load_template(d.template, tokenizer)
    limit = smallest(limit, d.limit)
    tools = default_tools(d, base_dir)
    stream = None
    if streaming and d.streaming:
        from .streamed import stream_train

        stream = stream_train(d, method, base_dir, tokenizer, template, tools, images, limit)
    opened: list[RawRows] = []
    try:
        train_raw = read_split(d, method, base_dir, "train", limit) if stream is None else None
        opened += [train_raw] if train_raw is not None else []
        if d.eval:
            eval_raw = read_split(d, method, base_dir, "eval", smallest(limit, d.eval_limit))
            opened.append(eval_raw)
            splits = {"train": (train_raw, None), "eval": (eval_raw, None)}
        elif d.eval_fraction > 0:
            is_eval = _fraction_split(train_raw.sources, d.eval_fraction, d.seed, per_entry=_weighted(train_raw))
            splits = {"train": (train_raw, np.flatnonzero(~is_eval)), "eval": (train_raw, np.flatnonzero(is_eval))}
        else:
            splits = {"train": (train_raw, None)}
        out: dict[str, Any] = {}
        reports: list[DataReport] = []
        if stream is not None:
            splits.pop("train")
            out["train"], reports = stream.dataset(), list(stream.reports)
        parts = None
        for name, (raw, rows) in splits.items():
            mixed = name == "train" and _weighted(raw)
            by_entry = name == "eval" and len(d.eval) > 1
            ds, split_reports = _prepare_split(
                name, raw, rows, d, method, tokenizer, template, tools, keep_origin or by_entry, images, mixed
            )
            if by_entry:
                ds, parts = by_entry_parts(ds, raw, keep_origin)
            out[name] = ds
            reports += [r for r in split_reports if r.total]  # an eval_fraction may take no row of a file
    finally:
        for raw in opened:
            raw.close()
    if not quiet:
        for report in reports:
            if report.streamed:
                what = f"{report.source} [train] format {report.detected_format}: streamed"
                print(f"{what}, rows counted as training reads them (data_report.json)", file=sys.stderr)
            else:
                print(report.summary(), file=sys.stderr)
    prepared = PreparedData(out["train"], out.get("eval"), reports, template, method, images, stream, None, parts)
    if stream is not None:
        prepared.first = stream.head()
    return prepared


def _weighted(raw: RawRows) -> bool:
    return any(x.source.weight is not None for x in raw.sources)


def _fraction_split(read: list[ReadSource], fraction: float, seed: int, *, per_entry: bool = False) -> np.ndarray:
    """Which raw rows of the train files (before any row is dropped) form a seeded eval split, so it does not move
    when max_length or the template change. `per_entry` (a weighted mix): each data.train entry gives its own
    share, seeded by (seed, entry), so the mix's entries keep their proportions in both splits."""
    groups: dict[int, list[tuple[int, int]]] = {}  # entry → its files' (first position, rows)
    k = 0
    for x in read:
        groups.setdefault(x.source.entry if per_entry else 0, []).append((k, x.rows))
        k += x.rows
    is_eval = np.zeros(k, dtype=bool)
    for entry, spans in groups.items():
        positions = np.concatenate([np.arange(start, start + n, dtype=np.int64) for start, n in spans])
        n_eval = max(1, round(len(positions) * fraction))
        if n_eval >= len(positions):
            what = f"data.train[{entry}]'s {len(positions)}" if per_entry else f"{len(positions)}"
            raise QwentuneError(
                f"data.eval_fraction {fraction} of {what} rows leaves no train rows", where="data.eval_fraction"
            )
        rng = np.random.default_rng([seed, entry] if per_entry else seed)
        is_eval[positions[rng.permutation(len(positions))[:n_eval]]] = True
    return is_eval


REPORT_COLUMNS = ["_bad_reason", "_bad_detail", "_truncated", "_src", "_row"]
REPORT_BATCH = 8192  # mapped rows read at a time for the report


def _prepare_split(
    split: str,
    raw: RawRows,
    rows: np.ndarray | None,
    d: DataSection,
    method: str,
    tokenizer: Any,
    template: ChatTemplate,
    tools: list | None,
    keep_origin: bool,
    images: ImageSettings | None = None,
    mixed: bool = False,
) -> tuple[datasets.Dataset, list[DataReport]]:
    """Map `raw`'s rows (`rows`: the positions of this split, None: all) and account for each: kept, or skipped by
    reason at its line. The mapped rows are read back in batches from their memory-mapped file."""
    opts = row_options(d, method, [(x.fmt, x.source) for x in raw.sources], tools, images, tokenizer)
    reports = [new_report(x.source, x.fmt, split) for x in raw.sources]
    if split == "train":  # blank lines belong to the file, counted once
        for report, x in zip(reports, raw.sources):
            report.blank_lines = x.blank_lines
    base, digest = raw.dataset, raw.digest
    if rows is not None:
        base = base.select(rows)
        digest = hashlib.sha256(digest.encode() + rows.tobytes()).hexdigest()
    if not len(base):
        refuse_empty(reports, 0, split, d.max_length)
    mapped = map_rows(base, digest, opts, tokenizer, template, d.num_proc, split)
    table = mapped.data
    refuse_tool_rows(_first_with(table, "tools_unsupported"), len(mapped), reports, template, tools, split)
    refuse_image_rows(_first_with(table, "images_unsupported"), len(mapped), reports, split)
    kept_parts: list[np.ndarray] = []
    src_parts: list[np.ndarray] = []
    seen: set[str] = set()  # dedupe: the keys of the rows kept so far (across the split's files)
    position = 0
    columns = REPORT_COLUMNS + (["_key"] if d.dedupe else [])
    for batch in table.select(columns).to_batches(max_chunksize=REPORT_BATCH):
        cols = batch.to_pydict()
        keys = cols.get("_key")
        kept: list[int] = []
        kept_src: list[int] = []
        for i, (reason, detail, cut, src, row) in enumerate(zip(*(cols[c] for c in REPORT_COLUMNS))):
            report = reports[src]
            report.total += 1
            if not reason and keys is not None:
                if keys[i] in seen:
                    reason, detail = DUPLICATE, "the same conversation as an earlier row"
                else:
                    seen.add(keys[i])
            if not reason:
                report.kept += 1
                report.truncated += bool(cut)
                kept.append(position + i)
                kept_src.append(src)
                continue
            count_skipped(report, row, reason, detail, d)
        position += batch.num_rows
        kept_parts.append(np.asarray(kept, dtype=np.int64))
        src_parts.append(np.asarray(kept_src, dtype=np.int64))
    kept_all = np.concatenate(kept_parts) if kept_parts else np.zeros(0, dtype=np.int64)
    if not len(kept_all):
        refuse_empty(reports, len(mapped), split, d.max_length)
    if mixed:
        kept_all = _mixed(kept_all, np.concatenate(src_parts), raw.sources, reports, d)
        mapped = mapped.select(kept_all)
    elif len(kept_all) < len(mapped):
        mapped = mapped.select(kept_all)
    drop = ["_truncated", "_bad_reason", "_bad_detail", "_key"] + ([] if keep_origin else ["_src", "_row"])
    return mapped.remove_columns(drop), reports


def _first_with(table: Any, reason: str) -> tuple[int, int, int] | None:
    """(rows with `reason`, the first one's source, its line/row), or None when no row has it."""
    import pyarrow.compute as pc

    hits = pc.equal(table.column("_bad_reason"), reason)
    count = pc.sum(hits).as_py() or 0
    if not count:
        return None
    first = pc.index(hits, True).as_py()
    return count, table.column("_src")[first].as_py(), table.column("_row")[first].as_py()


def _mixed(
    kept: np.ndarray, kept_src: np.ndarray, loaded: list[ReadSource], reports: list[DataReport], d: DataSection
) -> np.ndarray:
    """The kept rows drawn into the weighted mix (`mix.mix`), entry after entry; each file's report says how many of
    its rows were drawn and how many of those were repeats."""
    entries = sorted({x.source.entry for x in loaded})
    entry_of = np.asarray([x.source.entry for x in loaded], dtype=np.int64)
    by_entry = [kept[entry_of[kept_src] == e] for e in entries]
    weights = [next(x.source.weight for x in loaded if x.source.entry == e) for e in entries]
    drawn, total = mix(by_entry, weights, d.mix_rows, d.seed, [f"data.train[{e}]" for e in entries])
    for picks in drawn:
        srcs = kept_src[np.searchsorted(kept, picks)]  # kept is ascending: each drawn row's place in it
        for s in np.unique(srcs).tolist():
            mine = picks[srcs == s]
            reports[s].drawn = len(mine)
            reports[s].repeated = len(mine) - len(np.unique(mine))
    for report, x in zip(reports, loaded):
        report.weight = x.source.weight
        if report.drawn is None:
            report.drawn = 0
    return np.concatenate(drawn)


__all__ = ["PreparedData", "default_tools", "prepare_data"]
