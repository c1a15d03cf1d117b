"""TRL's GRPOTrainer as training/grpo.py runs it: the GRPO part of `internals.py`, in a module of its own because
that one is at the module size limit. Written for TRL 1.16, checked on entry like every patch there.

Prompts: TRL 1.16's GRPOTrainer has no pre-tokenized prompts (its dataset rows hold a `prompt`, which
`_tokenize_prompts` renders, for a conversation with one tools list for every row, or tokenizes, for text). Our rows
hold the prompt text exactly as eval and inference render it (each row its own tools), and TRL's plain tokenization
of that text gives exactly our ids when the tokenizer adds no special tokens to text (Qwen's adds none): no patch,
but the trainer checks it on construction against the rows' `prompt_input_ids` and refuses to train otherwise.
TRL applies no prompt truncation (1.16 has no max_prompt_length): an over-long prompt was skipped before.

Reference (beta > 0 only): the adapter TRL copies to "ref" is settled as for DPO (`settle_reference_adapter`).
"""

from __future__ import annotations

import contextlib

from ..errors import QwentuneError
from .internals import TRL, compact_head_on_cpu, lean_cpu_fold, lean_token_rows, settle_reference_adapter
from .machinery import _changed, _problem

CHECKED_PROMPTS = 16  # rows whose TRL tokenization is compared with our ids on construction


def grpo_trainer():
    """TRL's GRPOTrainer with the reference settled right after TRL made its "ref" copy, and the prompt ids checked.
    A subclass changes nothing outside its own instances. Written for TRL 1.16: `_tokenize_prompts(prompts)` read by
    `_generate`, and the reference forward under `use_adapter` in `_generate_and_score_completions`."""
    import trl.trainer.grpo_trainer as grpo_module
    from trl import GRPOTrainer

    for problem in (
        _problem(GRPOTrainer, "_tokenize_prompts", ("self", "prompts"), read_by=(GRPOTrainer, "_generate")),
        _problem(grpo_module, "use_adapter", read_by=(GRPOTrainer, "_generate_and_score_completions")),
        _problem(grpo_module, "is_peft_model", read_by=(GRPOTrainer, "__init__")),
    ):
        if problem:
            raise _changed("trl", TRL, problem)

    class QwentuneGRPOTrainer(GRPOTrainer):
        def __init__(self, *args, continuing: bool, **kwargs):
            super().__init__(*args, **kwargs)
            settle_reference_adapter(self, continuing=continuing, where="grpo reference")
            for dataset in (self.train_dataset, self.eval_dataset):
                if dataset is not None:
                    self._check_prompt_ids(dataset)

        def _check_prompt_ids(self, dataset) -> None:
            """The ids TRL generates from (`_tokenize_prompts`, vLLM included) must be the rendered ids, exactly."""
            rows = dataset.select(range(min(CHECKED_PROMPTS, len(dataset))))
            theirs, _, _ = self._tokenize_prompts(list(rows["prompt"]))
            for k, (got, ours) in enumerate(zip(theirs, rows["prompt_input_ids"])):
                if list(got) != list(ours):
                    raise QwentuneError(
                        f"TRL tokenizes prompt {k} into other ids than qwentune rendered ({len(got)} vs "
                        f"{len(ours)} tokens)",
                        where="qwentune/patches/grpo.py",
                        hint="the tokenizer adds special tokens to plain text (add_special_tokens); qwentune's GRPO "
                        "is written for Qwen tokenizers, which add none",
                    )

    return QwentuneGRPOTrainer


@contextlib.contextmanager
def trl_for_grpo(peft_model):
    """Everything GRPOTrainer needs patched (the fused LM head's CPU path and trainable token rows, as for SFT/DPO);
    yields the GRPOTrainer class to construct (`grpo_trainer`). Construct, evaluate and train it inside this block."""
    trainer_class = grpo_trainer()
    with compact_head_on_cpu(), lean_cpu_fold(), lean_token_rows(peft_model):
        yield trainer_class


__all__ = ["CHECKED_PROMPTS", "grpo_trainer", "trl_for_grpo"]
