"""The one data pipeline that `preprocess`, `preview` and the trainers use:

    files ──► raw rows (JSON text) ──► formats.convert ──► render.render_batch / render_preference_batch ──► length
           in a datasets.Dataset       (canonical rows)    (official template, exact masks)                policy

The raw rows travel through `Dataset.map(batched=True, num_proc=data.num_proc)` as JSON strings and only id lists
come out, so Arrow never sees a tool call's arguments or a tool schema (struct unification would add a `null` for
every key seen in any other row). A row that cannot be trained on exactly comes back with `_bad_reason` set; those
are counted per reason (with the first few row numbers) and removed, never dropped silently. The map result is cached
on disk under a fingerprint of the raw rows, the tokenizer, the template text, the data keys and this code.

Image rows (Qwen2-VL, `images` given): each image is opened and sized in the mapped step, its single template pad
expanded to its token count, and its file kept in `image_files` for the collator (`vision.py`).

Rows with tools on a template without tool support are always an error (not a skip): training a tool dataset on
such a template is a configuration mistake, and skipping would silently train on whatever rows have no tools.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import re
import sys
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import datasets

from .errors import BadRow, QwentuneError, json_error_text
from .formats import FORMATS, convert, detect_format, needs_tools, normalize_tools
from .recipe import Recipe, resolve_path
from .render import ChatTemplate, fit_length, load_template, render_batch, render_preference_batch
from .vision import (
    IMAGE_COLUMNS,
    ImageFile,
    ImageSettings,
    check_not_cut,
    expand_pads,
    has_images,
    row_images,
    trained_spans,
)

SFT_COLUMNS = ("input_ids", "labels", "length")
# The prompt through the generation prompt, and each completion through its <|im_end|> (nothing after it). TRL 1.16's
# DPOTrainer has no pre-tokenized path (its _prepare_dataset always re-renders text pairs and its collator reads
# prompt_ids/chosen_ids/rejected_ids, completions only): dpo.py skips _prepare_dataset and renames these columns.
DPO_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
DATA_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
LENGTH_REASONS = ("over_length", "prompt_over_length", "completion_truncated_to_nothing")
EXAMPLES_PER_REASON = 3
DETECT_ROWS = 100  # rows read to detect a file's format
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------- reports


@dataclass
class DataReport:
    """What happened to one source file's rows in one split; counted by reason, never silent."""

    source: str
    detected_format: str
    total: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # reason -> first (row index, detail)
    truncated: int = 0
    split: str = "train"
    index_kind: str = "line"  # "line": 1-based line of a .jsonl file; "row": 0-based row of any other source

    def where(self, index: int) -> str:
        return f"{self.source}:{index}" if self.index_kind == "line" else f"{self.source} row {index}"

    def summary(self) -> str:
        head = f"{self.source} [{self.split}] format {self.detected_format}: {self.kept} of {self.total} rows kept"
        if self.truncated:
            head += f", {self.truncated} truncated to max_length"
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


@dataclass
class PreparedData:
    train: datasets.Dataset  # SFT: input_ids, labels, length; DPO: DPO_COLUMNS
    eval: datasets.Dataset | None
    reports: list[DataReport]
    template: ChatTemplate
    method: str = "sft"
    images: ImageSettings | None = None  # a vision model's: rows carry image_files / image_sizes


# ---------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    key: str  # the recipe key it came from: data.train[0]
    kind: str  # jsonl | json | parquet | csv | disk | hub
    path: str  # a resolved file/dir path, or a hub id
    split: str | None = None  # for save_to_disk DatasetDicts and hub datasets

    @property
    def label(self) -> str:
        return self.path + (f"#{self.split}" if self.split and self.kind == "hub" else "")

    @property
    def arrow(self) -> bool:
        """Rows read through Arrow (struct columns): a null there may be a key that was never given."""
        return self.kind in ("parquet", "disk", "hub")

    @property
    def base_dir(self) -> str | None:
        """Where relative image paths in the rows start: the data file's folder (a save_to_disk dir itself)."""
        if self.kind == "hub":
            return None
        path = Path(self.path)
        return str(path if path.is_dir() else path.parent)

    @property
    def index_kind(self) -> str:
        return "line" if self.kind == "jsonl" else "row"


class Unparsed(NamedTuple):
    """A jsonl line that is not JSON (load_rows yields it in place of the row)."""

    text: str
    error: str


def resolve_sources(recipe: Recipe, which: str = "train") -> list[Source]:
    """The sources behind data.train / data.eval: a file, a dir of data files, a save_to_disk dir, or a hub id
    (`owner/name`, optionally `#split`)."""
    out: list[Source] = []
    for i, value in enumerate(getattr(recipe.data, which)):
        key = f"data.{which}[{i}]"
        name, _, split = value.partition("#")
        path = resolve_path(recipe, name)
        default_split = recipe.data.split if which == "train" else None
        if path.is_dir():
            if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
                out.append(Source(key, "disk", str(path), split or default_split))
                continue
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in DATA_SUFFIXES and p.is_file())
            if not files:
                raise QwentuneError(
                    f"no data files in directory {path}",
                    where=key,
                    hint=f"put {', '.join(DATA_SUFFIXES)} files there, or a dataset saved with save_to_disk",
                )
            out += [Source(key, DATA_SUFFIXES[p.suffix.lower()], str(p)) for p in files]
        elif path.is_file():
            kind = DATA_SUFFIXES.get(path.suffix.lower())
            if kind is None:
                raise QwentuneError(
                    f"unsupported data file type '{path.suffix}': {path}",
                    where=key,
                    hint="use .jsonl, .json, .parquet or .csv files, a save_to_disk dir, or a hub dataset id",
                )
            out.append(Source(key, kind, str(path)))
        elif _looks_like_hub_id(recipe, name):
            out.append(Source(key, "hub", name, split or default_split or "validation"))
        else:
            raise QwentuneError(
                f"data file not found: {value}",
                where=key,
                hint=f"looked for {path}; relative paths resolve against the current directory, then against the "
                f"recipe's directory ({recipe.base_dir})",
            )
    return out


def _looks_like_hub_id(recipe: Recipe, name: str) -> bool:
    """owner/name with no data-file suffix, whose first part is not a local directory (then it is a missing path)."""
    if not _HUB_ID.match(name) or Path(name).suffix.lower() in DATA_SUFFIXES or name.startswith("."):
        return False
    return not resolve_path(recipe, name.split("/")[0]).is_dir()


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)  # dates, decimals, images (the VL path reads image columns itself)


def _dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=_json_default)


def _read_source(source: Source) -> Iterator[tuple[int, str]]:
    """(row index, the row as JSON text) for every row; jsonl lines are passed on unparsed (blank lines skipped)."""
    path = Path(source.path)
    if source.kind == "jsonl":
        yield from _read_jsonl_lines(path)
    elif source.kind == "json":
        yield from _read_json(source)
    elif source.kind == "csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            for i, row in enumerate(csv.DictReader(f)):
                yield i, _dump(row)
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
                yield i, _dump(row)
                i += 1
    elif source.kind in ("disk", "hub"):
        ds = _load_arrow_dataset(source)
        for i, row in enumerate(ds):
            yield i, _dump(row)
    else:
        raise ValueError(source.kind)


def _read_jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, line


def _read_json(source: Source) -> Iterator[tuple[int, str]]:
    path = Path(source.path)
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and text.strip().count("\n"):  # JSON Lines in a .json file
            yield from enumerate(line for line in text.splitlines() if line.strip())
            return
        raise QwentuneError(
            f"not valid JSON: {e.msg}", where=f"{path}:{e.lineno}", hint="a .json file holds a list of rows"
        ) from None
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
        yield i, _dump(row)


def _load_arrow_dataset(source: Source) -> datasets.Dataset:
    try:
        if source.kind == "disk":
            ds = datasets.load_from_disk(source.path)
        else:
            ds = datasets.load_dataset(source.path, split=source.split)
    except Exception as e:  # network, missing split, unknown id: all a user's to fix
        raise QwentuneError(
            f"cannot load dataset {source.label}: {type(e).__name__}: {e}",
            where=source.key,
            hint="check the id / path and the split (data.split, or `id#split`); offline, point data.train at files",
        ) from None
    if isinstance(ds, datasets.DatasetDict):
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


def load_rows(recipe: Recipe, which: str = "train") -> Iterator[tuple[str, int, Any]]:
    """(source, row index, raw row) for data.train or data.eval; the row index is the 1-based line of a .jsonl file
    and the 0-based row of other sources. A jsonl line that is not JSON comes as `Unparsed(text, error)`."""
    limit = recipe.data.limit
    for source in resolve_sources(recipe, which):
        for index, text in itertools.islice(_read_source(source), limit):
            try:
                yield source.label, index, json.loads(text)
            except json.JSONDecodeError as e:
                yield source.label, index, Unparsed(text, json_error_text(e))


# ---------------------------------------------------------------- the mapped step (runs in the map workers)


@dataclass(frozen=True)
class _Options:
    method: str
    formats: tuple[tuple[str, bool], ...]  # per source index: (format, arrow)
    tools: list | None
    system_prompt: str | None
    max_length: int
    overlong: str
    train_on: str
    bases: tuple[str | None, ...] = ()  # per source index: the folder relative image paths start from
    images: ImageSettings | None = None  # a vision model's image token counts; None: rows with images are refused


def _bad_cols(reason: str = "", detail: str = "") -> dict:
    return {"_bad_reason": reason, "_bad_detail": detail}


def _process_batch(batch: dict, *, opts: _Options, tokenizer: Any, template: ChatTemplate) -> dict:
    """Raw JSON rows → id columns plus _bad_reason/_bad_detail/_truncated; one result row per input row."""
    n = len(batch["_raw"])
    results: list[Any] = [None] * n
    canonical: list[tuple[int, dict]] = []
    images: dict[int, list[ImageFile]] = {}
    for i, (text, src) in enumerate(zip(batch["_raw"], batch["_src"])):
        fmt, arrow = opts.formats[src]
        try:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise BadRow("invalid_json", json_error_text(e)) from None
            row = convert(raw, fmt, arrow=arrow, tools=opts.tools, system_prompt=opts.system_prompt)
            if not template.supports_tools and needs_tools(row):
                raise BadRow("tools_unsupported", f"the row uses tools; template {template.name} has no tool support")
            if opts.images is not None:
                images[i] = row_images(row, opts.bases[src])
            elif has_images(row):
                raise BadRow("images_unsupported", "the row has images; the model is not a vision model")
        except BadRow as bad:
            results[i] = bad
            continue
        canonical.append((i, row))
    rows = [r for _, r in canonical]
    if opts.method == "dpo":
        rendered = render_preference_batch(rows, tokenizer, template)
    else:
        rendered = render_batch(rows, tokenizer, template, train_on=opts.train_on)
    for (i, _), res in zip(canonical, rendered):
        if not isinstance(res, BadRow):
            try:
                if opts.images is not None:
                    res = _with_image_tokens(res, images[i], opts)
                res = _fit_pair(res, opts) if opts.method == "dpo" else _fit_row(res, opts)
                if opts.images is not None:  # the files travel with the row to the collator
                    res |= _image_cols(images[i])
            except BadRow as bad:
                res = bad
        results[i] = res
    cols = (*(DPO_COLUMNS if opts.method == "dpo" else SFT_COLUMNS), *(IMAGE_COLUMNS if opts.images else ()))
    out: dict[str, list] = {c: [] for c in (*cols, "_truncated", "_bad_reason", "_bad_detail")}
    for res in results:
        if isinstance(res, BadRow):
            values: dict = {c: 0 if c == "length" else [] for c in cols} | {"_truncated": False}
            values |= _bad_cols(res.reason, res.detail)
        else:
            values = res | _bad_cols()
        for k, v in values.items():
            out[k].append(v)
    return out


def _with_image_tokens(rendered: Any, files: list[ImageFile], opts: _Options) -> Any:
    """Each image's single pad expanded to its token count."""
    settings = opts.images
    counts = [settings.tokens(f.width, f.height) for f in files]
    if opts.method == "dpo":
        prompt, _ = expand_pads(rendered.prompt_input_ids, None, counts, settings)
        rendered = replace(rendered, prompt_input_ids=prompt)
    else:
        ids, labels = expand_pads(rendered.input_ids, rendered.labels, counts, settings)
        rendered = replace(rendered, input_ids=ids, labels=labels, trained_spans=trained_spans(labels))
    return rendered


def _image_cols(files: list[ImageFile]) -> dict:
    return {"image_files": [f.ref for f in files], "image_sizes": [[f.width, f.height] for f in files]}


def _fit_row(rendered: Any, opts: _Options) -> dict:
    overlong = "drop" if opts.overlong == "error" else opts.overlong  # 'error' is raised by the main process
    if opts.images is not None and overlong == "truncate" and len(rendered.input_ids) > opts.max_length:
        check_not_cut(rendered.input_ids, opts.max_length, opts.images)
    fitted = fit_length(rendered, opts.max_length, overlong)
    ids = fitted.input_ids
    return {"input_ids": ids, "labels": fitted.labels, "length": len(ids), "_truncated": fitted.truncated}


def _fit_pair(pair: Any, opts: _Options) -> dict:
    """DPO lengths: a prompt over max_length is dropped (prompt_over_length); a pair over it is dropped (over_length)
    or, under `truncate`, its completions are cut from the end (they then lose <|im_end|>: counted as truncated);
    a prompt that fills max_length leaves nothing to cut to (completion_truncated_to_nothing)."""
    prompt, chosen, rejected = pair.prompt_input_ids, pair.chosen_input_ids, pair.rejected_input_ids
    p, m = len(prompt), opts.max_length
    if p > m:
        raise BadRow("prompt_over_length", f"the prompt has {p} tokens, more than max_length {m}")
    room = m - p
    longest = max(len(chosen), len(rejected))
    truncated = longest > room
    if truncated:
        if opts.overlong != "truncate":
            raise BadRow("over_length", f"prompt {p} + completion {longest} tokens, more than max_length {m}")
        if room == 0:
            raise BadRow("completion_truncated_to_nothing", f"the prompt fills max_length {m} by itself")
        chosen, rejected = chosen[:room], rejected[:room]
        if chosen == rejected:
            raise BadRow("identical_pair", f"chosen and rejected are the same in their first {room} tokens")
    return dict(zip(DPO_COLUMNS, (prompt, chosen, rejected))) | {"_truncated": truncated}


def _features(method: str, images: bool = False) -> datasets.Features:
    ids = datasets.List(datasets.Value("int32"))
    cols = {c: ids for c in (DPO_COLUMNS if method == "dpo" else SFT_COLUMNS[:2])}
    if method != "dpo":
        cols["length"] = datasets.Value("int32")
    if images:
        cols["image_files"] = datasets.List(datasets.Value("string"))
        cols["image_sizes"] = datasets.List(datasets.List(datasets.Value("int32")))
    return datasets.Features(
        {
            **cols,
            "_truncated": datasets.Value("bool"),
            "_bad_reason": datasets.Value("string"),
            "_bad_detail": datasets.Value("string"),
            "_src": datasets.Value("int32"),
            "_row": datasets.Value("int64"),
        }
    )


# ---------------------------------------------------------------- fingerprint and cache

_TOKENIZER_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_hash(tokenizer: Any) -> str:
    try:
        return _TOKENIZER_HASHES[tokenizer]
    except (KeyError, TypeError):
        pass
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer).encode())
    h.update(_dump(dict(tokenizer.special_tokens_map)).encode())
    digest = h.hexdigest()
    try:
        _TOKENIZER_HASHES[tokenizer] = digest
    except TypeError:
        pass
    return digest


def _code_hash() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("data.py", "formats.py", "render.py", "vision.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()


def cache_dir() -> Path:
    """Where mapped data is cached: $QWENTUNE_DATA_CACHE, else <HF datasets cache>/qwentune."""
    env = os.environ.get("QWENTUNE_DATA_CACHE")
    return Path(env) if env else Path(datasets.config.HF_DATASETS_CACHE) / "qwentune"


def _fingerprint(raw: dict, opts: _Options, tokenizer: Any, template: ChatTemplate) -> str:
    h = hashlib.sha256()
    for part in (_code_hash(), _tokenizer_hash(tokenizer), template.name, template.text, _dump(asdict(opts))):
        h.update(part.encode())
        h.update(b"\0")
    for text, src, row in zip(raw["_raw"], raw["_src"], raw["_row"]):
        h.update(f"{src}:{row}:".encode())
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:40]


# ---------------------------------------------------------------- the pipeline


@dataclass
class _Loaded:
    source: Source
    fmt: str
    rows: list[tuple[int, str]]  # (row index, JSON text)


def _detect(source: Source, rows: list[tuple[int, str]], forced: str) -> str:
    if forced != "auto":
        return forced
    parsed = 0
    first_keys: list[str] | None = None
    for _, text in rows:
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            continue
        parsed += 1
        fmt = detect_format(row)
        if fmt:
            return fmt
        if first_keys is None:
            first_keys = sorted(row) if isinstance(row, dict) else [type(row).__name__]
        if parsed >= DETECT_ROWS:
            break
    if not parsed:
        return "unknown"  # every row is invalid JSON: counted as such, then refused as all-bad
    raise QwentuneError(
        f"cannot tell the format of {source.label}: its first row has keys {first_keys}",
        where=source.key,
        hint="rows need `messages`, `conversations`, `instruction`+`output`, `prompt`+`completion` or "
        "`chosen`+`rejected`; or force one with data.format (" + ", ".join(FORMATS) + ")",
    )


def _load_split(recipe: Recipe, which: str, limit: int | None) -> list[_Loaded]:
    loaded = []
    for source in resolve_sources(recipe, which):
        rows = list(itertools.islice(_read_source(source), limit))
        if not rows:
            raise QwentuneError(f"{source.label} has no rows", where=source.key, hint="check the file")
        fmt = _detect(source, rows, recipe.data.format)
        if recipe.method == "dpo" and fmt not in ("preference", "unknown"):
            raise QwentuneError(
                f"method is dpo but {source.label} is in {fmt} format, not preference pairs",
                where=source.key,
                hint="DPO needs rows with chosen and rejected (and a prompt)",
            )
        if recipe.method != "dpo" and fmt == "preference":
            raise QwentuneError(
                f"{source.label} holds preference pairs (chosen/rejected) but method is {recipe.method}",
                where=source.key,
                hint="use method: dpo, or a conversation file for SFT",
            )
        loaded.append(_Loaded(source, fmt, rows))
    return loaded


def _default_tools(recipe: Recipe) -> list | None:
    if not recipe.data.tools:
        return None
    path = resolve_path(recipe, recipe.data.tools)
    if not path.is_file():
        raise QwentuneError(
            f"tools file not found: {recipe.data.tools}", where="data.tools", hint=f"looked for {path}"
        )
    try:
        return normalize_tools(path.read_text(encoding="utf-8"))
    except BadRow as bad:
        raise QwentuneError(
            f"{path}: {bad.detail}", where="data.tools", hint="a JSON list of function schemas"
        ) from None


def _limit(recipe: Recipe, limit: int | None) -> int | None:
    limits = [x for x in (limit, recipe.data.limit) if x is not None]
    return min(limits) if limits else None


def prepare_data(
    recipe: Recipe,
    tokenizer: Any,
    *,
    limit: int | None = None,
    quiet: bool = False,
    keep_origin: bool = False,
    images: ImageSettings | None = None,
) -> PreparedData:
    """Load, convert, render and length-fit data.train (and data.eval, or an eval_fraction of train).
    `limit` (and data.limit) keeps the first N rows of each file. Prints the per-file reports to stderr unless
    `quiet`. `keep_origin` keeps the `_src`/`_row` columns (preview uses them to name rows). `images`: a vision
    model's image settings (`vision.image_settings`); rows then keep their image files and expanded image pads."""
    d = recipe.data
    template = load_template(d.template, tokenizer)
    limit = _limit(recipe, limit)
    tools = _default_tools(recipe)
    train_loaded = _load_split(recipe, "train", limit)
    if d.eval:
        eval_limit = min(x for x in (limit, d.eval_limit, 10**12) if x is not None)
        splits = {"train": (train_loaded, None), "eval": (_load_split(recipe, "eval", eval_limit), None)}
    elif d.eval_fraction > 0:
        splits = _fraction_split(train_loaded, d.eval_fraction, d.seed)
    else:
        splits = {"train": (train_loaded, None)}
    out: dict[str, datasets.Dataset] = {}
    reports: list[DataReport] = []
    for name, (loaded, keep) in splits.items():
        ds, split_reports = _prepare_split(name, loaded, keep, recipe, tokenizer, template, tools, keep_origin, images)
        out[name] = ds
        reports += [r for r in split_reports if r.total]  # an eval_fraction may take no row of a file
    if not quiet:
        for report in reports:
            print(report.summary(), file=sys.stderr)
    return PreparedData(out["train"], out.get("eval"), reports, template, recipe.method, images)


def _fraction_split(loaded: list[_Loaded], fraction: float, seed: int) -> dict:
    """A seeded eval split over the raw rows of all train files (before any row is dropped), so it does not move
    when max_length or the template change."""
    import numpy as np

    total = sum(len(x.rows) for x in loaded)
    n_eval = max(1, round(total * fraction))
    if n_eval >= total:
        raise QwentuneError(
            f"data.eval_fraction {fraction} of {total} rows leaves no train rows", where="data.eval_fraction"
        )
    chosen = np.random.default_rng(seed).permutation(total)[:n_eval]
    is_eval = np.zeros(total, dtype=bool)
    is_eval[chosen] = True
    return {"train": (loaded, ~is_eval), "eval": (loaded, is_eval)}


def _prepare_split(
    split: str,
    loaded: list[_Loaded],
    keep: Any,
    recipe: Recipe,
    tokenizer: Any,
    template: ChatTemplate,
    tools: list | None,
    keep_origin: bool,
    images: ImageSettings | None = None,
) -> tuple[datasets.Dataset, list[DataReport]]:
    d = recipe.data
    raw: dict[str, list] = {"_raw": [], "_src": [], "_row": []}
    k = 0
    for s, item in enumerate(loaded):
        for index, text in item.rows:
            if keep is None or keep[k]:
                raw["_raw"].append(text)
                raw["_src"].append(s)
                raw["_row"].append(index)
            k += 1
    opts = _Options(
        method=recipe.method,
        formats=tuple((x.fmt, x.source.arrow) for x in loaded),
        tools=tools,
        system_prompt=d.system_prompt,
        max_length=d.max_length,
        overlong=d.overlong,
        train_on=d.train_on,
        bases=tuple(x.source.base_dir for x in loaded),
        images=images,
    )
    reports = [DataReport(x.source.label, x.fmt, split=split, index_kind=x.source.index_kind) for x in loaded]
    mapped = _map(raw, opts, tokenizer, template, d.num_proc, split)
    table = mapped.data
    reasons = table.column("_bad_reason").to_pylist()
    details = table.column("_bad_detail").to_pylist()
    truncated = table.column("_truncated").to_pylist()
    _refuse_tool_rows(reasons, raw, reports, template, tools, split)
    _refuse_image_rows(reasons, raw, reports, split)
    kept: list[int] = []
    for i, (reason, detail, src, row, cut) in enumerate(zip(reasons, details, raw["_src"], raw["_row"], truncated)):
        report = reports[src]
        report.total += 1
        if not reason:
            report.kept += 1
            report.truncated += bool(cut)
            kept.append(i)
            continue
        if reason in LENGTH_REASONS and d.overlong == "error":
            raise QwentuneError(
                f"row is too long ({reason}: {detail})",
                where=report.where(row),
                hint=f"raise data.max_length ({d.max_length}), or set data.overlong: drop | truncate",
            )
        if reason not in LENGTH_REASONS and d.bad_rows == "error":
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
        _refuse_empty(reports, len(reasons), split, d.max_length)
    if len(kept) < len(reasons):
        mapped = mapped.select(kept)
    drop = ["_truncated", "_bad_reason", "_bad_detail"] + ([] if keep_origin else ["_src", "_row"])
    return mapped.remove_columns(drop), reports


def _refuse_tool_rows(
    reasons: list[str], raw: dict, reports: list[DataReport], template: ChatTemplate, tools: list | None, split: str
) -> None:
    """Rows with tools on a template without tool support: one error up front (see the module docstring)."""
    hits = [i for i, r in enumerate(reasons) if r == "tools_unsupported"]
    if not hits:
        return
    src, row = raw["_src"][hits[0]], raw["_row"][hits[0]]
    raise QwentuneError(
        f"{len(hits)} of {len(reasons)} {split} rows use tools (tool schemas, calls or results), but chat template "
        f"'{template.name}' has no tool support",
        where="data.tools" if tools else reports[src].where(row),
        hint="use a template with tools (data.template: qwen2.5-instruct) or data without tools; "
        "rows are never trained with their tools silently removed",
    )


def _refuse_image_rows(reasons: list[str], raw: dict, reports: list[DataReport], split: str) -> None:
    """Rows with images for a text model: a configuration mistake, one error up front (never trained without them)."""
    hits = [i for i, r in enumerate(reasons) if r == "images_unsupported"]
    if not hits:
        return
    src, row = raw["_src"][hits[0]], raw["_row"][hits[0]]
    raise QwentuneError(
        f"{len(hits)} of {len(reasons)} {split} rows have images, but the model is not a vision model",
        where=reports[src].where(row),
        hint="use a Qwen2-VL model (recipes/qwen2-vl-2b-instruct/) or data without images",
    )


def _refuse_empty(reports: list[DataReport], total: int, split: str, max_length: int) -> None:
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
    else:
        hint = "check data.format and the rows' roles; `qwentune preview` on a fixed copy shows how rows render"
    raise QwentuneError(
        f"no usable {split} rows: all {total} were skipped ({listed}); first: {reason0} ({detail0})",
        where=first.where(row0),
        hint=hint,
    )


def _map(
    raw: dict, opts: _Options, tokenizer: Any, template: ChatTemplate, num_proc: int, split: str
) -> datasets.Dataset:
    fingerprint = _fingerprint(raw, opts, tokenizer, template)
    base = datasets.Dataset.from_dict(
        raw,
        features=datasets.Features(
            {"_raw": datasets.Value("large_string"), "_src": datasets.Value("int32"), "_row": datasets.Value("int64")}
        ),
    )
    cache_file = None
    if datasets.is_caching_enabled():
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        cache_file = str(folder / f"{opts.method}-{fingerprint}.arrow")
    return base.map(
        _process_batch,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 and len(base) > 1 else None,
        remove_columns=["_raw"],
        features=_features(opts.method, opts.images is not None),
        fn_kwargs={"opts": opts, "tokenizer": tokenizer, "template": template},
        new_fingerprint=fingerprint,
        cache_file_name=cache_file,
        load_from_cache_file=cache_file is not None,
        desc=f"Rendering {split} rows",
    )


__all__ = [
    "DPO_COLUMNS",
    "SFT_COLUMNS",
    "DataReport",
    "PreparedData",
    "Source",
    "Unparsed",
    "cache_dir",
    "load_rows",
    "prepare_data",
    "resolve_sources",
]
