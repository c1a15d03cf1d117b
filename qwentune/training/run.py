"""A configured run before it trains (`qwentune.setup`): the TRL trainer, model, tokenizer and data as objects, the
run dir held, TRL's internals patched. `Run.train()` trains, saves, merges and reports, then lets go of all that;
so does `Run.close()`, leaving the block of `with qwentune.setup(...) as run:`, or dropping the Run."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import QwentuneError
from ..recipe import Recipe
from .results import TrainResult


class Run:
    """`trainer` is the configured TRL SFTTrainer / DPOTrainer: add callbacks or change what TRL exposes, then
    `train()`. The run dir stays locked and TRL patched (`patches.trl_for_sft` / `trl_for_dpo`) until `train()`
    ends or the Run is closed."""

    def __init__(
        self,
        *,
        recipe: Recipe,
        run_dir: Path,
        trainer: Any,
        model: Any,
        tokenizer: Any,
        data: Any,
        held: contextlib.ExitStack,
        train: Callable[[], TrainResult],
    ):
        self.recipe, self.run_dir, self.trainer = recipe, run_dir, trainer
        self.model, self.tokenizer, self.data = model, tokenizer, data
        self._held: contextlib.ExitStack | None = held
        self._train = train

    def train(self) -> TrainResult:
        """Train, save the adapter, merge, write the reports; then release the run dir and undo the patches. Once the
        adapter is saved the model, optimizer and their states are let go (`run.model` and `run.trainer.model` are
        None): load `result.merged_dir` or `result.adapter_dir` to use the trained model."""
        if self._held is None:
            raise QwentuneError(
                "this run was already trained or closed",
                where=str(self.run_dir),
                hint="call qwentune.setup(...) again for a new run",
            )
        self.model = None  # the trainer holds it while it trains and lets go of it once the adapter is saved
        try:
            return self._train()
        finally:
            self.close()

    def close(self) -> None:
        """Undo the patches and release the run dir without training (idempotent)."""
        held, self._held = self._held, None
        if held is not None:
            held.close()

    @property
    def closed(self) -> bool:
        return self._held is None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: S110 - interpreter shutdown: nothing left to report to
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else "ready to train"
        return f"Run({self.recipe.method}, {self.run_dir}, {type(self.trainer).__name__}, {state})"


__all__ = ["Run"]
