"""The one data pipeline that `preprocess`, `preview` and the trainers use:

    files (`datafiles`) ──► format per file (`formats`) ──► the mapped step (`datamap`: convert, render, fit)
    ──► bad rows counted per reason and removed (`datareport`), never dropped silently.

Image rows (Qwen2-VL, `images` given): each image is opened and sized in the mapped step, its single template pad
expanded to its token count, and its file kept in `image_files` for the collator (`images.py`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ..errors import BadRow, QwentuneError
from ..recipe import DataSection
from ..rows import (
    LENGTH_REASONS,
    ChatTemplate,
    ImageSettings,
    detect_source_format,
    length_bound,
    load_template,
    normalize_tools,
)
from .mapped import Options, map_rows
from .mix import mix
from .report import DUPLICATE, EXAMPLES_PER_REASON, DataReport, refuse_empty, refuse_image_rows, refuse_tool_rows
from .sources import Source, check_columns, data_path, read_source, resolve_sources, smallest, take_rows


@dataclass
class PreparedData:
    train: datasets.Dataset  # SFT: input_ids, labels, length; DPO: DPO_COLUMNS
    eval: datasets.Dataset | None
    reports: list[DataReport]
    template: ChatTemplate
    method: str = "sft"
    images: ImageSettings | None = None  # a vision model's: rows carry image_files / image_sizes


# ---------------------------------------------------------------- the pipeline


@dataclass
class _Loaded:
    source: Source
    fmt: str
    rows: list[tuple[int, str | BadRow]]  # (row index, JSON text, or the BadRow of a line that cannot be a row)
    blank_lines: int = 0  # whitespace-only lines of a jsonl/csv file: no rows, counted in the report


def _load_split(data: DataSection, method: str, base_dir: Path, which: str, limit: int | None) -> list[_Loaded]:
    loaded = []
    for source in resolve_sources(data, base_dir, which):
        forced = source.format or data.format
        check_columns(source, forced)
        read = list(take_rows(read_source(source), smallest(limit, source.limit)))
        rows = [(index, text) for index, text in read if text is not None]
        if not rows:
            raise QwentuneError(f"{source.label} has no rows", where=source.key, hint="check the file")
        texts = (text for _, text in rows if isinstance(text, str))
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
        loaded.append(_Loaded(source, fmt, rows, len(read) - len(rows)))
    return loaded


def _default_tools(data: DataSection, base_dir: Path) -> list | None:
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
) -> PreparedData:
    """Load, convert, render and length-fit data.train (and data.eval, or an eval_fraction of train) for `method`
    (sft | dpo); relative paths resolve against the current dir, then `base_dir` (the recipe's dir).
    `limit` (and data.limit) keeps the first N rows of each file. Prints the per-file reports to stderr unless
    `quiet`. `keep_origin` keeps the `_src`/`_row` columns (preview uses them to name rows). `images`: a vision
    model's image settings (`vision.image_settings`); rows then keep their image files and expanded image pads."""
    d = data
    template = load_template(d.template, tokenizer)
    limit = min((x for x in (limit, d.limit) if x is not None), default=None)
    tools = _default_tools(d, base_dir)
    train_loaded = _load_split(d, method, base_dir, "train", limit)
    if d.eval:
        eval_limit = min(x for x in (limit, d.eval_limit, 10**12) if x is not None)
        splits = {"train": (train_loaded, None), "eval": (_load_split(d, method, base_dir, "eval", eval_limit), None)}
    elif d.eval_fraction > 0:
        splits = _fraction_split(train_loaded, d.eval_fraction, d.seed, per_entry=_weighted(train_loaded))
    else:
        splits = {"train": (train_loaded, None)}
    out: dict[str, datasets.Dataset] = {}
    reports: list[DataReport] = []
    for name, (loaded, keep) in splits.items():
        mixed = name == "train" and _weighted(loaded)
        ds, split_reports = _prepare_split(
            name, loaded, keep, d, method, tokenizer, template, tools, keep_origin, images, mixed
        )
        out[name] = ds
        reports += [r for r in split_reports if r.total]  # an eval_fraction may take no row of a file
    if not quiet:
        for report in reports:
            print(report.summary(), file=sys.stderr)
    return PreparedData(out["train"], out.get("eval"), reports, template, method, images)


def _weighted(loaded: list[_Loaded]) -> bool:
    return any(x.source.weight is not None for x in loaded)


def _fraction_split(loaded: list[_Loaded], fraction: float, seed: int, *, per_entry: bool = False) -> dict:
    """A seeded eval split over the raw rows of all train files (before any row is dropped), so it does not move
    when max_length or the template change. `per_entry` (a weighted mix): each data.train entry gives its own
    share, seeded by (seed, entry), so the mix's entries keep their proportions in both splits."""
    groups: dict[int, list[int]] = {}  # entry → its rows' positions among all rows read
    k = 0
    for x in loaded:
        groups.setdefault(x.source.entry if per_entry else 0, []).extend(range(k, k + len(x.rows)))
        k += len(x.rows)
    is_eval = np.zeros(k, dtype=bool)
    for entry, positions in groups.items():
        n_eval = max(1, round(len(positions) * fraction))
        if n_eval >= len(positions):
            what = f"data.train[{entry}]'s {len(positions)}" if per_entry else f"{len(positions)}"
            raise QwentuneError(
                f"data.eval_fraction {fraction} of {what} rows leaves no train rows", where="data.eval_fraction"
            )
        rng = np.random.default_rng([seed, entry] if per_entry else seed)
        is_eval[np.asarray(positions)[rng.permutation(len(positions))[:n_eval]]] = True
    return {"train": (loaded, ~is_eval), "eval": (loaded, is_eval)}


def _prepare_split(
    split: str,
    loaded: list[_Loaded],
    keep: Any,
    d: DataSection,
    method: str,
    tokenizer: Any,
    template: ChatTemplate,
    tools: list | None,
    keep_origin: bool,
    images: ImageSettings | None = None,
    mixed: bool = False,
) -> tuple[datasets.Dataset, list[DataReport]]:
    raw: dict[str, list] = {"_raw": [], "_src": [], "_row": []}
    order: list[tuple[int, int, BadRow | None]] = []  # (source, row index, the BadRow of a line read as bad)
    k = 0
    for s, item in enumerate(loaded):
        for index, text in item.rows:
            if keep is None or keep[k]:
                order.append((s, index, text if isinstance(text, BadRow) else None))
                if isinstance(text, str):
                    raw["_raw"].append(text)
                    raw["_src"].append(s)
                    raw["_row"].append(index)
            k += 1
    opts = Options(
        method=method,
        formats=tuple((x.fmt, x.source.arrow) for x in loaded),
        tools=tools,
        system_prompt=d.system_prompt,
        max_length=d.max_length,
        overlong=d.overlong,
        train_on=d.train_on,
        bases=tuple(x.source.base_dir for x in loaded),
        images=images,
        max_bytes=length_bound(tokenizer, d.max_length),
        dedupe=d.dedupe,
    )
    reports = [
        DataReport(
            x.source.label, x.fmt, split=split, index_kind=x.source.index_kind, fingerprint=x.source.fingerprint
        )
        for x in loaded
    ]
    if split == "train":  # blank lines belong to the file, counted once
        for report, x in zip(reports, loaded):
            report.blank_lines = x.blank_lines
    mapped = map_rows(raw, opts, tokenizer, template, d.num_proc, split) if raw["_raw"] else None
    table = mapped.data if mapped is not None else None
    reasons = table.column("_bad_reason").to_pylist() if table is not None else []
    details = table.column("_bad_detail").to_pylist() if table is not None else []
    truncated = table.column("_truncated").to_pylist() if table is not None else []
    keys = table.column("_key").to_pylist() if table is not None and d.dedupe else []
    refuse_tool_rows(reasons, raw, reports, template, tools, split)
    refuse_image_rows(reasons, raw, reports, split)
    kept: list[int] = []
    kept_src: list[int] = []
    seen: set[str] = set()  # dedupe: the keys of the rows kept so far (across the split's files)
    m = 0  # the mapped row of the next row read as text
    for src, row, read_bad in order:
        report = reports[src]
        report.total += 1
        if read_bad is not None:
            reason, detail = read_bad.reason, read_bad.detail
        else:
            reason, detail, cut = reasons[m], details[m], truncated[m]
            m += 1
            if not reason and keys:
                if keys[m - 1] in seen:
                    reason, detail = DUPLICATE, "the same conversation as an earlier row"
                else:
                    seen.add(keys[m - 1])
            if not reason:
                report.kept += 1
                report.truncated += bool(cut)
                kept.append(m - 1)
                kept_src.append(src)
                continue
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
    if not kept:
        refuse_empty(reports, len(order), split, d.max_length)
    assert mapped is not None  # some row was kept
    if mixed:
        kept = _mixed(np.asarray(kept, dtype=np.int64), np.asarray(kept_src, dtype=np.int64), loaded, reports, d)
        mapped = mapped.select(kept)
    elif len(kept) < len(reasons):
        mapped = mapped.select(kept)
    drop = ["_truncated", "_bad_reason", "_bad_detail", "_key"] + ([] if keep_origin else ["_src", "_row"])
    return mapped.remove_columns(drop), reports


def _mixed(
    kept: np.ndarray, kept_src: np.ndarray, loaded: list[_Loaded], reports: list[DataReport], d: DataSection
) -> np.ndarray:
    """The kept rows drawn into the weighted mix (`mix.mix`), entry after entry; each file's report says how many of
    its rows were drawn and how many of those were repeats."""
    entries = sorted({x.source.entry for x in loaded})
    entry_of = np.asarray([x.source.entry for x in loaded], dtype=np.int64)
    by_entry = [kept[entry_of[kept_src] == e] for e in entries]
    weights = [next(x.source.weight for x in loaded if x.source.entry == e) for e in entries]
    drawn, total = mix(by_entry, weights, d.mix_rows, d.seed, [f"data.train[{e}]" for e in entries])
    source_of = dict(zip(kept.tolist(), kept_src.tolist()))
    for picks in drawn:
        srcs = np.asarray([source_of[p] for p in picks.tolist()], dtype=np.int64)
        for s in np.unique(srcs).tolist():
            mine = picks[srcs == s]
            reports[s].drawn = len(mine)
            reports[s].repeated = len(mine) - len(np.unique(mine))
    for report, x in zip(reports, loaded):
        report.weight = x.source.weight
        if report.drawn is None:
            report.drawn = 0
    return np.concatenate(drawn)


__all__ = ["PreparedData", "prepare_data"]
