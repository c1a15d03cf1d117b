"""DPO with LoRA or QLoRA, one readable script: recipe → model source → preference pairs rendered with the official
template (exact prompt and completion ids) → model + adapter → TRL DPOTrainer → adapter → merged checkpoint.

The reference is the policy with its adapter disabled (no second model in memory); when training continues an
existing adapter (`model.adapter`), TRL keeps a frozen copy of that adapter as the reference instead. An explicit
reference model source (`dpo.reference`) is loaded as a separate frozen model.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

from transformers import set_seed

from .data import prepare_data
from .errors import QwentuneError
from .model import add_adapter, load_adapter_for_training, load_base_model, load_tokenizer, resolve_precision
from .recipe import Recipe, resolve_path
from .run import (
    MetricsFile,
    TrainResult,
    effective_batch,
    finish_run,
    is_main_process,
    log,
    prompt_of,
    trainer_arguments,
)
from .runinfo import atomic_write_json, prepare_run_dir
from .sources import resolve_model
from .speed import score_only_trained_positions
from .tokens import check_tokens, trainable_token_ids

# Our pre-tokenized columns (as `qwentune preprocess` writes them) → the names TRL 1.16's DPO collator reads.
TRL_COLUMNS = {
    "prompt_input_ids": "prompt_ids",
    "chosen_input_ids": "chosen_ids",
    "rejected_input_ids": "rejected_ids",
}
_FALLBACK_LOSSES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip


def supported_loss_types() -> tuple[str, ...]:
    """The loss types the installed TRL's DPOTrainer accepts (read from its own error message; fallback: TRL 1.16)."""
    try:
        from trl.trainer import dpo_trainer

        m = re.search(r"Should be one of \[([^\]]+)\]", inspect.getsource(dpo_trainer).replace('"\n', ""))
        if m:
            found = tuple(re.findall(r"'([a-z_]+)'", m.group(1)))
            if found:
                return found
    except (ImportError, OSError):
        pass
    return _FALLBACK_LOSSES


def check_dpo_recipe(recipe: Recipe, where: str = "recipe") -> None:
    """Recipe keys against what the installed TRL supports: loss types, and DPOConfig fields we map onto."""
    from trl import DPOConfig

    losses = supported_loss_types()
    for loss in recipe.dpo.loss_type:
        if loss not in losses:
            from .errors import did_you_mean

            raise QwentuneError(
                f"'dpo.loss_type' has {loss!r}, which the installed TRL does not support",
                where=where,
                hint=did_you_mean(loss, losses) or f"one or more of {', '.join(losses)}",
            )
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    for ours, theirs in (("beta", "beta"), ("loss_weights", "loss_weights"), ("label_smoothing", "label_smoothing"),
                         ("precompute_ref_log_probs", "precompute_ref_log_probs")):  # fmt: skip
        if theirs not in fields:
            raise QwentuneError(
                f"'dpo.{ours}' maps to DPOConfig.{theirs}, which the installed TRL no longer has (renamed or removed)",
                where=where,
                hint="pin trl>=1.16,<2 or remove the key",
            )


def _pretokenized_dpo_trainer():
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        # TRL re-renders and re-tokenizes text pairs and adds a trained "\n" after <|im_end|>; ours are already exact.
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PretokenizedDPOTrainer


def train_dpo(recipe: Recipe) -> TrainResult:
    from trl import DPOConfig

    check_dpo_recipe(recipe, str(recipe.path or "recipe"))
    run_dir = prepare_run_dir(recipe, is_main=is_main_process())
    source = resolve_model(
        recipe.model.source, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
    )
    tokenizer = load_tokenizer(source.path, recipe)

    data = prepare_data(recipe, tokenizer)
    tokenizer.chat_template = data.template.text
    reports = [r.to_dict() for r in data.reports]
    if is_main_process():
        atomic_write_json(run_dir / "data_report.json", reports)
    train = data.train.rename_columns(TRL_COLUMNS)
    evals = data.eval.rename_columns(TRL_COLUMNS) if data.eval is not None else None

    precision = resolve_precision(recipe)
    set_seed(recipe.training.seed)  # the adapter's random init must not depend on what ran before in this process
    model = load_base_model(recipe, source.path, precision)
    continuing = recipe.model.adapter is not None
    if continuing:
        # The adapter keeps the trainable rows it was made with; the check is still reported.
        new_tokens = check_tokens(model, tokenizer, data.train)
        model = load_adapter_for_training(recipe, model, resolve_path(recipe, recipe.model.adapter))
    else:
        new_tokens = trainable_token_ids(recipe, model, tokenizer, data.train, run_dir=run_dir)
        model = add_adapter(recipe, model, new_tokens.ids)

    ref_model = None
    if recipe.dpo.reference:
        ref_source = resolve_model(recipe.dpo.reference, trust_remote_code=recipe.model.trust_remote_code)
        ref_model = load_base_model(recipe, ref_source.path, precision).eval()

    batch, processes = effective_batch(recipe)
    log(
        f"effective batch {batch} pairs = {recipe.training.per_device_batch_size} per device × "
        f"{recipe.training.grad_accum} accumulation × {processes} process(es); precision {precision.name}; "
        f"{len(train)} train pairs" + (f", {len(evals)} eval pairs" if evals is not None else "")
    )
    d = recipe.dpo
    args = DPOConfig(
        **trainer_arguments(recipe, precision, run_dir, has_eval=evals is not None),
        beta=d.beta,
        loss_type=list(d.loss_type),
        loss_weights=d.loss_weights,
        label_smoothing=d.label_smoothing,
        precompute_ref_log_probs=d.precompute_ref_log_probs,
        max_length=None,  # pairs were fitted to data.max_length by the data pipeline
    )
    score_only_trained_positions()
    trainer = _pretokenized_dpo_trainer()(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
        callbacks=[MetricsFile(run_dir / "metrics.jsonl")],
    )
    if not continuing and ref_model is None and "ref" in trainer.model.peft_config:
        # TRL copies a fresh adapter as "ref"; a zero-initialised copy is the base, so disable the adapter instead.
        trainer.model.delete_adapter("ref")

    metrics: dict = {"effective_batch": batch, "processes": processes, "trainable_tokens": new_tokens.to_dict()}
    if evals is not None:
        metrics["eval_before"] = _eval_summary(trainer.evaluate())
    train_output = trainer.train()
    metrics.update(train_output.metrics, global_step=train_output.global_step)
    if evals is not None:
        metrics["eval_after"] = _eval_summary(trainer.evaluate())

    parity_rows = [r["prompt_ids"] + r["chosen_ids"] for r in train.select(range(min(3, len(train))))]
    return finish_run(
        recipe, trainer, run_dir, source=source, tokenizer=tokenizer, template=data.template, metrics=metrics,
        reports=reports, parity_rows=parity_rows, precision=precision,
        sample_prompt=prompt_of((data.eval if data.eval is not None else data.train)[0]),
    )  # fmt: skip


def _eval_summary(metrics: dict) -> dict:
    keys = (
        "eval_loss",
        "eval_rewards/accuracies",
        "eval_rewards/margins",
        "eval_rewards/chosen",
        "eval_rewards/rejected",
    )
    return {k.removeprefix("eval_"): metrics[k] for k in keys if k in metrics}
