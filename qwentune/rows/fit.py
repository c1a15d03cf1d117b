"""Fitting rendered rows into data.max_length, one function per kind of row: text rows (`fit_row`), rows with
images (`fit_image_row`: never cut into an image) and preference pairs (`fit_pair`).

'drop' and 'error' raise BadRow (the pipeline turns the length reasons into a hard error under 'error');
'truncate' keeps the start of a row and cuts the end of a pair's completions.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..errors import BadRow, QwentuneError, did_you_mean
from .images import ImageSettings
from .render import Rendered, RenderedPair

OVERLONG = ("drop", "truncate", "error")
LENGTH_REASONS = ("over_length", "prompt_over_length", "completion_truncated_to_nothing")


_TOKEN_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def max_token_bytes(tokenizer: Any) -> int | None:
    """The most bytes of text one token can cover, times 3 when an NFC/NFKC normalizer may shrink the text first
    (a Hangul syllable composes from three 3-byte jamo), or None when no such bound holds (a tokenizer that is not
    byte-level BPE may map any run of unknown text to one token). A rendered text of more than max_length × this many
    UTF-8 bytes has more than max_length tokens: Qwen's byte-level BPE tokens cover at most 128 bytes."""
    try:
        return _TOKEN_BYTES[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    bound = None
    if backend is not None and type(backend.model).__name__ == "BPE" and type(backend.decoder).__name__ == "ByteLevel":
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        # a byte-level vocab entry spells one byte per character; added tokens are plain text
        bound = max(len(t.encode()) if t in added else len(t) for t in backend.get_vocab())
        normalizer = type(backend.normalizer).__name__ if backend.normalizer is not None else None
        if normalizer in ("NFC", "NFKC"):
            bound *= 3
        elif normalizer not in (None, "NFD", "NFKD"):  # NFD only grows the text; anything else: no proven bound
            bound = None
    try:
        _TOKEN_BYTES[tokenizer] = bound
    except TypeError:
        pass
    return bound


def length_bound(tokenizer: Any, max_length: int) -> int | None:
    """A size in UTF-8 bytes above which a rendered row is over max_length tokens for sure (decided without
    tokenizing it), or None when the tokenizer gives no such bound."""
    per_token = max_token_bytes(tokenizer)
    return None if per_token is None else max_length * per_token


def fit_row(rendered: Rendered, max_length: int, overlong: str) -> Rendered:
    """Fit a rendered row into max_length tokens. 'drop' and 'error' raise BadRow('over_length') (the pipeline turns
    'error' into a hard error); 'truncate' keeps the start and needs at least one trained token left."""
    if overlong not in OVERLONG:
        raise QwentuneError(
            f"overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}",
            where="overlong",
            hint=did_you_mean(str(overlong), OVERLONG),
        )
    n = len(rendered.input_ids)
    if n <= max_length:
        return rendered
    if overlong != "truncate":
        raise BadRow("over_length", f"{n} tokens, more than max_length {max_length}")
    spans = [(a, min(b, max_length)) for a, b in rendered.trained_spans if a < max_length]
    if not spans:
        raise BadRow("over_length", f"{n} tokens, and no trained token within the first {max_length}")
    return replace(
        rendered,
        input_ids=rendered.input_ids[:max_length],
        labels=rendered.labels[:max_length],
        trained_spans=spans,
        truncated=True,
    )


def fit_image_row(rendered: Rendered, max_length: int, overlong: str, settings: ImageSettings) -> Rendered:
    """`fit_row` for a row with expanded image pads: truncation may cut text after the last image, never into or
    before an image's tokens (the model would see fewer pads than the image has features: "Image features and image
    tokens do not match")."""
    if overlong == "truncate" and len(rendered.input_ids) > max_length:
        _check_not_cut(rendered.input_ids, max_length, settings)
    return fit_row(rendered, max_length, overlong)


def _check_not_cut(ids: Sequence[int], max_length: int, settings: ImageSettings) -> None:
    vision = (settings.image_pad_id, settings.vision_start_id, settings.vision_end_id)
    last = max((i for i, tid in enumerate(ids) if tid in vision), default=-1)
    if last >= max_length:
        raise BadRow(
            "image_tokens_cut",
            f"{len(ids)} tokens; cutting to max_length {max_length} would cut image tokens (the last ends at "
            f"{last + 1}), so the row is dropped",
        )


def fit_pair(pair: RenderedPair, max_length: int, overlong: str) -> tuple[list[int], list[int], list[int], bool]:
    """DPO lengths: (prompt, chosen, rejected, truncated). A prompt over max_length is dropped (prompt_over_length);
    a pair over it is dropped (over_length) or, under `truncate`, its completions are cut from the end (they then
    lose <|im_end|>: counted as truncated); a prompt that fills max_length leaves nothing to cut to
    (completion_truncated_to_nothing)."""
    prompt, chosen, rejected = pair.prompt_input_ids, pair.chosen_input_ids, pair.rejected_input_ids
    p, m = len(prompt), max_length
    if p > m:
        raise BadRow("prompt_over_length", f"the prompt has {p} tokens, more than max_length {m}")
    room = m - p
    longest = max(len(chosen), len(rejected))
    truncated = longest > room
    if truncated:
        if overlong != "truncate":
            raise BadRow("over_length", f"prompt {p} + completion {longest} tokens, more than max_length {m}")
        if room == 0:
            raise BadRow("completion_truncated_to_nothing", f"the prompt fills max_length {m} by itself")
        chosen, rejected = chosen[:room], rejected[:room]
        if chosen == rejected:
            raise BadRow("identical_pair", f"chosen and rejected are the same in their first {room} tokens")
    return prompt, chosen, rejected, truncated


__all__ = ["LENGTH_REASONS", "OVERLONG", "fit_image_row", "fit_pair", "fit_row", "length_bound", "max_token_bytes"]
