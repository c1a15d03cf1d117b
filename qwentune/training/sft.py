"""SFT with LoRA or QLoRA, one readable script: recipe → model source → data (exact masks) → model + adapter →
TRL SFTTrainer on the already-tokenized rows (`setup_sft` stops here and returns it in a Run) → train → adapter →
merged checkpoint (`Run.train()`)."""

from __future__ import annotations

import contextlib

from transformers import set_seed

from .. import patches
from ..data import eval_callbacks, per_source, stream_callbacks
from ..errors import QwentuneError
from ..logs import is_main_process, log
from ..model import (
    QuantSpec,
    add_adapter,
    load_base_model,
    prepare_new_token_rows,
    resolve_precision,
    vision_collator,
)
from ..recipe import Recipe, build_config
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


def setup_sft(recipe: Recipe, held: contextlib.ExitStack) -> Run:
    """Everything up to the configured SFTTrainer; `held` (the run dir lock) also holds the TRL patches until
    `Run.train()` or `Run.close()`."""
    from trl import SFTConfig, SFTTrainer

    # run dir, model source, tokenizer, data rendered with exact masks (as `preprocess`)
    checkpoint, run_dir, source, tokenizer, data, reports = start_run(recipe)
    if data.images is not None and recipe.sft.packing:
        raise QwentuneError(
            "sft.packing does not work with images (Qwen2-VL's 3-D positions are per row)",
            where="sft.packing",
            hint="set sft.packing: false (sft.group_by_length: true keeps padding low)",
        )

    precision = resolve_precision(recipe.model, recipe.training)
    quant = QuantSpec.for_peft(recipe.peft)  # None for LoRA
    set_seed(recipe.training.seed)  # the adapter's random init must not depend on what ran before in this process
    model = load_base_model(recipe.model, source.path, precision, quant=quant, train_vision=recipe.peft.train_vision)
    new_tokens = prepare_new_token_rows(  # flagged special-token rows: trainable, starting from their text
        model,
        tokenizer,
        data.head,  # a stream's first rows
        train_new_tokens=recipe.peft.train_new_tokens,
        init_from_text=True,
        run_dir=run_dir,
    )
    model = add_adapter(
        recipe.peft, model, new_tokens.ids, quant=quant, gradient_checkpointing=recipe.training.gradient_checkpointing
    )
    if is_main_process():
        model.print_trainable_parameters()

    batch, processes = effective_batch(recipe)
    log(
        f"effective batch {batch} = {recipe.training.per_device_batch_size} per device × "
        f"{recipe.training.grad_accum} accumulation × {processes} process(es); precision {precision.name}; "
        + (f"{len(data.train)} train rows" if data.stream is None else "train rows streamed")
        + (f", {len(data.eval)} eval rows" if data.eval is not None else "")
    )

    arguments = trainer_arguments(recipe, precision, run_dir, has_eval=data.eval is not None)
    if recipe.sft.group_by_length:
        arguments["train_sampling_strategy"] = "group_by_length"
    args = build_config(  # TRL refusing a trainer: combination is a QwentuneError
        SFTConfig,
        recipe.trainer,
        **arguments,
        # Rows were fitted to data.max_length by the data pipeline; TRL must not cut them again. Packing needs the bin
        # size, and TRL skips its truncation when it packs (bins of whole rows, BFD).
        max_length=recipe.data.max_length if recipe.sft.packing else None,
        packing=recipe.sft.packing,
        padding_free=recipe.sft.packing,
        dataset_num_proc=recipe.data.num_proc,
        # Our rows are already tokenized with exact labels: TRL prepares nothing, except the bins when it packs.
        dataset_kwargs={"skip_prepare_dataset": not recipe.sft.packing},
    )
    collator = None
    if data.images is not None:  # Qwen2-VL: the collator adds pixel_values / image_grid_thw / mm_token_type_ids
        collator = vision_collator(source.path, recipe.model, tokenizer, data.images)
    metrics: dict = {"effective_batch": batch, "processes": processes, "trainable_tokens": new_tokens.to_dict()}
    patched = held.enter_context(contextlib.ExitStack())
    patched.enter_context(patches.fsdp_on_cpu())  # FSDP on CPU ranks is FSDP, not DDP (patches/sharding.py)
    patched.enter_context(patches.trl_for_sft(model))  # TRL/PEFT internals patched for this trainer only
    trainer = SFTTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[
            MetricsFile(run_dir / "metrics.jsonl"),
            *stream_callbacks(data, run_dir, reports, checkpoint, batch),
        ],
    )
    eval_callbacks(trainer, data.eval_parts)  # data.eval with several entries: eval_<name>_loss each
    if data.stream is not None:  # it starts at the checkpoint's row itself: no batch is read to be dropped
        trainer.get_resumed_dataloader = lambda dataloader, num_batches: dataloader  # (streamed.py)
    settle_trainer(trainer, precision, patched)

    def train() -> TrainResult:
        # SIGTERM/SIGINT: a step finishes and is checkpointed, an evaluation stops at its next batch, then the run
        # exits saying what is resumable (stopping.py)
        with GracefulStop(recipe, run_dir).guard() as stop:
            with patched:  # construct, evaluate and train inside the patches; restored before saving and merging
                before = evaluate_before(trainer, stop) if data.eval is not None else lambda: None
                train_output = train_until_stopped(trainer, stop, checkpoint)
                metrics.update(train_output.metrics, global_step=train_output.global_step)
                if before() is not None:
                    metrics["eval_loss_before"] = before()["eval_loss"]
                after = stop.evaluate(trainer, "the evaluation after training") if data.eval is not None else None
                if after is not None:
                    metrics["eval_loss_after"] = after["eval_loss"]
                if data.eval_parts:
                    metrics["eval_loss_per_source"] = per_source(before(), after, data.eval_parts)
            sample_row = sample_row_of(data)
            return finish_run(
                recipe,
                trainer,
                run_dir,
                stop=stop,
                source=source,
                tokenizer=tokenizer,
                template=data.template,
                metrics=metrics,
                reports=reports,
                parity_rows=parity_rows_of(data),  # the first train rows, as text
                precision=precision,
                sample_prompt=prompt_of(sample_row),
                sample_images=sample_row.get("image_files"),
            )

    return Run(
        recipe=recipe, run_dir=run_dir, trainer=trainer, model=model, tokenizer=tokenizer, data=data, held=held,
        train=train,
    )  # fmt: skip
