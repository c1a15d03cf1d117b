"""The mapped step of the data pipeline, run in `Dataset.map` workers: raw JSON rows → canonical rows (`formats`) →
ids and exact masks (`render`) → image pads expanded (`vision`) → lengths fitted (`fit`), plus `_bad_reason` /
`_bad_detail` for a row that cannot be trained on exactly. The rows travel as JSON strings and only id lists come
out, so Arrow never sees a tool call's arguments or a tool schema (struct unification would add a `null` for every key
seen in any other row). The result is cached on disk under a fingerprint of the raw rows, the tokenizer, the template
text, the options and this code."""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import datasets

from ..errors import BadRow, json_error_text
from ..recipe import DataSection
from ..rows import (
    IMAGE_COLUMNS,
    ChatTemplate,
    ImageFile,
    ImageSettings,
    convert,
    expand_pads,
    fit_image_row,
    fit_pair,
    fit_row,
    has_images,
    length_bound,
    needs_tools,
    render_batch,
    render_preference_batch,
    row_images,
    trained_spans,
)
from .sources import Source, dump_row

# The modules whose code decides the mapped rows (part of the cache fingerprint).
# The code whose output the cache holds (paths under qwentune/): a change to any of them is a new cache entry.
DATA_CODE = (
    "data/mapped.py", "rows/canonical.py", "rows/formats.py", "rows/template.py", "rows/turns.py", "rows/render.py",
    "rows/fit.py", "rows/images.py",
)  # fmt: skip
SFT_COLUMNS = ("input_ids", "labels", "length")
# The prompt through the generation prompt, and each completion through its <|im_end|> (nothing after it). TRL 1.16's
# DPOTrainer has no pre-tokenized path (its _prepare_dataset always re-renders text pairs and its collator reads
# prompt_ids/chosen_ids/rejected_ids, completions only): dpo.py skips _prepare_dataset and renames these columns.
DPO_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


@dataclass(frozen=True)
class Options:
    method: str
    formats: tuple[tuple[str, bool], ...]  # per source index: (format, arrow)
    tools: list | None
    system_prompt: str | None
    max_length: int
    overlong: str
    train_on: str
    bases: tuple[str | None, ...] = ()  # per source index: the folder relative image paths start from
    images: ImageSettings | None = None  # a vision model's image token counts; None: rows with images are refused
    max_bytes: int | None = None  # a rendering over this many bytes is over max_length for sure (`fit.length_bound`)
    dedupe: bool = False  # give each row a `_key`: a hash of its canonical row (data.dedupe)


def row_options(
    d: DataSection,
    method: str,
    sources: list[tuple[str, Source]],
    tools: list | None,
    images: ImageSettings | None,
    tokenizer: Any,
) -> Options:
    """What the mapped step (and the stream) needs to turn each source's rows into ids: `sources` as (format,
    source), in the split's source order."""
    return Options(
        method=method,
        formats=tuple((fmt, source.arrow) for fmt, source in sources),
        tools=tools,
        system_prompt=d.system_prompt,
        max_length=d.max_length,
        overlong=d.overlong,
        train_on=d.train_on,
        bases=tuple(source.base_dir for _, source in sources),
        images=images,
        max_bytes=length_bound(tokenizer, d.max_length),
        dedupe=d.dedupe,
    )


def _bad_cols(reason: str = "", detail: str = "") -> dict:
    return {"_bad_reason": reason, "_bad_detail": detail}


def process_batch(batch: dict, *, opts: Options, tokenizer: Any, template: ChatTemplate) -> dict:
    """Raw JSON rows → id columns plus _bad_reason/_bad_detail/_truncated; one result row per input row."""
    n = len(batch["_raw"])
    results: list[Any] = [None] * n
    canonical: list[tuple[int, dict]] = []
    images: dict[int, list[ImageFile]] = {}
    for i, (text, src, read_bad) in enumerate(zip(batch["_raw"], batch["_src"], batch["_read_bad"])):
        fmt, arrow = opts.formats[src]
        if read_bad:  # a line that could not be read as a row (bad_encoding, csv_malformed)
            results[i] = BadRow(read_bad, batch["_read_detail"][i])
            continue
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
    keys = [""] * n
    if opts.dedupe:  # the canonical row, keys sorted: the same conversation in any format or key order
        for i, row in canonical:
            text = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
            keys[i] = hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
    rows = [r for _, r in canonical]
    if opts.method == "dpo":
        rendered = render_preference_batch(rows, tokenizer, template, max_bytes=opts.max_bytes)
    else:
        rendered = render_batch(rows, tokenizer, template, train_on=opts.train_on, max_bytes=opts.max_bytes)
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
    out["_key"] = keys
    for res in results:
        if isinstance(res, BadRow):
            values: dict = {c: 0 if c == "length" else [] for c in cols} | {"_truncated": False}
            values |= _bad_cols(res.reason, res.detail)
        else:
            values = res | _bad_cols()
        for k, v in values.items():
            out[k].append(v)
    return out


def _with_image_tokens(rendered: Any, files: list[ImageFile], opts: Options) -> Any:
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


def _fit_row(rendered: Any, opts: Options) -> dict:
    overlong = "drop" if opts.overlong == "error" else opts.overlong  # 'error' is raised by the main process
    if opts.images is not None:
        fitted = fit_image_row(rendered, opts.max_length, overlong, opts.images)
    else:
        fitted = fit_row(rendered, opts.max_length, overlong)
    ids = fitted.input_ids
    return {"input_ids": ids, "labels": fitted.labels, "length": len(ids), "_truncated": fitted.truncated}


def _fit_pair(pair: Any, opts: Options) -> dict:
    *ids, truncated = fit_pair(pair, opts.max_length, opts.overlong)
    return dict(zip(DPO_COLUMNS, ids)) | {"_truncated": truncated}


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
            "_key": datasets.Value("string"),
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
    h.update(dump_row(dict(tokenizer.special_tokens_map)).encode())
    digest = h.hexdigest()
    try:
        _TOKENIZER_HASHES[tokenizer] = digest
    except TypeError:
        pass
    return digest


def _code_hash() -> str:
    package = Path(__file__).parents[1]
    h = hashlib.sha256()
    for name in DATA_CODE:
        h.update((package / name).read_bytes())
    return h.hexdigest()


def cache_dir() -> Path:
    """Where mapped data is cached: $QWENTUNE_DATA_CACHE, else <HF datasets cache>/qwentune."""
    env = os.environ.get("QWENTUNE_DATA_CACHE")
    return Path(env) if env else Path(datasets.config.HF_DATASETS_CACHE) / "qwentune"


def _fingerprint(digest: str, opts: Options, tokenizer: Any, template: ChatTemplate) -> str:
    """The mapped rows' cache key: this code, the tokenizer, the template, the options and the raw rows (`digest`)."""
    h = hashlib.sha256()
    for part in (
        _code_hash(),
        _tokenizer_hash(tokenizer),
        template.name,
        template.text,
        dump_row(asdict(opts)),
        digest,
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:40]


def map_rows(
    base: datasets.Dataset,
    digest: str,
    opts: Options,
    tokenizer: Any,
    template: ChatTemplate,
    num_proc: int,
    split: str,
) -> datasets.Dataset:
    """`base` (raw rows: `raw.SCHEMA`) rendered by `process_batch` into a cached Arrow file of its own."""
    fingerprint = _fingerprint(digest, opts, tokenizer, template)
    cache_file = None
    if datasets.is_caching_enabled():
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        cache_file = str(folder / f"{opts.method}-{fingerprint}.arrow")
    return base.map(
        process_batch,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 and len(base) > 1 else None,
        remove_columns=["_raw", "_read_bad", "_read_detail"],
        features=_features(opts.method, opts.images is not None),
        fn_kwargs={"opts": opts, "tokenizer": tokenizer, "template": template},
        new_fingerprint=fingerprint,
        cache_file_name=cache_file,
        load_from_cache_file=cache_file is not None,
        desc=f"Rendering {split} rows",
    )


__all__ = ["DPO_COLUMNS", "SFT_COLUMNS", "Options", "cache_dir", "map_rows", "process_batch", "row_options"]
