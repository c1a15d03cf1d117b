"""Chat templates (the packaged official ones) and rendering with exact loss masks.

A conversation is rendered by the official jinja template exactly as `tokenizer.apply_chat_template(...,
tokenize=False)` renders it, and tokenized once, as `tokenizer(text, add_special_tokens=False)` does. The trained
tokens are found from the template itself, never from a re-implementation of it: for each trained assistant message
`i`, `messages[:i]` rendered with the generation prompt (P_i) and `messages[:i+1]` rendered without it (R_i) must both
be prefixes of the whole rendering, and the completion is `R_i[len(P_i):]` through its last end-of-turn token
(`<|im_end|>` for ChatML templates). Character spans become token spans through the tokenizer's offsets; a span edge
inside a token, or trained tokens that do not decode to exactly the span's text, make the row a `BadRow` — a row is
dropped rather than trained with a wrong mask.

BadRow reasons: empty, no_assistant_turn, bad_role_order, bad_message (a message that is not a message: content not a
string/list, a non-bool `train`, tool_calls outside an assistant turn), invalid_tool_json, tools_unsupported,
empty_completion, template_error (the template itself raised on the row), mask_verification_failed; over_length
from `fit_length`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from qwentune.errors import BadRow, QwentuneError, did_you_mean

BUILTIN_TEMPLATES = ("qwen2.5-instruct", "qwen2.5-base", "qwen2-instruct", "qwen2-vl-instruct")
TRAIN_ON = ("all", "last")
OVERLONG = ("drop", "truncate", "error")
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
CHATML_END = "<|im_end|>"


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template: `name` is the builtin name, "model" or the file path; `text` is the jinja source."""

    name: str
    text: str
    supports_tools: bool


@dataclass(frozen=True)
class Rendered:
    """One rendered conversation. `trained_spans` are [start, end) token ranges whose labels equal the ids.
    After `fit_length(..., "truncate")`, `truncated` is True and `text` is still the whole rendering."""

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
# Template registry


def load_template(spec: str, tokenizer: Any = None) -> ChatTemplate:
    """'model' (the tokenizer's own template), a builtin name (see BUILTIN_TEMPLATES), or a path to a .jinja file
    (or to a tokenizer_config.json / chat_template.json holding a `chat_template`)."""
    if spec == "model":
        if tokenizer is None:
            raise QwentuneError("chat template 'model' needs the model's tokenizer", where="chat_template")
        text = tokenizer.chat_template
        if isinstance(text, dict):
            if "default" not in text:
                raise QwentuneError(
                    f"the tokenizer has several chat templates ({', '.join(sorted(text))}) and none is 'default'",
                    where="chat_template",
                    hint=f"set chat_template to one of {', '.join(BUILTIN_TEMPLATES)} or to a .jinja file",
                )
            text = text["default"]
        if not text:
            raise QwentuneError(
                "the model's tokenizer has no chat template",
                where="chat_template",
                hint=f"set chat_template to one of {', '.join(BUILTIN_TEMPLATES)} or to a .jinja file",
            )
        return _make_template("model", text)
    if spec in BUILTIN_TEMPLATES:
        text = resources.files("qwentune").joinpath("templates", f"{spec}.jinja").read_bytes().decode("utf-8")
        return _make_template(spec, text)
    path = Path(spec).expanduser()
    if path.is_file():
        return _make_template(spec, _read_template_file(path))
    if path.suffix in (".jinja", ".j2", ".json") or "/" in spec or "\\" in spec:
        raise QwentuneError(f"chat template file not found: {spec}", where="chat_template")
    raise QwentuneError(
        f"unknown chat template '{spec}'",
        where="chat_template",
        hint=did_you_mean(spec, (*BUILTIN_TEMPLATES, "model"))
        or f"use one of {', '.join(BUILTIN_TEMPLATES)}, 'model', or a path to a .jinja file",
    )


def _read_template_file(path: Path) -> str:
    try:
        raw = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QwentuneError(f"cannot read chat template: {exc}", where=str(path)) from exc
    if path.suffix != ".json":
        return raw
    try:
        text = json.loads(raw).get("chat_template")
    except (ValueError, AttributeError) as exc:
        raise QwentuneError(f"not a JSON object: {exc}", where=str(path)) from exc
    if not isinstance(text, str) or not text:
        raise QwentuneError("no 'chat_template' string in this file", where=str(path), hint="pass a .jinja file")
    return text


def _make_template(name: str, text: str) -> ChatTemplate:
    return ChatTemplate(name=name, text=text, supports_tools="tools" in _template_variables(text))


def _template_variables(text: str) -> frozenset[str]:
    """The variables a template reads (as transformers finds them)."""
    try:
        from transformers.utils.chat_template_utils import _get_template_variables
    except ImportError:  # transformers moved its private helper: parse the template ourselves
        _get_template_variables = None
    try:
        if _get_template_variables is not None:
            return _get_template_variables(text)
        import jinja2
        import jinja2.meta

        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
        return frozenset(jinja2.meta.find_undeclared_variables(env.parse(text)))
    except Exception as exc:  # a template that does not even parse
        raise QwentuneError(f"the chat template does not parse: {exc}", where="chat_template") from exc


def _compile(text: str) -> Any:
    """The template compiled in the jinja environment transformers renders chat templates with (cached there)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(text)


@functools.lru_cache(maxsize=16)
def _compile_fast(text: str) -> Any:
    """Our own copy of the template, compiled by transformers into its sandboxed chat-template environment, whose
    attribute lookup takes a shortcut for plain dicts and loop variables. The shortcut returns what the sandbox's
    `getattr` returns for them (an attribute lookup on a plain dict fails unless it names a dict method, so jinja falls
    back to the item; loop attributes without a leading underscore are safe), and renders about twice as fast:
    `message.role` no longer raises and catches an AttributeError. Anything else takes the sandbox's own path.
    Its `tojson` filter remembers, while one row renders (see `_Renderer.row`), what it wrote for each object: the
    tools and call arguments are the same objects in every prefix rendering of a row, and the sandbox can't mutate
    them, so each is serialized once per row instead of once per rendering."""
    from jinja2.runtime import LoopContext
    from transformers.utils.chat_template_utils import _cached_compile_jinja_template

    compiled = _cached_compile_jinja_template(text)
    env = compiled.environment
    sandbox_getattr = env.getattr

    def getattr_(obj: Any, attribute: str) -> Any:
        kind = type(obj)
        if kind is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                return env.undefined(obj=obj, name=attribute)
        if kind is LoopContext and not attribute.startswith("_"):
            try:
                return getattr(obj, attribute)
            except AttributeError:
                pass
        return sandbox_getattr(obj, attribute)

    env.getattr = getattr_
    transformers_tojson = env.filters["tojson"]

    def tojson(obj: Any, *args: Any, **kwargs: Any) -> str:
        memo = getattr(_ROW_MEMO, "tojson", None)
        if memo is None or args or kwargs:
            return transformers_tojson(obj, *args, **kwargs)
        hit = memo.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
        text = transformers_tojson(obj)
        memo[id(obj)] = (obj, text)  # holding obj keeps its id from being reused within the row
        return text

    env.filters["tojson"] = tojson
    return compiled


_DICT_ATTRIBUTES = frozenset(dir(dict))
_ROW_MEMO = threading.local()


class _Renderer:
    """Renders exactly as `tokenizer.apply_chat_template(..., tokenize=False)` does: the template compiled by
    transformers, the same variables (messages, tools, documents=None, add_generation_prompt, the special tokens),
    without the per-call overhead. Messages reach it already plain (JSON types only) with None-valued keys dropped,
    as transformers does. If transformers' private compile helpers move, it falls back to apply_chat_template."""

    def __init__(self, template: ChatTemplate, tokenizer: Any):
        self.text = template.text
        self.tokenizer = tokenizer
        try:
            self.compiled = _compile_fast(template.text)
        except ImportError:
            try:
                self.compiled = _compile(template.text)
            except ImportError:
                self.compiled = None
        self.kwargs = {k: v for k, v in dict(tokenizer.special_tokens_map).items() if isinstance(v, str)}

    @contextlib.contextmanager
    def row(self) -> Iterator[None]:
        """Scope in which the renderings all belong to one row (lets `tojson` reuse its output)."""
        _ROW_MEMO.tojson = {}
        try:
            yield
        finally:
            _ROW_MEMO.tojson = None

    def __call__(self, messages: list[dict], tools: list[dict] | None, generation_prompt: bool) -> str:
        if self.compiled is None:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=self.text,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        return self.compiled.render(
            messages=messages, tools=tools, documents=None, add_generation_prompt=generation_prompt, **self.kwargs
        )


def _end_token(template: ChatTemplate, tokenizer: Any) -> str:
    """The token that closes an assistant turn: ChatML's <|im_end|>, else the tokenizer's eos."""
    if CHATML_END in template.text:
        return CHATML_END
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise QwentuneError(
            "cannot tell how this chat template ends an assistant turn: it has no <|im_end|> and the tokenizer no eos",
            where=f"chat_template {template.name}",
        )
    return str(eos)


# ----------------------------------------------------------------------------------------------------------------
# Row checks


@dataclass
class _Prepared:
    messages: list[dict]  # what the template sees
    tools: list[dict] | None
    trained: list[int]  # indices of the assistant messages to train, ascending


def _parse_json(value: Any, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise BadRow("invalid_tool_json", f"{what} is not valid JSON: {exc}") from None


def _normalize_tools(tools: Any) -> list[dict] | None:
    tools = _parse_json(tools, "tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise BadRow("invalid_tool_json", f"tools must be a list of JSON objects, got {type(tools).__name__}")
    out = []
    for k, tool in enumerate(tools):
        tool = _parse_json(tool, f"tools[{k}]")
        if not isinstance(tool, dict):
            raise BadRow("invalid_tool_json", f"tools[{k}] is not a JSON object")
        out.append(tool)
    return out or None


def _normalize_tool_call(call: Any, where: str) -> dict:
    call = _parse_json(call, where)
    if not isinstance(call, dict):
        raise BadRow("invalid_tool_json", f"{where} is not a JSON object")
    nested = isinstance(call.get("function"), dict)
    fn = call["function"] if nested else call
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise BadRow("invalid_tool_json", f"{where} has no function name")
    if fn.get("arguments") is None:
        raise BadRow("invalid_tool_json", f"{where} ({name}) has no arguments (use {{}} for a call without any)")
    args = _parse_json(fn["arguments"], f"{where} ({name}) arguments")
    if not isinstance(args, dict):
        raise BadRow("invalid_tool_json", f"{where} ({name}) arguments are not a JSON object")
    fn = {**fn, "arguments": args}
    return {**call, "function": fn} if nested else fn


def _is_empty(content: Any) -> bool:
    return content is None or (isinstance(content, (str, list)) and len(content) == 0)


def _prepare(
    messages: Any, tools: Any, template: ChatTemplate, train_on: str, *, ignore_train_flags: bool = False
) -> _Prepared:
    if not messages:
        raise BadRow("empty", "the row has no messages")
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise BadRow("bad_message", f"messages must be a list, got {type(messages).__name__}")
    tools = _normalize_tools(tools)
    if tools and not template.supports_tools:
        raise BadRow("tools_unsupported", f"the row has tools but chat template {template.name} has no tool support")
    out: list[dict] = []
    assistants: list[int] = []
    trainable: list[int] = []
    prev_role: str | None = None
    prev_called = False  # the previous message was an assistant tool call, or a tool result after one
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise BadRow("bad_message", f"message {i} is not an object")
        role = msg.get("role")
        if role not in ROLES:
            raise BadRow("bad_role_order", f"message {i} has unknown role {role!r} (expected {', '.join(ROLES)})")
        if role == "system" and i != 0:
            raise BadRow("bad_role_order", f"message {i} is a system message; only the first message may be one")
        if role != "system" and prev_role in (None, "system") and role != "user":
            raise BadRow("bad_role_order", f"message {i} is the first non-system message and is {role}, not user")
        if role == "assistant" and prev_role == "assistant":
            raise BadRow("bad_role_order", f"messages {i - 1} and {i} are both assistant turns")
        if role == "tool" and not prev_called:
            raise BadRow("bad_role_order", f"message {i} is a tool result without a preceding assistant tool call")
        content = msg.get("content")
        if not (content is None or isinstance(content, (str, list))):
            raise BadRow("bad_message", f"message {i} ({role}) content is {type(content).__name__}, not a string")
        clean = {k: v for k, v in msg.items() if v is not None and k != "train"}
        calls = msg.get("tool_calls")
        if calls is not None and role != "assistant":
            raise BadRow("bad_message", f"message {i} ({role}) has tool_calls; only assistant messages may")
        if calls is not None and not isinstance(calls, list):
            raise BadRow("invalid_tool_json", f"message {i} tool_calls is not a list")
        if calls:
            if not template.supports_tools:
                raise BadRow(
                    "tools_unsupported",
                    f"message {i} calls tools but chat template {template.name} has no tool support",
                )
            clean["tool_calls"] = [_normalize_tool_call(c, f"message {i} tool call {k}") for k, c in enumerate(calls)]
        if role == "tool" and not template.supports_tools:
            raise BadRow(
                "tools_unsupported",
                f"message {i} is a tool result but chat template {template.name} has no tool support",
            )
        if role in ("system", "user", "tool") and content is None:
            raise BadRow("bad_message", f"message {i} ({role}) has no content")
        if role == "assistant":
            if _is_empty(content) and not calls:
                raise BadRow("empty_completion", f"message {i} is an assistant turn with no content and no tool calls")
            train = msg.get("train", True)
            if not isinstance(train, bool):
                raise BadRow("bad_message", f"message {i} 'train' must be true or false, got {train!r}")
            assistants.append(i)
            if train or ignore_train_flags:
                trainable.append(i)
        out.append(clean)
        prev_called = (role == "assistant" and bool(calls)) or (role == "tool" and prev_called)
        prev_role = role
    if train_on == "last":
        trainable = [i for i in trainable if assistants and i == assistants[-1]]
    if not trainable:
        detail = "no assistant turn" if not assistants else "every assistant turn is excluded from training"
        raise BadRow("no_assistant_turn", detail)
    return _Prepared(_alias_reasoning(out), tools, trainable)


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    """transformers copies a message's reasoning under each name templates read it by (`reasoning_content`,
    `thinking`); do the same so reasoning templates render as with apply_chat_template. A no-op for Qwen2/2.5."""
    if not any(k in m for m in messages for k in _REASONING_FIELDS):
        return messages
    try:
        from transformers.utils.chat_template_utils import _alias_reasoning_fields
    except ImportError:
        return messages
    return _alias_reasoning_fields(messages)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _check_train_on(train_on: str) -> None:
    if train_on not in TRAIN_ON:
        raise QwentuneError(
            f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}",
            where="train_on",
            hint=did_you_mean(str(train_on), TRAIN_ON),
        )


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _render_spans(prep: _Prepared, render: _Renderer, end: str) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendering and the character span of each trained completion, derived from prefix renderings."""
    msgs, tools = prep.messages, prep.tools
    try:
        with render.row():
            return _spans_from_prefixes(msgs, tools, prep.trained, render, end)
    except BadRow:
        raise
    except Exception as exc:  # jinja's TemplateError, or a template tripping over unusual data
        raise BadRow("template_error", f"the chat template failed on this row: {type(exc).__name__}: {exc}") from None


def _spans_from_prefixes(
    msgs: list[dict], tools: list[dict] | None, trained: list[int], render: _Renderer, end: str
) -> tuple[str, list[tuple[int, int]]]:
    full = render(msgs, tools, False)
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


def render_batch(
    rows: Sequence[Mapping], tokenizer: Any, template: ChatTemplate, *, train_on: str = "all"
) -> list[Rendered | BadRow]:
    """Render rows ({"messages": [...], "tools": [...] | None}) with exact masks, in order. The template renders each
    row; the texts are tokenized in a few batched calls (overlapping the rendering). A row that cannot be trained on
    exactly comes back as its BadRow."""
    _check_train_on(train_on)
    render = _Renderer(template, tokenizer)
    end = _end_token(template, tokenizer)
    results: list[Any] = []  # a BadRow, or (text index, char spans)
    with _Tokenizing(tokenizer) as tokenizing:
        for row in rows:
            try:
                if not isinstance(row, Mapping):
                    raise BadRow("bad_message", f"a row must be an object with 'messages', got {type(row).__name__}")
                prep = _prepare(row.get("messages"), row.get("tools"), template, train_on)
                full, spans = _render_spans(prep, render, end)
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
    pairs: Sequence[Mapping], tokenizer: Any, template: ChatTemplate
) -> list[RenderedPair | BadRow]:
    """Render rows {"prompt": [...], "chosen": [assistant message], "rejected": [assistant message], "tools": ...};
    see `render_preference`. A pair that cannot be rendered exactly comes back as its BadRow."""
    render = _Renderer(template, tokenizer)
    end = _end_token(template, tokenizer)
    results: list[Any] = []  # a BadRow, or (prompt text index, [(text index, char span) for chosen, rejected])
    with _Tokenizing(tokenizer) as tokenizing:
        for pair in pairs:
            try:
                results.append(_render_pair(pair, template, render, end, tokenizing))
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


def _render_pair(pair: Any, template: ChatTemplate, render: _Renderer, end: str, tokenizing: _Tokenizing) -> tuple:
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
        prep = _prepare([*prompt, *completion], tools, template, "last", ignore_train_flags=True)
        full, ((start, stop),) = _render_spans(prep, render, end)
        sides.append((full, (start, stop)))
    (chosen_full, (prompt_end, _)), (rejected_full, (rejected_start, _)) = sides
    if rejected_full[:rejected_start] != chosen_full[:prompt_end]:
        raise BadRow("mask_verification_failed", "the prompt renders differently before chosen and before rejected")
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


# ----------------------------------------------------------------------------------------------------------------
# Length


def fit_length(rendered: Rendered, max_length: int, overlong: str) -> Rendered:
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


__all__ = [
    "BUILTIN_TEMPLATES",
    "IGNORE_INDEX",
    "ChatTemplate",
    "Rendered",
    "RenderedPair",
    "fit_length",
    "load_template",
    "render_batch",
    "render_conversation",
    "render_preference",
    "render_preference_batch",
]
