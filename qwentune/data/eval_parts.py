"""data.eval with several entries: each entry's eval rows apart, and evaluated apart (`eval_<name>_loss`, as
transformers' Trainer names a dict of eval datasets), besides the loss over every eval row (`eval_loss`)."""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import numpy as np

from .raw import RawRows


def by_entry_parts(ds: datasets.Dataset, raw: RawRows, keep_origin: bool) -> tuple[datasets.Dataset, dict]:
    """The eval rows, and each data.eval entry's rows by a name made of its path (`eval_<name>_loss`)."""
    entry_of = np.asarray([x.source.entry for x in raw.sources], dtype=np.int64)
    batches = ds.select_columns(["_src"]).with_format("arrow").iter(batch_size=8192)  # select()'s order
    entries = entry_of[np.concatenate([b["_src"].to_numpy() for b in batches]).astype(np.int64)]
    drop = [] if keep_origin else ["_src", "_row"]
    names: dict[int, str] = {}
    for x in raw.sources:
        if x.source.entry not in names:
            stem = re.sub(r"\W+", "_", Path(x.source.path).stem if x.source.kind != "hub" else x.source.label)
            name = stem.strip("_").lower() or "eval"
            taken = set(names.values())
            names[x.source.entry] = next(
                f"{name}{n or ''}" for n in range(len(names) + 2) if f"{name}{n or ''}" not in taken
            )
    parts = {names[e]: ds.select(np.flatnonzero(entries == e)).remove_columns(drop) for e in sorted(names)}
    return ds.remove_columns(drop), {name: part for name, part in parts.items() if len(part)}


class EvalPerSource:
    """data.eval with several entries: after each evaluation of all their rows (eval_loss), each entry's rows alone
    (`eval_<name>_loss`, logged at the same step and added to what `evaluate()` returns). Evaluating takes twice as
    long; eval_loss stays the loss over every eval row."""

    def __init__(self, trainer, parts: dict):
        self.trainer, self.parts, self.busy = trainer, parts, False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.busy or not metrics or "eval_loss" not in metrics:
            return
        self.busy = True
        try:
            for name, part in self.parts.items():
                metrics.update(self.trainer.evaluate(eval_dataset=part, metric_key_prefix=f"eval_{name}"))
        finally:
            self.busy = False


def per_source(before: dict | None, after: dict | None, parts: dict) -> dict:
    """{name: {"before": loss, "after": loss}} of each data.eval entry (what was measured: a stopped evaluation, or
    a log row of the combined loss only, gives none)."""
    measured = (("before", before or {}), ("after", after or {}))
    return {name: {when: m[f"eval_{name}_loss"] for when, m in measured if f"eval_{name}_loss" in m} for name in parts}


def eval_callbacks(trainer, parts: dict | None) -> None:
    """Add the EvalPerSource callback to `trainer` when data.eval has several entries (`parts`)."""
    if not parts:
        return
    from transformers import TrainerCallback

    class EvalPerSourceCallback(EvalPerSource, TrainerCallback):
        pass

    trainer.add_callback(EvalPerSourceCallback(trainer, parts))


__all__ = ["EvalPerSource", "by_entry_parts", "eval_callbacks", "per_source"]
