"""Chat templates: the packaged official ones, the model's own or a file, and rendering a conversation to text
exactly as `tokenizer.apply_chat_template(..., tokenize=False)` does."""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import QwentuneError, did_you_mean

BUILTIN_TEMPLATES = ("qwen2.5-instruct", "qwen2.5-base", "qwen2-instruct", "qwen2-vl-instruct")
CHATML_END = "<|im_end|>"


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template: `name` is the builtin name, "model" or the file path; `text` is the jinja source."""

    name: str
    text: str
    supports_tools: bool


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
    back to the item; loop attributes without a leading underscore are safe), and renders faster: `message.role`
    no longer raises and catches an AttributeError. Anything else takes the sandbox's own path.
    Its `tojson` filter remembers, while one row renders (see `TemplateRenderer.row`), what it wrote for each object:
    the tools and call arguments are the same objects in every prefix rendering of a row, and the sandbox can't
    mutate them, so each is serialized once per row instead of once per rendering."""
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


class TemplateRenderer:
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


def end_token(template: ChatTemplate, tokenizer: Any) -> str:
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


__all__ = ["BUILTIN_TEMPLATES", "CHATML_END", "ChatTemplate", "TemplateRenderer", "end_token", "load_template"]
