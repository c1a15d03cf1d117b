"""DPO with LoRA or QLoRA, one readable script: recipe → model source → preference pairs rendered with the official
template (exact prompt and completion ids) → model + adapter → TRL DPOTrainer → adapter → merged checkpoint.

The reference model, in one of three forms:
- a fresh adapter (the default): the policy with its adapter disabled, i.e. the base — no second copy in memory;
- continuing an adapter (`model.adapter`, e.g. after SFT): a frozen copy of that adapter, made by TRL as "ref";
- `dpo.reference`: a separate model source, loaded frozen (in 4-bit under QLoRA).
With `dpo.precompute_ref_log_probs` the reference log-probs of every pair are computed once before training.
`setup_dpo` stops at the configured DPOTrainer and returns it in a Run; `Run.train()` trains, saves and merges.
"""

from __future__ import annotations

import contextlib
import dataclasses

from transformers import set_seed

from .. import patches
from ..errors import QwentuneError, did_you_mean
from ..logs import is_main_process, log
from ..model import (
    QuantSpec,
    add_adapter,
    check_tokens,
    load_adapter_for_training,
    load_base_model,
    prepare_new_token_rows,
    resolve_model,
    resolve_precision,
    vision_collator,
)
from ..recipe import Recipe, build_config, resolve_path
from .metrics import MetricsFile
from .results import TrainResult
from .run import Run
from .steps import (
    effective_batch,
    evaluate_before,
    finish_run,
    parity_rows_of,
    prompt_of,
    sample_row_of,
    settle_trainer,
    start_run,
    trainer_arguments,
)
from .stopping import GracefulStop, train_until_stopped

# Our pre-tokenized columns (as `qwentune preprocess` writes them) → the names TRL 1.16's DPO collator reads.
TRL_COLUMNS = {
    "prompt_input_ids": "prompt_ids",
    "chosen_input_ids": "chosen_ids",
    "rejected_input_ids": "rejected_ids",
}
# dpo.<key> → the DPOConfig field it is passed as.
CONFIG_FIELDS = {
    "beta": "beta",
    "loss_type": "loss_type",
    "loss_weights": "loss_weights",
    "label_smoothing": "label_smoothing",
    "precompute_ref_log_probs": "precompute_ref_log_probs",
}
# dpo.<key> that older TRL releases had and the installed one may not: what to write instead.
REMOVED_FIELDS = {
    "rpo_alpha": "RPO is now a loss combination: loss_type: [sigmoid, sft] with loss_weights: [1.0, ALPHA]",
}
EVAL_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
             "logps/chosen", "logps/rejected")  # fmt: skip


def check_dpo_recipe(recipe: Recipe, where: str = "recipe", *, adapter_made_later: bool = False) -> None:
    """The dpo section against what the installed TRL supports (loss types, DPOConfig fields), and the adapter to
    continue, before any weights load. Raises QwentuneError naming the key."""
    from trl import DPOConfig

    d = recipe.dpo
    losses = patches.trl_dpo_loss_types()
    for loss in d.loss_type:
        if loss not in losses:
            raise QwentuneError(
                f"'dpo.loss_type' has {loss!r}, which the installed TRL does not support",
                where=where,
                hint=did_you_mean(loss, losses) or f"one or more of {', '.join(losses)}",
            )
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    for ours, theirs in CONFIG_FIELDS.items():
        if theirs not in fields:
            raise QwentuneError(
                f"'dpo.{ours}' maps to DPOConfig.{theirs}, which the installed TRL no longer has (renamed or removed)",
                where=where,
                hint="install the TRL version in qwentune's requirements, or remove the key",
            )
    for ours, instead in REMOVED_FIELDS.items():
        if getattr(d, ours, None) is not None and ours not in fields:
            raise QwentuneError(
                f"'dpo.{ours}' is set, but the installed TRL's DPOConfig has no '{ours}' (removed)",
                where=where,
                hint=instead,
            )
    if "exo_pair" in d.loss_type and d.label_smoothing <= 0:
        raise QwentuneError(
            "'dpo.loss_type' exo_pair needs 'dpo.label_smoothing' > 0", where=where, hint="the EXO paper uses 1e-3"
        )
    if recipe.model.adapter is not None:
        adapter = resolve_path(recipe, recipe.model.adapter)
        if not (adapter / "adapter_config.json").is_file() and not (adapter_made_later and not adapter.exists()):
            raise QwentuneError(
                f"'model.adapter' is not a PEFT adapter dir (no adapter_config.json): {adapter}",
                where=where,
                hint="point it at the adapter/ dir of an earlier run, e.g. runs/<sft run>/adapter",
            )


def setup_dpo(recipe: Recipe, held: contextlib.ExitStack) -> Run:
    """Everything up to the configured DPOTrainer; `held` (the run dir lock) also holds the TRL patches until
    `Run.train()` or `Run.close()`."""
    from trl import DPOConfig

    check_dpo_recipe(recipe, str(recipe.path or "recipe"))
    # run dir, model source, tokenizer, pairs rendered exactly (as `preprocess`)
    checkpoint, run_dir, source, tokenizer, data, reports = start_run(recipe)
    train = data.train.rename_columns(TRL_COLUMNS)
    evals = data.eval.rename_columns(TRL_COLUMNS) if data.eval is not None else None

    precision = resolve_precision(recipe.model, recipe.training)
    quant = QuantSpec.for_peft(recipe.peft)  # None for LoRA
    set_seed(recipe.training.seed)  # the adapter's random init must not depend on what ran before in this process
    model = load_base_model(recipe.model, source.path, precision, quant=quant, train_vision=recipe.peft.train_vision)
    continuing = recipe.model.adapter is not None
    if continuing:
        # The adapter keeps the trainable token rows it was made with; the check is still reported.
        new_tokens = check_tokens(model, tokenizer, data.train)
        log(new_tokens.summary())
        adapter_dir = resolve_path(recipe, recipe.model.adapter)
        model = load_adapter_for_training(
            model, adapter_dir, quant=quant, gradient_checkpointing=recipe.training.gradient_checkpointing
        )
        reference = f"frozen copy of the adapter {adapter_dir}"
    else:
        new_tokens = prepare_new_token_rows(  # flagged special-token rows: trainable, from their base values
            model, tokenizer, data.train, train_new_tokens=recipe.peft.train_new_tokens,
            init_from_text=False,  # the policy must start equal to its reference, the adapter-disabled base
            run_dir=run_dir,
        )  # fmt: skip
        model = add_adapter(
            recipe.peft,
            model,
            new_tokens.ids,
            quant=quant,
            gradient_checkpointing=recipe.training.gradient_checkpointing,
        )
        reference = "the policy with its adapter disabled (the base model)"

    ref_model = None
    if recipe.dpo.reference:
        ref_source = resolve_model(recipe.dpo.reference, trust_remote_code=recipe.model.trust_remote_code)
        ref_model = load_base_model(
            recipe.model, ref_source.path, precision, quant=quant, train_vision=recipe.peft.train_vision
        ).eval()
        if ref_model.config.get_text_config().vocab_size != model.config.get_text_config().vocab_size:
            raise QwentuneError(
                f"the reference {recipe.dpo.reference} has another vocabulary than {recipe.model.source}",
                where="dpo.reference",
                hint="the reference must share the policy's tokenizer",
            )
        reference = f"the model {recipe.dpo.reference}"
    if is_main_process():
        model.print_trainable_parameters()

    batch, processes = effective_batch(recipe)
    d = recipe.dpo
    log(
        f"effective batch {batch} pairs = {recipe.training.per_device_batch_size} per device × "
        f"{recipe.training.grad_accum} accumulation × {processes} process(es); precision {precision.name}; "
        f"{len(train)} train pairs" + (f", {len(evals)} eval pairs" if evals is not None else "")
    )
    log(
        f"dpo: loss {' + '.join(f'{w}×{t}' for t, w in zip(d.loss_type, d.loss_weights or [1.0] * len(d.loss_type)))}"
        f", beta {d.beta}, label_smoothing {d.label_smoothing}; reference: {reference}"
        + (", log-probs precomputed" if d.precompute_ref_log_probs else "")
    )
    args = build_config(  # TRL refusing a trainer: combination is a QwentuneError
        DPOConfig,
        recipe.trainer,
        **trainer_arguments(recipe, precision, run_dir, has_eval=evals is not None),
        beta=d.beta,
        loss_type=list(d.loss_type),
        loss_weights=d.loss_weights,
        label_smoothing=d.label_smoothing,
        precompute_ref_log_probs=d.precompute_ref_log_probs,
        max_length=None,  # pairs were fitted to data.max_length by the data pipeline; TRL must not cut them again
    )
    collator = None
    if data.images is not None:  # Qwen2-VL: pixel inputs for the prompt's images, once per chosen/rejected row
        collator = vision_collator(source.path, recipe.model, tokenizer, data.images, preference=True)
    metrics: dict = {
        "effective_batch": batch,
        "processes": processes,
        "trainable_tokens": new_tokens.to_dict(),
        "dpo": {"loss_type": list(d.loss_type), "loss_weights": d.loss_weights, "beta": d.beta,
                "label_smoothing": d.label_smoothing, "reference": reference,
                "precompute_ref_log_probs": d.precompute_ref_log_probs},
    }  # fmt: skip
    patched = held.enter_context(contextlib.ExitStack())
    patched.enter_context(patches.fsdp_on_cpu())  # FSDP on CPU ranks is FSDP, not DDP (patches/sharding.py)
    DPOTrainer = patched.enter_context(patches.trl_for_dpo(model))  # noqa: N806 - TRL/PEFT patched for this trainer
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        data_collator=collator,
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
        callbacks=[MetricsFile(run_dir / "metrics.jsonl")],
        continuing=continuing,
    )
    settle_trainer(trainer, precision, patched)
    if d.precompute_ref_log_probs and ref_model is not None:
        trainer.ref_model = ref_model = None  # every reference log-prob is in the datasets now: free the model

    def train_run() -> TrainResult:
        # SIGTERM/SIGINT: a step finishes and is checkpointed, an evaluation stops at its next batch, then the run
        # exits saying what is resumable (stopping.py)
        with GracefulStop(recipe, run_dir).guard() as stop:
            with patched:  # construct, evaluate and train inside the patches; restored before saving and merging
                before = evaluate_before(trainer, stop) if evals is not None else lambda: None
                train_output = train_until_stopped(trainer, stop, checkpoint)
                metrics.update(train_output.metrics, global_step=train_output.global_step)
                if evals is not None:
                    metrics["eval_before"] = _eval_summary(before())
                    after = _final_eval(trainer, train_output.global_step)
                    metrics["eval_after"] = _eval_summary(
                        after or stop.evaluate(trainer, "the evaluation after training")
                    )
            return _finish(stop)

    def _finish(stop) -> TrainResult:
        if evals is not None and stop.signum is None:
            log(
                "eval reward accuracy {:.3f} → {:.3f}, mean margin {:.4f} → {:.4f}".format(
                    metrics["eval_before"].get("rewards/accuracies", float("nan")),
                    metrics["eval_after"].get("rewards/accuracies", float("nan")),
                    metrics["eval_before"].get("rewards/margins", float("nan")),
                    metrics["eval_after"].get("rewards/margins", float("nan")),
                )
            )

        if continuing and "ref" in trainer.model.peft_config:
            trainer.model.delete_adapter("ref")  # save and merge the trained adapter only, not the reference copy
            trainer.model.set_adapter("default")
        sample_row = sample_row_of(data)
        return finish_run(
            recipe, trainer, run_dir, stop=stop, source=source, tokenizer=tokenizer, template=data.template,
            metrics=metrics, reports=reports, parity_rows=parity_rows_of(data), precision=precision,
            sample_prompt=prompt_of(sample_row), sample_images=sample_row.get("image_files"),
        )  # fmt: skip

    return Run(
        recipe=recipe, run_dir=run_dir, trainer=trainer, model=model, tokenizer=tokenizer, data=data, held=held,
        train=train_run,
    )  # fmt: skip


def _final_eval(trainer, step: int) -> dict | None:
    """The evaluation the trainer already ran at the last step (eval_strategy epoch/steps), so it is not repeated."""
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry:
            return entry if entry.get("step") == step else None
    return None


def _eval_summary(metrics: dict | None) -> dict:
    """The eval keys of `metrics` ({} where a signal stopped the evaluation)."""
    return {k: metrics[f"eval_{k}"] for k in EVAL_KEYS if f"eval_{k}" in (metrics or {})}
