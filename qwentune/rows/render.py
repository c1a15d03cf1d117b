"""Rendering rows with the chat template into token ids and exact loss masks.

A conversation is rendered by the template exactly as `tokenizer.apply_chat_template(..., tokenize=False)` renders it
(`template.TemplateRenderer`), and tokenized once, as `tokenizer(text, add_special_tokens=False)` does. The trained
tokens are found from the template itself, never from a re-implementation of it: for each trained assistant message
`i`, `messages[:i]` rendered with the generation prompt (P_i) and `messages[:i+1]` rendered without it (R_i) must both
be prefixes of the whole rendering, and the completion is `R_i[len(P_i):]` through its last end-of-turn token
(`<|im_end|>` for ChatML templates). Character spans become token spans through the tokenizer's offsets; a span edge
inside a token, or trained tokens that do not decode to exactly the span's text, make the row a `BadRow` — a row is
dropped rather than trained with a wrong mask.

One rendering a row: for the packaged text templates whose prefix renderings are the whole rendering's prefixes
(`PREFIX_STABLE_TEMPLATES`, proven on generated conversations by tests/test_render_markers.py), P_i is the whole
rendering up to the i-th `<|im_start|>assistant\n` and R_i runs to the next `<|im_end|>`: the same spans without
rendering every prefix (the prefix renderings were ~70% of the time). A row whose assistant turns hold `<|im_` in
their own text, or whose rendering holds more assistant markers than it has assistant messages, and every other
template, take the prefix renderings.

BadRow reasons: those of `turns.check_turns`, template_error (the template itself raised on the row),
mask_verification_failed; the length ones come from `fit`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import BadRow, QwentuneError
from .template import CHATML_END, ChatTemplate, TemplateRenderer, end_token, load_template
from .turns import Turns, check_train_on, check_turns

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Rendered:
    """One rendered conversation. `trained_spans` are [start, end) token ranges whose labels equal the ids.
    After `fit.fit_row(..., "truncate")`, `truncated` is True and `text` is still the whole rendering."""

    input_ids: list[int]
    labels: list[int]
    text: str
    trained_spans: list[tuple[int, int]]
    truncated: bool = False

    @property
    def num_trained(self) -> int:
        return sum(end - start for start, end in self.trained_spans)


@dataclass(frozen=True)
class RenderedPair:
    """A preference pair: the prompt through the generation prompt, and each completion through its end token."""

    prompt_input_ids: list[int]
    chosen_input_ids: list[int]
    rejected_input_ids: list[int]
    prompt_text: str
    chosen_text: str
    rejected_text: str


# ----------------------------------------------------------------------------------------------------------------
# Rendering


# The packaged ChatML text templates whose every prefix rendering (with or without the generation prompt) is a prefix
# of the whole rendering, so markers in one rendering give the prefix method's spans (tests/test_render_markers.py).
PREFIX_STABLE_TEMPLATES = ("qwen2.5-instruct", "qwen2.5-base", "qwen2-instruct")
_ASSISTANT = "<|im_start|>assistant\n"


@functools.cache
def _prefix_stable_texts() -> frozenset[str]:
    return frozenset(load_template(name).text for name in PREFIX_STABLE_TEMPLATES)


def one_rendering(template: ChatTemplate) -> bool:
    """Whether rows of this template take one rendering each (spans from its markers) instead of one per prefix."""
    return template.text in _prefix_stable_texts()


def _spans_from_markers(msgs: list[dict], trained: list[int], full: str) -> list[tuple[int, int]] | None:
    """The trained spans read from the whole rendering's markers, or None where the row's own text could hold one: an
    assistant turn's text holding `<|im_` (it could end the span early), or more assistant markers than assistant
    messages (the template writes one each; text elsewhere can only add some)."""
    if any(msg.get("role") == "assistant" and _holds_marker(msg) for msg in msgs):
        return None
    starts, pos = {}, 0
    for i, msg in enumerate(msgs):
        if msg.get("role") == "assistant":
            pos = full.find(_ASSISTANT, pos)
            if pos < 0:
                return None
            pos += len(_ASSISTANT)
            starts[i] = pos
    if full.find(_ASSISTANT, pos) >= 0:
        return None
    spans = []
    for i in trained:
        stop = full.find(CHATML_END, starts[i])
        if stop < 0:
            return None
        spans.append((starts[i], stop + len(CHATML_END)))
    return spans


def _holds_marker(value: Any) -> bool:
    if isinstance(value, str):
        return "<|im_" in value
    if isinstance(value, Mapping):
        return any(_holds_marker(k) or _holds_marker(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_holds_marker(v) for v in value)
    return False


def _render_spans(
    prep: Turns, render: TemplateRenderer, end: str, markers: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendering and the character span of each trained completion: from the markers of one rendering
    (`markers`: a prefix-stable template), else from prefix renderings."""
    msgs, tools = prep.messages, prep.tools
    try:
        with render.row():
            if markers:
                full = render(msgs, tools, False)
                spans = _spans_from_markers(msgs, prep.trained, full)
                if spans is not None:
                    return full, spans
                return _spans_from_prefixes(msgs, tools, prep.trained, render, end, full)
            return _spans_from_prefixes(msgs, tools, prep.trained, render, end)
    except BadRow:
        raise
    except Exception as exc:  # jinja's TemplateError, or a template tripping over unusual data
        raise BadRow("template_error", f"the chat template failed on this row: {type(exc).__name__}: {exc}") from None


def _spans_from_prefixes(
    msgs: list[dict],
    tools: list[dict] | None,
    trained: list[int],
    render: TemplateRenderer,
    end: str,
    full: str | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    full = render(msgs, tools, False) if full is None else full  # the whole rendering, unless already made
    spans: list[tuple[int, int]] = []
    for i in trained:
        prompt = render(msgs[:i], tools, True)  # P_i: what the model sees before it writes turn i
        through = full if i == len(msgs) - 1 else render(msgs[: i + 1], tools, False)  # R_i
        if not through.startswith(prompt):
            raise BadRow(
                "mask_verification_failed",
                f"message {i}: the template renders the turn's prompt (with the generation prompt) differently "
                "from the turn itself",
            )
        if not full.startswith(through):
            raise BadRow(
                "mask_verification_failed",
                f"message {i}: the template renders the conversation through this turn differently when later "
                "messages follow",
            )
        cut = through.rfind(end, len(prompt))
        if cut < 0:
            raise BadRow("mask_verification_failed", f"message {i}: the rendered turn has no {end}")
        start, stop = len(prompt), cut + len(end)
        if spans and start < spans[-1][1]:
            raise BadRow("mask_verification_failed", f"message {i}: the turn overlaps the previous trained turn")
        spans.append((start, stop))
    return full, spans


def _tokenize(tokenizer: Any, texts: list[str]) -> list[Any]:
    """The Rust encodings of `tokenizer(texts, add_special_tokens=False)`: one batched call."""
    if not getattr(tokenizer, "is_fast", False):
        raise QwentuneError("exact loss masks need a fast tokenizer (tokenizer.json)", where="tokenizer")
    if not texts:
        return []
    batch = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)
    return batch.encodings


def _token_span(enc: Any, n_chars: int, start: int, stop: int) -> tuple[int, int] | None:
    """The token range covering chars [start, stop) exactly, or None when an edge falls inside a token."""
    a = enc.char_to_token(start)
    if a is None or enc.token_to_chars(a)[0] != start:
        return None
    if stop >= n_chars:
        return a, len(enc.ids)
    b = enc.char_to_token(stop)
    if b is None or enc.token_to_chars(b)[0] != stop:
        return None
    return a, b


class _Decoder:
    """Decodes token ranges to text, batched, and says what text a range must decode to."""

    def __init__(self, tokenizer: Any):
        self.backend = tokenizer.backend_tokenizer
        self.normalizer = self.backend.normalizer

    def expected(self, text: str) -> str:
        return self.normalizer.normalize_str(text) if self.normalizer is not None else text

    def decode(self, pieces: list[list[int]]) -> list[str]:
        return self.backend.decode_batch(pieces, skip_special_tokens=False) if pieces else []


_CHUNK_ROWS = 64  # rows per tokenizer call: the next chunk renders while the last one tokenizes


class _Tokenizing:
    """Tokenizes the rendered texts in chunks on a worker thread while the caller renders the next rows (the Rust
    tokenizer releases the GIL). A batch that fits in one chunk is tokenized in the caller's thread."""

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "is_fast", False):
            raise QwentuneError("exact loss masks need a fast tokenizer (tokenizer.json)", where="tokenizer")
        self.tokenizer = tokenizer
        self.texts: list[str] = []
        self.sent = 0
        self.parts: list[Any] = []
        self.pool: ThreadPoolExecutor | None = None

    def add(self, text: str) -> int:
        self.texts.append(text)
        if len(self.texts) - self.sent >= _CHUNK_ROWS:
            self._send()
        return len(self.texts) - 1

    def _send(self) -> None:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="qwentune-tokenize")
        self.parts.append(self.pool.submit(_tokenize, self.tokenizer, self.texts[self.sent :]))
        self.sent = len(self.texts)

    def encodings(self) -> list[Any]:
        if self.sent < len(self.texts):
            if self.pool is None:
                return _tokenize(self.tokenizer, self.texts)
            self._send()
        return [enc for part in self.parts for enc in part.result()]

    def __enter__(self) -> _Tokenizing:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def check_size(text: str, max_bytes: int | None, reason: str = "over_length", what: str = "the row") -> None:
    """BadRow `reason` when `text` is over `max_bytes` UTF-8 bytes (`fit.length_bound`: surely over max_length
    tokens), decided without tokenizing it. Such a row is not truncated either: cutting it exactly would mean
    tokenizing all of it."""
    if max_bytes is None or len(text) * 4 <= max_bytes:  # at most 4 bytes a character
        return
    size, unit = (len(text), "characters") if len(text) > max_bytes else (len(text.encode()), "bytes")
    if size > max_bytes:
        raise BadRow(
            reason,
            f"{what} renders to {size:,} {unit}, over the {max_bytes:,} bytes that max_length tokens can cover at "
            "most: not tokenized, and never truncated (cut it shorter before training)",
        )


def render_batch(
    rows: Sequence[Mapping],
    tokenizer: Any,
    template: ChatTemplate,
    *,
    train_on: str = "all",
    max_bytes: int | None = None,
) -> list[Rendered | BadRow]:
    """Render rows ({"messages": [...], "tools": [...] | None}) with exact masks, in order. The template renders each
    row; the texts are tokenized in a few batched calls (overlapping the rendering). A row that cannot be trained on
    exactly comes back as its BadRow; one whose rendering is over `max_bytes` as over_length, untokenized."""
    check_train_on(train_on)
    render = TemplateRenderer(template, tokenizer)
    end = end_token(template, tokenizer)
    markers = one_rendering(template)
    results: list[Any] = []  # a BadRow, or (text index, char spans)
    with _Tokenizing(tokenizer) as tokenizing:
        for row in rows:
            try:
                if not isinstance(row, Mapping):
                    raise BadRow("bad_message", f"a row must be an object with 'messages', got {type(row).__name__}")
                prep = check_turns(row.get("messages"), row.get("tools"), template, train_on)
                full, spans = _render_spans(prep, render, end, markers)
                check_size(full, max_bytes)
            except BadRow as bad:
                results.append(bad)
                continue
            results.append((tokenizing.add(full), spans))
        encodings = tokenizing.encodings()
    texts = tokenizing.texts
    decoder = _Decoder(tokenizer)
    pieces: list[list[int]] = []  # every trained token range, decoded in one call below
    staged: list[Any] = []
    for res in results:
        if isinstance(res, BadRow):
            staged.append(res)
            continue
        k, spans = res
        enc, text = encodings[k], texts[k]
        token_spans = []
        for start, stop in spans:
            span = _token_span(enc, len(text), start, stop)
            if span is None:
                where = text[max(0, start - 12) : start + 12]
                staged.append(
                    BadRow("mask_verification_failed", f"a trained turn's edge falls inside a token (near {where!r})")
                )
                break
            token_spans.append(span)
        else:
            ids = enc.ids
            staged.append((ids, token_spans, len(pieces)))
            pieces.extend(ids[a:b] for a, b in token_spans)
    decoded = decoder.decode(pieces)
    out: list[Rendered | BadRow] = []
    for item, res in zip(staged, results):
        if isinstance(item, BadRow):
            out.append(item)
            continue
        ids, token_spans, first = item
        text, spans = texts[res[0]], res[1]
        labels = [IGNORE_INDEX] * len(ids)
        bad = None
        for j, ((a, b), (start, stop)) in enumerate(zip(token_spans, spans)):
            if decoded[first + j] != decoder.expected(text[start:stop]):
                bad = BadRow(
                    "mask_verification_failed",
                    f"trained tokens decode to {decoded[first + j]!r}, not to the rendered turn {text[start:stop]!r}",
                )
                break
            labels[a:b] = ids[a:b]
        out.append(bad or Rendered(ids, labels, text, token_spans))
    return out


def render_conversation(
    messages: Sequence[Mapping],
    tools: Sequence[Mapping] | None,
    tokenizer: Any,
    template: ChatTemplate,
    *,
    train_on: str = "all",
) -> Rendered:
    """Render one conversation with exact masks; raises BadRow when it cannot be trained on exactly."""
    (result,) = render_batch([{"messages": messages, "tools": tools}], tokenizer, template, train_on=train_on)
    if isinstance(result, BadRow):
        raise result
    return result


# ----------------------------------------------------------------------------------------------------------------
# Preference pairs


def _as_messages(value: Any) -> Any:
    return [value] if isinstance(value, Mapping) else value


def render_preference_batch(
    pairs: Sequence[Mapping], tokenizer: Any, template: ChatTemplate, *, max_bytes: int | None = None
) -> list[RenderedPair | BadRow]:
    """Render rows {"prompt": [...], "chosen": [assistant message], "rejected": [assistant message], "tools": ...};
    see `render_preference`. A pair that cannot be rendered exactly comes back as its BadRow; one whose prompt or
    completion renders over `max_bytes` as prompt_over_length / over_length, untokenized."""
    render = TemplateRenderer(template, tokenizer)
    end = end_token(template, tokenizer)
    results: list[Any] = []  # a BadRow, or (prompt text index, [(text index, char span) for chosen, rejected])
    with _Tokenizing(tokenizer) as tokenizing:
        for pair in pairs:
            try:
                results.append(_render_pair(pair, template, render, end, tokenizing, max_bytes))
            except BadRow as bad:
                results.append(bad)
        encodings = tokenizing.encodings()
    texts = tokenizing.texts
    staged: list[Any] = []
    pieces: list[list[int]] = []
    for res in results:
        if isinstance(res, BadRow):
            staged.append(res)
            continue
        k, sides = res
        prompt_ids = encodings[k].ids
        spans = []
        for j, (start, stop) in sides:
            span = _token_span(encodings[j], len(texts[j]), start, stop)
            if span is None:
                spans = BadRow("mask_verification_failed", "the completion's first token starts inside the prompt")
                break
            if encodings[j].ids[: span[0]] != prompt_ids:
                spans = BadRow(
                    "mask_verification_failed", "the prompt tokenizes differently alone and followed by its completion"
                )
                break
            spans.append(span)
        if isinstance(spans, BadRow):
            staged.append(spans)
            continue
        staged.append((prompt_ids, spans, len(pieces)))
        pieces.extend(encodings[j].ids[a:b] for (j, _), (a, b) in zip(sides, spans))
    decoder = _Decoder(tokenizer)
    decoded = decoder.decode(pieces)
    out: list[RenderedPair | BadRow] = []
    for item, res in zip(staged, results):
        if isinstance(item, BadRow):
            out.append(item)
            continue
        prompt_ids, _, first = item
        completions = []
        for n, (j, (start, stop)) in enumerate(res[1]):
            text = texts[j][start:stop]
            if decoded[first + n] != decoder.expected(text):
                completions = None
                break
            completions.append((pieces[first + n], text))
        if completions is None:
            out.append(BadRow("mask_verification_failed", "completion tokens do not decode to its rendering"))
            continue
        (chosen, chosen_text), (rejected, rejected_text) = completions
        out.append(RenderedPair(prompt_ids, chosen, rejected, texts[res[0]], chosen_text, rejected_text))
    return out


def _render_pair(
    pair: Any,
    template: ChatTemplate,
    render: TemplateRenderer,
    end: str,
    tokenizing: _Tokenizing,
    max_bytes: int | None = None,
) -> tuple:
    if not isinstance(pair, Mapping):
        raise BadRow("bad_message", f"a preference row must be an object, got {type(pair).__name__}")
    prompt, tools = _as_messages(pair.get("prompt")) or [], pair.get("tools")
    if not prompt:
        raise BadRow("empty", "the prompt has no messages")
    sides = []
    for key in ("chosen", "rejected"):
        completion = _as_messages(pair.get(key))
        if not completion:
            raise BadRow("empty_completion", f"the {key} completion is empty")
        if len(completion) != 1 or not isinstance(completion[0], Mapping) or completion[0].get("role") != "assistant":
            raise BadRow("bad_role_order", f"the {key} completion must be exactly one assistant message")
        prep = check_turns([*prompt, *completion], tools, template, "last", ignore_train_flags=True)
        full, ((start, stop),) = _render_spans(prep, render, end)
        sides.append((full, (start, stop)))
    (chosen_full, (prompt_end, _)), (rejected_full, (rejected_start, _)) = sides
    if rejected_full[:rejected_start] != chosen_full[:prompt_end]:
        raise BadRow("mask_verification_failed", "the prompt renders differently before chosen and before rejected")
    check_size(chosen_full[:prompt_end], max_bytes, "prompt_over_length", "the prompt")
    for full, _ in sides:
        check_size(full, max_bytes, "over_length", "the prompt and a completion")
    prompt_index = tokenizing.add(chosen_full[:prompt_end])
    return prompt_index, [(tokenizing.add(full), span) for full, span in sides]


def render_preference(
    prompt_messages: Sequence[Mapping],
    chosen_messages: Sequence[Mapping] | Mapping,
    rejected_messages: Sequence[Mapping] | Mapping,
    tools: Sequence[Mapping] | None,
    tokenizer: Any,
    template: ChatTemplate,
) -> RenderedPair:
    """`prompt_input_ids` == the tokenized official rendering of the prompt with the generation prompt;
    `chosen_input_ids` / `rejected_input_ids` == the completion's tokens through its end token (nothing after).
    Each completion is one assistant message. Raises BadRow when the pair cannot be rendered exactly."""
    pair = {"prompt": prompt_messages, "chosen": chosen_messages, "rejected": rejected_messages, "tools": tools}
    (result,) = render_preference_batch([pair], tokenizer, template)
    if isinstance(result, BadRow):
        raise result
    return result


__all__ = [
    "IGNORE_INDEX",
    "PREFIX_STABLE_TEMPLATES",
    "Rendered",
    "RenderedPair",
    "one_rendering",
    "render_batch",
    "render_conversation",
    "render_preference",
    "render_preference_batch",
]
