"""Special tokens the model never learned.

A token whose embedding and output rows were never trained (e.g. `<tool_call>` in Qwen2.5-Coder-0.5B-Instruct: its
output row has cosine > 0.999 with ~2,450 never-used rows and 0.6× the median norm) cannot be produced by LoRA on
the linear layers alone: the model learns the call's JSON but writes another token where `<tool_call>` belongs.
We find such tokens among those the labels train, and make exactly their rows trainable (PEFT trainable tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .recipe import Recipe
from .runinfo import atomic_write_json

# A row is "untrained" when it is one of a cluster of near-identical rows (never-used tokens collapse together
# during pre-training) or far shorter than the typical row.
NEAR_COSINE = 0.99
NEAR_COUNT = 8
NORM_RATIO = 0.5


@dataclass
class RowCheck:
    token_id: int
    token: str
    matrix: str  # "input" | "output"
    norm_ratio: float  # row norm / median row norm of the matrix
    near_rows: int  # other rows with cosine > NEAR_COSINE
    flagged: bool


@dataclass
class TokenCheck:
    """Which special tokens the labels train, how their rows look, and which rows were made trainable."""

    trained_special: list[int] = field(default_factory=list)
    rows: list[RowCheck] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # made trainable
    measure: str = (
        f"flag a row if > {NEAR_COUNT} other rows have cosine > {NEAR_COSINE} with it, "
        f"or its norm < {NORM_RATIO} × the median row norm"
    )

    @property
    def flagged(self) -> list[int]:
        return sorted({r.token_id for r in self.rows if r.flagged})

    def to_dict(self) -> dict:
        return {
            "measure": self.measure,
            "trained_special_tokens": self.trained_special,
            "flagged": self.flagged,
            "made_trainable": self.ids,
            "rows": [r.__dict__ for r in self.rows],
        }

    def summary(self) -> str:
        if not self.trained_special:
            return "no special tokens in the trained labels"
        lines = [f"special tokens in the trained labels: {len(self.trained_special)} ({self.measure})"]
        for r in self.rows:
            mark = "UNTRAINED" if r.flagged else "ok"
            lines.append(
                f"  {r.token!r:>16} id {r.token_id} {r.matrix:6} row: norm {r.norm_ratio:.2f}× median, "
                f"{r.near_rows} near-identical rows → {mark}"
            )
        if self.ids:
            lines.append(f"  made trainable: {self.ids}")
        return "\n".join(lines)


def special_token_ids(tokenizer) -> set[int]:
    """Added and special tokens (`<|im_end|>`, `<tool_call>`, …): the ones whose rows may never have been trained."""
    return {int(i) for i in tokenizer.added_tokens_decoder}


def trained_special_tokens(dataset, specials: set[int]) -> list[int]:
    seen: set[int] = set()
    for labels in dataset["labels"] if "labels" in dataset.column_names else _dpo_completions(dataset):
        seen.update(t for t in labels if t in specials)
    return sorted(seen)


def _dpo_completions(dataset):
    for column in ("chosen_input_ids", "rejected_input_ids"):
        if column in dataset.column_names:
            yield from dataset[column]


@torch.no_grad()
def check_rows(matrix: torch.Tensor, token_ids: list[int], name: str, tokenizer) -> list[RowCheck]:
    weight = matrix.detach().float()
    norms = weight.norm(dim=1)
    median = norms.median().clamp(min=1e-12)
    unit = weight / norms.clamp(min=1e-12)[:, None]
    checks = []
    for tid in token_ids:
        cos = unit @ unit[tid]
        near = int((cos > NEAR_COSINE).sum().item()) - 1  # minus itself
        ratio = float(norms[tid] / median)
        flagged = near > NEAR_COUNT or ratio < NORM_RATIO
        checks.append(RowCheck(tid, tokenizer.convert_ids_to_tokens(tid), name, round(ratio, 3), near, flagged))
    return checks


def _output_matrix(model) -> torch.Tensor | None:
    head = model.get_output_embeddings()
    if head is None or head.weight is model.get_input_embeddings().weight:
        return None  # tied: the input check covers it
    weight = head.weight
    return weight if weight.dtype.is_floating_point and weight.dim() == 2 else None


def check_tokens(model, tokenizer, dataset) -> TokenCheck:
    specials = special_token_ids(tokenizer)
    trained = trained_special_tokens(dataset, specials)
    result = TokenCheck(trained_special=trained)
    if not trained:
        return result
    result.rows = check_rows(model.get_input_embeddings().weight, trained, "input", tokenizer)
    output = _output_matrix(model)
    if output is not None:
        result.rows += check_rows(output, trained, "output", tokenizer)
    return result


def trainable_token_ids(recipe: Recipe, model, tokenizer, dataset, run_dir: Path | None = None) -> TokenCheck:
    """The check, printed and saved; with `peft.train_new_tokens: auto` the flagged rows become trainable."""
    from .run import is_main_process, log

    result = check_tokens(model, tokenizer, dataset)
    if recipe.peft.train_new_tokens == "auto":
        result.ids = result.flagged
    log(result.summary())
    if result.flagged and not result.ids:
        log("flagged rows stay frozen (peft.train_new_tokens: off): the model may not learn to emit these tokens")
    if run_dir is not None and is_main_process():
        atomic_write_json(run_dir / "special_tokens.json", result.to_dict())
    return result


def patch_output_bias(peft_model) -> None:
    """TRL's fused LM-head loss reads `lm_head.bias`; PEFT's trainable-token wrapper has none (AttributeError on the
    first step). Its `weight` is already base + trained rows, so the base layer's bias (None for Qwen) is right."""
    from peft.utils.other import TrainableTokensWrapper

    head = peft_model.get_output_embeddings()
    if isinstance(head, TrainableTokensWrapper) and "bias" not in head.__dict__:
        object.__setattr__(head, "bias", getattr(head.token_adapter.base_layer, "bias", None))
