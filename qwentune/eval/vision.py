"""Qwen2-VL rows in `qwentune eval`: loss on exactly the trained tokens, and exact match on short answers.

A row with images is rendered as training renders it: the official template with training's exact masks
(`render.render_batch`), each image's single pad expanded to its token count (`vision.expand_pads`), batched by
training's own collator (`vision.VisionCollator`: pixel values and patch grid from the image processor). So `vl: loss`
is the training loss on those rows. The reply is generated greedily from the prompt (the messages before the first
assistant turn, rendered with the generation prompt like every eval row, its pads expanded as `qwentune chat` does),
one row at a time with the same pixel inputs. When the reference has at most SHORT_WORDS words, the reply is an exact
match if both are equal after normalizing case, surrounding whitespace and a trailing period (`vl: exact`).
A text-only model cannot see images: its image rows are skipped (`images_need_a_vision_model`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadRow
from ..model import load_image_processor
from ..rows import (
    ChatTemplate,
    ImageFile,
    ImageSettings,
    VisionCollator,
    expand_pads,
    expand_prompt,
    image_parts,
    render_batch,
    settings_of,
)

SHORT_WORDS = 8  # a reference of at most this many words is scored by exact match
NEEDS_VISION = "images_need_a_vision_model"


# ---------------------------------------------------------------- exact match on short answers


def normalize_answer(text: str) -> str:
    """A short answer as compared: lower case, without surrounding whitespace or a trailing period."""
    return text.strip().casefold().removesuffix(".").strip()


def is_short(reference: Any) -> bool:
    return isinstance(reference, str) and 0 < len(reference.split()) <= SHORT_WORDS


def score_answer(expected: Any, got: str) -> dict:
    """{"ok", "why"}; ok is None when the reference is not a short answer (the row gets its loss only)."""
    if not is_short(expected):
        return {"ok": None, "why": f"reference over {SHORT_WORDS} words: loss only"}
    if normalize_answer(got) == normalize_answer(expected):
        return {"ok": True, "why": ""}
    return {"ok": False, "why": "a different answer"}


def prompt_text(messages: Sequence[dict]) -> str:
    """The last prompt message as text, each image shown as <image>."""
    content = messages[-1].get("content") if messages else ""
    if not isinstance(content, list):
        return content or ""
    return " ".join("<image>" if "text" not in p else str(p["text"]) for p in content if isinstance(p, dict))


# ---------------------------------------------------------------- the model's image processor


@dataclass
class VisionInputs:
    """What turns a row's images into a Qwen2-VL model's inputs: its image processor and the training collator."""

    settings: ImageSettings
    collator: VisionCollator


def vision_inputs(model_dir: Path, adapter_dir: Path | None, tokenizer: Any) -> VisionInputs:
    """The image processor the model was trained with: the one saved in `model_dir` (a merged model carries the
    recipe's pixel limits), with an adapter's recorded pixel limits (its `qwentune_train.json`) applied."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from ..export import read_train_sidecar  # here: it imports torch (keeps `import qwentune` fast)

    limits = (read_train_sidecar(adapter_dir).get("image_processor") or {}) if adapter_dir is not None else {}
    processor = load_image_processor(model_dir, limits.get("min_pixels"), limits.get("max_pixels"))
    settings = settings_of(processor, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return VisionInputs(
        settings, VisionCollator(DataCollatorForLanguageModeling(pad_token_id=pad), processor, settings)
    )


# ---------------------------------------------------------------- scoring


def training_row(rendered: Any, images: Sequence[ImageFile], settings: ImageSettings) -> dict:
    """A rendered row as training feeds it to the collator: pads expanded, labels = training's masks."""
    counts = [settings.tokens(f.width, f.height) for f in images]
    ids, labels = expand_pads(rendered.input_ids, rendered.labels, counts, settings)
    return {"input_ids": ids, "labels": labels, "image_files": [f.ref for f in images]}


def _on(batch: dict, device: Any) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def vl_logprobs(model: Any, rows: Sequence[dict], inputs: VisionInputs, *, batch_size: int) -> list[tuple[float, int]]:
    """(sum of log p of the labelled tokens, their number) per training row, batched by the training collator."""
    import torch

    from .generate import labelled_logprobs

    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    for start in range(0, len(rows), max(1, batch_size)):
        batch = inputs.collator(list(rows[start : start + max(1, batch_size)]))
        labels = batch.pop("labels")
        with torch.no_grad():
            out += labelled_logprobs(model(**_on(batch, device)).logits, labels)
    return out


def greedy_reply(model: Any, tokenizer: Any, prompt_ids: Sequence[int], images: Sequence[str], inputs: VisionInputs,
                 *, max_new_tokens: int) -> list[int]:  # fmt: skip
    """Greedy continuation (without the stop token) of a rendered prompt holding one pad per image in `images`."""
    import torch

    from .generate import cut_at_stop, greedy_config, stop_token_ids

    ids = expand_prompt(prompt_ids, images, inputs.settings)
    batch = inputs.collator([{"input_ids": ids, "image_files": list(images)}])
    batch.pop("labels")
    with torch.no_grad():
        out = model.generate(
            **_on(batch, next(model.parameters()).device), generation_config=greedy_config(tokenizer, max_new_tokens)
        )
    return cut_at_stop(out[0, len(ids) :].tolist(), stop_token_ids(tokenizer))


def score_vl_rows(model: Any, tokenizer: Any, items: Sequence[Any], prompts: Sequence[Sequence[int]],
                  template: ChatTemplate, inputs: VisionInputs, *, batch_size: int, max_new_tokens: int,
                  train_on: str = "all", label: str = "", progress: bool = True) -> list[dict]:  # fmt: skip
    """One record per image row (`evaluate.Item` of kind vl; `prompts`: their rendered generation prompts): prompt,
    expected, got, verdict, why, and nll/tokens of the trained tokens."""
    from tqdm.auto import tqdm

    records: list[dict] = [{"prompt": prompt_text(it.prompt), "expected": it.expected} for it in items]
    problems: list[list[str]] = [[] for _ in items]
    rows, owners = [], []
    for k, (item, rendered) in enumerate(zip(items, render_batch([it.raw for it in items], tokenizer, template,
                                                                 train_on=train_on))):  # fmt: skip
        try:
            if isinstance(rendered, BadRow):
                raise rendered
            rows.append(training_row(rendered, item.images, inputs.settings))
            owners.append(k)
        except BadRow as bad:
            problems[k].append(f"not rendered: {bad.reason}")
    for k, (logp, n) in zip(owners, vl_logprobs(model, rows, inputs, batch_size=batch_size)):
        records[k].update(nll=-logp, tokens=n)
    for k, item in enumerate(tqdm(items, desc=f"eval {label} (images)", disable=not progress, leave=False)):
        shown = [f.ref for f in item.images[: len(image_parts(item.prompt))]]
        reply = greedy_reply(model, tokenizer, prompts[k], shown, inputs, max_new_tokens=max_new_tokens)
        got = tokenizer.decode(reply, skip_special_tokens=False)
        verdict = score_answer(item.expected, got)
        why = "; ".join(filter(None, [*problems[k], verdict["why"]]))
        records[k].update(got=got, verdict=verdict["ok"], why=why)
    return records


def summarize_vl(records: Sequence[dict]) -> dict[str, dict]:
    """`vl: exact` over the short-answer image rows, `vl: loss` / `vl: perplexity` over the trained tokens."""
    out: dict[str, dict] = {}
    vl = [r for r in records if r["kind"] == "vl"]
    short = [r for r in vl if r.get("verdict") is not None]
    if short:
        out["vl: exact"] = {"correct": sum(bool(r["verdict"]) for r in short), "total": len(short)}
    scored = [r for r in vl if r.get("tokens")]
    if scored:
        nll, tokens = sum(r["nll"] for r in scored), sum(r["tokens"] for r in scored)
        out["vl: loss"] = {"value": nll / tokens, "total": len(scored)}
        out["vl: perplexity"] = {"value": math.exp(min(nll / tokens, 50.0)), "total": len(scored)}
    return out


__all__ = ["NEEDS_VISION", "SHORT_WORDS", "normalize_answer", "score_answer", "score_vl_rows", "summarize_vl"]
