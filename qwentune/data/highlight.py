"""`qwentune preview`: the first rows exactly as training sees them (the same pipeline as training), trained tokens
highlighted, special tokens printed literally, newlines shown as ↵, then the data report and the special/added
tokens that occur in trained labels."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..recipe import Recipe
from ..rows import ImageSettings, image_runs
from .mapped import DPO_COLUMNS
from .pipeline import PreparedData, prepare_data
from .sources import resolve_sources

IGNORE = -100
TRAINED_ON = "\x1b[30;42m"  # black on green
FLAGGED_ON = "\x1b[30;41m"  # black on red: a trained special token whose embedding row looks untrained
RESET = "\x1b[0m"
NEWLINE = "↵"


def _segments(ids: list[int], trained: list[bool], flagged: set[int]) -> list[tuple[list[int], str]]:
    """Runs of tokens with the same state: 'trained', 'flagged' (one token each), or ''."""
    out: list[tuple[list[int], str]] = []
    for tid, is_trained in zip(ids, trained):
        state = "flagged" if is_trained and tid in flagged else ("trained" if is_trained else "")
        if out and out[-1][1] == state and state != "flagged":
            out[-1][0].append(tid)
        else:
            out.append(([tid], state))
    return out


def _paint(text: str, state: str, color: bool) -> str:
    text = text.replace("\n", NEWLINE + "\n")
    if not state:
        return text
    if not color:
        return f"[[{text}]]" if state == "trained" else f"[[!{text}!]]"
    on = FLAGGED_ON if state == "flagged" else TRAINED_ON
    # Close the colour before each line break so it does not run to the end of the terminal line.
    return "\n".join(f"{on}{line}{RESET}" if line else line for line in text.split("\n"))


def render_tokens(
    tokenizer: Any,
    ids: list[int],
    labels: list[int] | None,
    *,
    color: bool = True,
    flagged: set[int] | None = None,
    images: tuple[int, list] | None = None,
) -> str:
    """Text of `ids` with the trained ones (labels != -100; all of them when labels is None) marked. `images`
    (the image pad id, each image's [width, height]) shows each run of image pads as `<image k: W×H → N tokens>`."""
    trained = [True] * len(ids) if labels is None else [lab != IGNORE for lab in labels]
    runs = image_runs(ids, images[0]) if images else []
    parts = []
    start = 0
    for k, (a, b) in enumerate([*runs, (len(ids), len(ids))]):
        for seg, state in _segments(list(ids[start:a]), trained[start:a], flagged or set()):
            text = tokenizer.decode(seg, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            parts.append(_paint(text, state, color))
        if k < len(runs):
            w, h = images[1][k] if k < len(images[1]) else ("?", "?")
            parts.append(f"<image {k + 1}: {w}×{h} → {b - a} tokens>")
        start = b
    return "".join(parts)


def _images(row: dict, pad: int | None) -> tuple[int, list] | None:
    return (pad, row.get("image_sizes") or []) if pad is not None else None


def _special_ids(tokenizer: Any) -> set[int]:
    return {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})} | set(tokenizer.all_special_ids)


def trained_special_tokens(data: PreparedData, tokenizer: Any) -> dict[int, int]:
    """Special/added token id -> how often it occurs in trained positions (SFT labels, DPO completions)."""
    specials = np.array(sorted(_special_ids(tokenizer)), dtype=np.int64)
    columns = ["labels"] if data.method != "dpo" else list(DPO_COLUMNS[1:])
    counts: dict[int, int] = {}
    for name in columns:
        if name not in data.train.column_names:
            continue
        values = data.train.data.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        hits = values[np.isin(values, specials)]
        for tid, n in zip(*np.unique(hits, return_counts=True)):
            counts[int(tid)] = counts.get(int(tid), 0) + int(n)
    return counts


def preview(
    recipe: Recipe,
    tokenizer: Any,
    rows: int = 3,
    color: bool = True,
    *,
    flagged: set[int] | None = None,
    limit: int | None = None,
    images: ImageSettings | None = None,
) -> str:
    """The first `rows` kept train rows with trained tokens highlighted (ANSI background; with color=False, trained
    text is wrapped in [[ ]] and flagged tokens in [[! !]]), the data reports, and the special tokens in trained
    labels; `flagged` marks token ids whose embedding rows look untrained."""
    flagged = set(flagged or ())
    data = prepare_data(
        recipe.data,
        recipe.method,
        recipe.base_dir,
        tokenizer,
        limit=limit,
        quiet=True,
        keep_origin=True,
        images=images,
    )
    pad = images.image_pad_id if images else None
    labels = {i: s.label for i, s in enumerate(_sources(recipe))}
    index_kind = {r.source: r.index_kind for r in data.reports}
    out: list[str] = [f"template: {data.template.name}  method: {recipe.method}"]
    for row in data.train.select(range(min(rows, len(data.train)))):
        source = labels.get(row["_src"], "?")
        where = f"{source}:{row['_row']}" if index_kind.get(source) == "line" else f"{source} row {row['_row']}"
        if data.method == "dpo":
            prompt, chosen, rejected = (row[c] for c in DPO_COLUMNS)
            n = len(prompt) + len(chosen) + len(rejected)
            out.append(f"── {where} · {n} tokens · {len(chosen)} chosen + {len(rejected)} rejected trained ──")
            shown = render_tokens(
                tokenizer, prompt, [IGNORE] * len(prompt), color=color, flagged=flagged, images=_images(row, pad)
            )
            out.append(shown)
            for name, ids in (("chosen", chosen), ("rejected", rejected)):
                out.append(f"·· {name} ··")
                out.append(render_tokens(tokenizer, ids, None, color=color, flagged=flagged))
        else:
            ids, labs = row["input_ids"], row["labels"]
            n_trained = sum(lab != IGNORE for lab in labs)
            out.append(f"── {where} · {len(ids)} tokens · {n_trained} trained ──")
            out.append(render_tokens(tokenizer, ids, labs, color=color, flagged=flagged, images=_images(row, pad)))
    out.append("── data ──")
    out += [r.summary() for r in data.reports]
    specials = trained_special_tokens(data, tokenizer)
    if specials:
        out.append("special tokens in trained labels:")
        for tid, n in sorted(specials.items()):
            mark = "  ← flagged: embedding row looks untrained" if tid in flagged else ""
            out.append(f"  {tokenizer.convert_ids_to_tokens(tid)} ({tid}) ×{n}{mark}")
    else:
        out.append("special tokens in trained labels: none")
    return "\n".join(out)


def _sources(recipe: Recipe) -> list:
    return resolve_sources(recipe.data, recipe.base_dir, "train")
