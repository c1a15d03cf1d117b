"""Tests' shorthand: load and wrap a base from a whole recipe, exactly as sft.py / dpo.py do."""

from __future__ import annotations

from pathlib import Path

from qwentune.model.loading import Precision, add_adapter, load_base_model, resolve_precision
from qwentune.model.quantspec import QuantSpec


def base_from_recipe(recipe, path: Path, precision: Precision | None = None):
    precision = precision or resolve_precision(recipe.model, recipe.training)
    quant = QuantSpec.for_peft(recipe.peft)
    return load_base_model(recipe.model, path, precision, quant=quant, train_vision=recipe.peft.train_vision)


def adapter_from_recipe(recipe, model, trainable_token_ids: list[int] | None = None):
    quant = QuantSpec.for_peft(recipe.peft)
    gc = recipe.training.gradient_checkpointing
    return add_adapter(recipe.peft, model, trainable_token_ids, quant=quant, gradient_checkpointing=gc)
