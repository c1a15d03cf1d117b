"""`qwentune eval --endpoint URL`: the same rows and the same scoring as in-process eval, asked of an OpenAI-compatible
server (`qwentune serve`, `transformers serve`, llama.cpp's `llama-server --jinja`, vLLM, ...) through the official
`openai` client. Nothing is rendered here: each prompt goes as the chat-completions API wants it (messages + tools),
and the server applies its chat template.

Tool calls are read from the response's `tool_calls`; a server that returns the raw `<tool_call>` blocks as text
instead is parsed on this side with eval's own parser. Each reply records which (`tool_calls_from`: structured | text
| none) and the result's notes count them. Either way the reply is scored as text by `toolscore`: structured calls
are written back as the `<tool_call>` blocks Qwen's template renders.

Every request pins the sampling: temperature 0, top_p 1, max tokens, seed, and top_k 1 / repetition penalty 1.0 (the
hub's Qwen generation configs carry 1.05, which servers apply by default) where the server takes them: as extra
fields (vLLM `repetition_penalty`, llama.cpp `repeat_penalty`), or, for `transformers serve`, which refuses unknown
fields (422), inside its `generation_config` field. The first request finds which; the notes say.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import QwentuneError

URL_PREFIXES = ("http://", "https://")
PINNED = {"top_k": 1, "repetition_penalty": 1.0}  # beside temperature 0, top_p 1, max tokens and seed
EXTRA_FIELDS = {**PINNED, "repeat_penalty": 1.0}  # vLLM / SGLang take repetition_penalty, llama.cpp repeat_penalty
# transformers serve takes only OpenAI's fields plus its own `generation_config` (a JSON string of generate settings)
GENERATION_CONFIG = {"generation_config": json.dumps({**PINNED, "do_sample": False})}
SERVE_HINT = "start one with `qwentune serve MODEL` and pass its URL (it ends in /v1)"


def is_endpoint(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith(URL_PREFIXES)


def _client(url: str, timeout: float):
    try:
        import openai
    except ImportError:
        raise QwentuneError("scoring an endpoint needs the openai client", where=url,
                            hint="pip install 'qwentune[serve]'") from None  # fmt: skip
    # the key: a server started without one takes any; OPENAI_API_KEY where it was started with one
    return openai.OpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY") or "none", max_retries=0,
                         timeout=timeout)  # fmt: skip


def api_error(exc: Exception, url: str) -> QwentuneError:
    """An `openai` client error as one line: no answer, or the status and the server's own words."""
    import openai

    if isinstance(exc, openai.APIConnectionError):  # includes timeouts
        what = "timed out" if isinstance(exc, openai.APITimeoutError) else "does not answer"
        return QwentuneError(f"the endpoint {what} ({exc.__cause__ or exc})", where=url, hint=SERVE_HINT)
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        detail = body.get("detail") or body.get("error") or body.get("message") or exc.message
        if isinstance(detail, dict):
            detail = detail.get("message") or json.dumps(detail)
        hint = {401: "set OPENAI_API_KEY to the server's key", 403: "set OPENAI_API_KEY to the server's key",
                404: "pass the API's base URL, e.g. http://127.0.0.1:8080/v1"}.get(exc.status_code)  # fmt: skip
        if hint is None:
            hint = "the server's log says why" if exc.status_code >= 500 else "check --served-model and the server"
        return QwentuneError(f"the endpoint answered {exc.status_code}: {str(detail).strip()[:300]}", where=url,
                             hint=hint)  # fmt: skip
    return QwentuneError(f"the endpoint's answer is not an OpenAI chat completion: {exc}", where=url)


def openai_messages(messages: list[dict]) -> list[dict]:
    """Canonical messages as the chat-completions API wants them: tool-call arguments as JSON strings, an id per
    call and the matching `tool_call_id` on the tool results that follow (in order; Qwen's templates use neither),
    and none of qwentune's own keys (`train`)."""
    out, open_ids = [], []
    for k, m in enumerate(messages):
        msg: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            calls = []
            for j, call in enumerate(m["tool_calls"]):
                fn = call.get("function", call)
                args = fn.get("arguments")
                args = args if isinstance(args, str) else json.dumps(args if args is not None else {})
                calls.append({"id": f"call_{k}_{j}", "type": "function",
                              "function": {"name": fn.get("name"), "arguments": args}})  # fmt: skip
            msg["tool_calls"], open_ids = calls, [c["id"] for c in calls]
        if m["role"] == "tool":
            msg["tool_call_id"] = open_ids.pop(0) if open_ids else f"call_{k}"
            if m.get("name"):
                msg["name"] = m["name"]
        out.append(msg)
    return out


def reply_text(message: Any) -> tuple[str, str]:
    """(the reply as text, where its calls came from: structured | text | none). Structured calls are written as the
    `<tool_call>` blocks Qwen's template renders, after the content, so the one text scorer scores every reply."""
    content = message.content or ""
    calls = message.tool_calls or []
    if not calls:
        return content, "text" if "<tool_call>" in content else "none"
    blocks = []
    for call in calls:
        fn = call.function
        try:
            args = json.loads(fn.arguments) if fn.arguments else {}
            blocks.append(json.dumps({"name": fn.name, "arguments": args}, ensure_ascii=False))
        except json.JSONDecodeError:  # kept as sent: the scorer says the block is not JSON
            blocks.append(f'{{"name": {json.dumps(fn.name)}, "arguments": {fn.arguments}}}')
    text = "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in blocks)
    return (f"{content.rstrip()}\n{text}" if content.strip() else text), "structured"


@dataclass
class Endpoint:
    """An OpenAI-compatible server and the model it serves, as eval scores it (see the module docstring)."""

    url: str
    model: str
    client: Any = field(repr=False)
    pinning: str | None = None  # how sampling was pinned: "extra fields" or "generation_config"
    sources: Counter = field(default_factory=Counter)  # tool_calls_from → replies
    seconds: float = 0.0  # spent generating
    tokens: int = 0  # reply tokens, as the server counted them
    is_vision: bool = False  # image rows are not sent (every model scores the same rows)

    def complete(self, messages: list[dict], tools: list[dict] | None, *, max_tokens: int, seed: int) -> Any:
        """One greedy chat completion with every sampling setting pinned."""
        import openai

        kwargs = {"model": self.model, "messages": openai_messages(messages), "temperature": 0.0, "top_p": 1.0,
                  "max_tokens": max_tokens, "seed": seed, **({"tools": tools} if tools else {})}  # fmt: skip
        tries = [self.pinning] if self.pinning else ["extra fields", "generation_config"]
        first: Exception | None = None
        for pinning in tries:
            extra = EXTRA_FIELDS if pinning == "extra fields" else GENERATION_CONFIG
            try:
                response = self.client.chat.completions.create(**kwargs, extra_body=extra)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:  # 422: transformers serve
                if len(tries) == 1:
                    raise api_error(exc, self.url) from None
                first = first or exc
                continue
            except openai.OpenAIError as exc:
                raise api_error(first or exc, self.url) from None
            self.pinning = pinning
            return response
        raise api_error(first, self.url) if first else QwentuneError("no answer", where=self.url)

    def generate(self, item: Any, *, max_tokens: int, seed: int) -> dict:
        """The greedy reply to an eval item: {got, tool_calls_from, reply_tokens, finish_reason}."""
        start = time.perf_counter()
        response = self.complete(item.prompt, item.tools, max_tokens=max_tokens, seed=seed)
        self.seconds += time.perf_counter() - start
        if not getattr(response, "choices", None):
            raise QwentuneError(f"the endpoint answered without a choice: {str(response)[:200]}", where=self.url)
        choice = response.choices[0]
        text, source = reply_text(choice.message)
        used = getattr(getattr(response, "usage", None), "completion_tokens", None)
        self.tokens += used or 0
        self.sources[source] += 1
        return {"got": text, "tool_calls_from": source, "reply_tokens": used, "finish_reason": choice.finish_reason}

    def score(self, items: list, score: Callable[[Any, str], dict], *, label: str, max_new_tokens: int, seed: int = 0,
              progress: bool = True) -> list[dict]:  # fmt: skip
        """One record per item, as in-process eval writes them: the generated kinds scored by `score` (eval's
        `_score_generation`); a loss or preference row is not scored (a server gives no log-probs of given tokens)."""
        from tqdm.auto import tqdm

        from .bfcl import BfclCase
        from .decisions import decision_field

        records, bar = [], None
        for it in items:
            record = {"file": it.file, "row": it.row, "turn": it.turn, "kind": it.kind,
                      "prompt": it.prompt[-1].get("content") if it.prompt else "", **decision_field(it)}  # fmt: skip
            if it.kind in ("tool_call", "no_call", "bfcl") or it.sample:
                reply = self.generate(it, max_tokens=max_new_tokens, seed=seed)
                verdict = score(it, reply["got"])
                expected = it.expected.ground_truth if isinstance(it.expected, BfclCase) else it.expected
                record.update(expected=expected, **reply, verdict=verdict.pop("ok"), why=verdict.pop("why"), **verdict)
            else:
                record.update(expected=it.expected if it.kind == "sft" else "chosen", verdict=None,
                              why="not scored over an endpoint (needs the model's log-probs)")  # fmt: skip
            records.append(record)
            if bar is None and self.sources:  # the bar starts once the server answered: a refusal stays one line
                bar = tqdm(total=len(items), initial=len(records), desc=f"eval {label}", disable=not progress)
            elif bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return records

    def note(self, label: str) -> str:
        """One line for the result: what answered, where its tool calls came from, how sampling was pinned."""
        counts = ", ".join(f"{n} {what}" for what, n in sorted(self.sources.items())) or "no replies"
        rate = f", {self.tokens / self.seconds:.1f} reply tokens/s" if self.seconds and self.tokens else ""
        pin = {"extra fields": "top_k/repetition_penalty fields", "generation_config": "generation_config"}
        who = f"endpoint {self.url}" if label == self.url else f"{label}: endpoint {self.url}"
        return (f"{who} model {self.model}; tool calls read from: {counts} (structured = "
                f"the response's tool_calls, text = <tool_call> blocks parsed here); greedy pinned via "
                f"{pin.get(self.pinning or '', 'nothing sent yet')}{rate}")  # fmt: skip


def open_endpoint(url: str, served_model: str | None = None, *, timeout: float = 600.0) -> Endpoint:
    """The endpoint at `url` and the model it is asked for: `served_model`, else the one it lists (`/v1/models`).
    Raises QwentuneError when it does not answer, answers an error, or does not serve the model."""
    client = _client(url, timeout)
    try:
        listed = [m.id for m in client.models.list()]
    except Exception as exc:  # noqa: BLE001 - every client error becomes one line
        raise api_error(exc, url) from None
    if served_model is not None:
        if served_model not in listed:
            shown = ", ".join(listed[:5]) or "none"
            raise QwentuneError(f"the endpoint does not serve a model named {served_model!r} (it lists: {shown})",
                                where=url, hint="--served-model one of the names it lists")  # fmt: skip
        return Endpoint(url, served_model, client)
    if len(listed) != 1:
        shown = ", ".join(listed[:5]) or "none"
        raise QwentuneError(f"the endpoint lists {len(listed)} models ({shown}): which one to score?", where=url,
                            hint="--served-model NAME (served_model= in Python)")  # fmt: skip
    return Endpoint(url, listed[0], client)


__all__ = ["Endpoint", "api_error", "is_endpoint", "open_endpoint", "openai_messages", "reply_text"]
