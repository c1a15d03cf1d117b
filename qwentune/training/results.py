"""What a run leaves behind, usable in the next notebook cell: paths and numbers, and the trained model back as
objects (`load`) or as a reply to a conversation (`generate`, rendered with the template it was trained with)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import QwentuneError
from ..serve import Conversation, Generator, Reply, parse_reply


@dataclass
class TrainResult:
    """What a run leaves behind: paths and numbers (returned to notebooks, printed by the CLI)."""

    run_dir: Path
    adapter_dir: Path | None = None
    merged_dir: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    data_reports: list[dict] = field(default_factory=list)
    _loaded: tuple[Any, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def load(self, *, dtype: Any = None) -> tuple[Any, Any]:
        """(model in eval mode, tokenizer with the trained chat template): the merged model when the run merged,
        else the base with the adapter (PEFT, not merged). Loaded once; later calls return the same objects."""
        if self._loaded is None:
            from ..serve import load_for_inference

            if self.merged_dir is None and self.adapter_dir is None:
                raise QwentuneError(
                    "this run saved no model (not the main process?)", where=str(self.run_dir), hint="load it there"
                )
            self._loaded = load_for_inference(self.merged_dir or self.adapter_dir, dtype=dtype)
        return self._loaded

    def generate(
        self,
        messages: str | list[dict],
        tools: list[dict] | None = None,
        *,
        max_new_tokens: int = 256,
        images: list[str] | None = None,
        temperature: float = 0.0,
    ) -> Reply:
        """The model's reply to `messages` (a user message, or OpenAI-style messages), rendered with the training
        template (`tools` passed to it), greedy unless `temperature` > 0. `.text` is the reply, `.tool_calls` its
        parsed `<tool_call>` blocks ({"name", "arguments"}), `.content` the text around them."""
        model, tokenizer = self.load()
        messages = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        conversation = Conversation(tools=tools, images=images)
        for message in messages:
            first_user = message.get("role") == "user" and images and not conversation._images_placed
            if first_user and isinstance(message.get("content"), str):
                conversation.add_user(message["content"])  # the images go with the first user turn, as in chat
            else:
                conversation.messages.append(message)
        model_dir = self.merged_dir or self.adapter_dir
        generate = Generator(
            model, tokenizer, model_dir=model_dir, max_new_tokens=max_new_tokens, temperature=temperature
        )
        return parse_reply(generate(conversation, on_text=lambda _: None))


__all__ = ["TrainResult"]
