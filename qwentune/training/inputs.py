"""What every job starts from, before any weights load: the resolved model source, its tokenizer, a vision model's
image settings and the rendered data (the same path for `prepare`, `preview`, `preprocess` and training)."""

from __future__ import annotations

from typing import Any, NamedTuple

from ..data import PreparedData, prepare_data
from ..model import ResolvedModel, image_settings, load_tokenizer, resolve_model
from ..recipe import Recipe
from ..rows import ImageSettings


class Inputs(NamedTuple):
    source: ResolvedModel
    tokenizer: Any
    images: ImageSettings | None  # a Qwen2-VL model's image settings; None for text models
    data: PreparedData | None  # None when not asked for


def prepare_inputs(recipe: Recipe, *, data: bool = True, limit: int | None = None, streaming: bool = False) -> Inputs:
    """Resolve the recipe's model source, load its tokenizer and image settings, and (`data`) render its data
    (`streaming`, for training: data.streaming's train rows as a stream, not mapped)."""
    m = recipe.model
    source = resolve_model(m.source, revision=m.revision, trust_remote_code=m.trust_remote_code)
    tokenizer = load_tokenizer(source.path, m)
    images = image_settings(source.path, tokenizer, min_pixels=m.min_pixels, max_pixels=m.max_pixels)
    if not data:
        return Inputs(source, tokenizer, images, None)
    if recipe.method == "grpo":  # prompts, one per expected turn, rendered as eval renders them
        from .grpo_prompts import prepare_prompts

        return Inputs(source, tokenizer, images, prepare_prompts(recipe, tokenizer, limit=limit))
    prepared = prepare_data(
        recipe.data, recipe.method, recipe.base_dir, tokenizer, limit=limit, images=images, streaming=streaming
    )
    return Inputs(source, tokenizer, images, prepared)


__all__ = ["Inputs", "prepare_inputs"]
