"""What SFT and DPO runs share: trainer arguments from the recipe, metrics to jsonl, the loss plot, saving the
adapter and merging at the end. Plain functions, so each method's script stays readable top to bottom."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from .. import patches
from ..eval import collect, evaluate_after_training
from ..export import merge_adapter, write_train_sidecar
from ..files import (
    atomic_write_json,
    atomic_write_text,
    make_staging_dir,
    public_tree,
    remove_stale_staging,
    staging_prefix,
)
from ..logs import _cuda, is_main_process, log, process_state
from ..model import Precision, QuantSpec, keep_trainables_in_fp32
from ..recipe import Recipe, resolve_path
from ..rows import text_only
from .inputs import prepare_inputs
from .metrics import plot_losses, read_metrics, show_in_notebook
from .results import TrainResult
from .resume import resume_checkpoint
from .rundir import prepare_run_dir, run_dir_for
from .sharding import check_4bit_after_wrapping, refuse_unshardable, whole_trainables, without_zero3_init
from .stopping import GracefulStop


def trainer_arguments(recipe: Recipe, precision: Precision, run_dir: Path, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments keys shared by SFTConfig and DPOConfig, straight from the recipe, plus the recipe's
    `trainer:` pass-through fields (checked at load: none of them is a key set here or by sft.py/dpo.py)."""
    t = recipe.training
    eval_strategy = "no"
    if has_eval:
        eval_strategy = "steps" if t.eval_steps else "epoch"
    save_strategy = "steps" if t.save_steps else "no"
    report_to = list(recipe.logging.report_to) or "none"
    return dict(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=not _cuda(),
        logging_steps=t.logging_steps,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy=save_strategy,
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        report_to=report_to,
        run_name=recipe.logging.run_name or run_dir.name,
        gradient_checkpointing=False,  # the adapter code enables it (non-reentrant) before PEFT wraps the model
        dataloader_num_workers=t.dataloader_num_workers,
        train_sampling_strategy="random" if t.shuffle else "sequential",
        remove_unused_columns=False,
        disable_tqdm=False,
        **recipe.trainer,
    )


def settle_trainer(trainer, precision: Precision, patched) -> None:
    """What every trainer needs once TRL has built it: the trainable weights back in fp32 (TRL casts them to bf16
    under QLoRA), the 4-bit layers checked once FSDP wrapped them, and LoRA's input cast off under autocast (scoped
    in `patched`, restored when the run ends)."""
    keep_trainables_in_fp32(trainer.model)
    check_4bit_after_wrapping(trainer)
    patched.enter_context(patches.lora_input_cast_off(trainer.model, active=precision.autocast))


def save_adapter(model, run_dir: Path, sidecar: dict[str, Any], state_dict: dict | None = None) -> Path:
    """adapter/ in PEFT format plus qwentune_train.json (`sidecar`: write_train_sidecar's arguments). Atomic.
    `state_dict`: the trainable parameters whole, where the model holds slices of them (FSDP)."""
    target = run_dir / "adapter"
    remove_stale_staging(run_dir, "adapter")
    tmp = make_staging_dir(run_dir, staging_prefix("adapter"))
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        write_train_sidecar(tmp, **sidecar)
        public_tree(tmp)  # PEFT's adapter_model.safetensors comes out 0600 (safetensors writes via a temp file)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def effective_batch(recipe: Recipe) -> tuple[int, int]:
    processes = process_state().num_processes
    t = recipe.training
    return t.per_device_batch_size * t.grad_accum * processes, processes


class RunStart(NamedTuple):
    """What both methods have before any weights load: run dir, resolved model, tokenizer, rendered data."""

    checkpoint: str | None
    run_dir: Path
    source: Any
    tokenizer: Any
    data: Any
    reports: list[dict]


def start_run(recipe: Recipe) -> RunStart:
    """Run dir, model source, tokenizer, and the data through the same code path as `qwentune preprocess`
    (official template, exact masks / prompt+completion ids, bad rows counted by reason)."""
    refuse_unshardable(recipe)  # what FSDP cannot wrap, before anything is written or loaded
    checkpoint = resume_checkpoint(recipe)  # before the run dir records this recipe
    if recipe.output.push_to_hub:  # a missing token must stop the run before training, not after
        from ..serve import check_repo_id, require_token

        check_repo_id(recipe.output.push_to_hub, where="output.push_to_hub")
        require_token()
    if recipe.eval.enabled:  # a missing or unscoreable eval file must stop the run before training, not after
        collect(eval_files(recipe), limit=recipe.eval.limit)
    run_dir = prepare_run_dir(recipe, is_main=is_main_process(), resuming=checkpoint is not None)
    source, tokenizer, _, data = prepare_inputs(recipe, streaming=True)
    tokenizer.chat_template = data.template.text  # the merged model must carry the template it was trained with
    reports = [r.to_dict() for r in data.reports]
    if is_main_process():
        atomic_write_json(run_dir / "data_report.json", reports)
    return RunStart(checkpoint, run_dir, source, tokenizer, data, reports)


def adapter_sidecar(recipe: Recipe, source, template, precision: Precision) -> dict[str, Any]:
    """How the adapter was trained, as `write_train_sidecar`'s arguments: the merge needs the base, the 4-bit
    settings (if any), the template and (Qwen2-VL) the pixel limits."""
    return {
        "quantization": QuantSpec.for_peft(recipe.peft),
        "chat_template": template.text,
        "image_processor": {"min_pixels": recipe.model.min_pixels, "max_pixels": recipe.model.max_pixels},
        "run_facts": {
            "base_model": recipe.model.source,
            "base_path": str(source.path),
            "method": recipe.method,
            "peft": recipe.peft.method,
            "precision": precision.name,
            "template": template.name,
        },
    }


def finish_run(
    recipe: Recipe,
    trainer,
    run_dir: Path,
    *,
    stop: GracefulStop,
    source,
    tokenizer,
    template,
    metrics: dict,
    reports: list[dict],
    parity_rows: list[list[int]],
    precision: Precision,
    sample_prompt: list[int] | None = None,
    sample_images: list[str] | None = None,
) -> TrainResult:
    """Save the adapter, then what follows training (main process only); every process returns together. After a
    signal (`stop`: during the evaluation at the end of training, or before the save) only the adapter is saved, then
    TrainingInterrupted says `--resume` finishes the run."""
    result = TrainResult(run_dir=run_dir, metrics=metrics, data_reports=reports)
    with stop.during("the adapter save"), whole_trainables(trainer) as whole:  # a signal waits for the save
        if is_main_process():
            sidecar = adapter_sidecar(recipe, source, template, precision)
            result.adapter_dir = save_adapter(trainer.model, run_dir, sidecar, state_dict=whole)
            tokenizer.save_pretrained(result.adapter_dir)
    if stop.agreed():
        raise stop.interrupted()
    patches.release_trainer(trainer)  # the merge, sample and eval start from what a fresh process holds
    if is_main_process():
        with without_zero3_init(trainer):  # the main process alone loads models now
            result.merged_dir = after_training(
                recipe, run_dir, stop=stop, source=source, template=template, metrics=metrics,
                parity_rows=parity_rows, sample_prompt=sample_prompt, sample_images=sample_images,
            )  # fmt: skip
    trainer.accelerator.wait_for_everyone()
    return result


def evaluate_before(trainer, stop: GracefulStop) -> Callable[[], dict | None]:
    """The evaluation before training; call what it returns after `train_until_stopped` for its metrics (None where
    a signal stopped it). With several processes or DeepSpeed it runs at the start of `trainer.train()`
    (`eval_on_start`), on the model prepared for training: an evaluation before train() prepares the model for
    evaluation only, and train() then keeps it so (accelerate 1.16 counts it as prepared and never wraps it in DDP:
    every rank trained alone on its own rows; DeepSpeed's engine has no optimizer: the first backward fails with
    "'NoneType' object has no attribute 'backward'" on every rank)."""
    if trainer.accelerator.num_processes == 1 and not getattr(trainer, "is_deepspeed_enabled", False):
        before = stop.evaluate(trainer, "the evaluation before training")
        return lambda: before
    trainer.args.eval_on_start = True
    return lambda: next((row for row in trainer.state.log_history if any(k.startswith("eval_") for k in row)), None)


def eval_files(recipe: Recipe) -> list[str]:
    """What `eval:` scores: eval.data, else data.eval, each resolved like data.eval (`recipe.resolve_path`)."""
    return [str(resolve_path(recipe, f)) for f in (recipe.eval.data or recipe.data.eval)]


def evaluate_run(recipe: Recipe, run_dir: Path, *, base: str, template) -> dict:
    """`eval:` at the end of training: the run's model (merged/, else the adapter) and, with eval.base, the base
    (`base`: its local dir), rendered with the training template; logs the table and the one-line summary.
    Returns what metrics.json keeps under "eval" (run_dir/eval.md and run_dir/eval/eval.json are written too)."""
    section = dataclasses.replace(recipe.eval, data=eval_files(recipe))
    out = evaluate_after_training(run_dir, section, base, [], template=template)
    log(f"eval (every row: {run_dir / 'eval' / 'eval.json'}):\n{out['table']}")
    log(out["summary"])
    return {"data": out["data"], "limit": section.limit, "metrics": out["metrics"], "summary": out["summary"]}


def after_training(
    recipe: Recipe,
    run_dir: Path,
    *,
    stop: GracefulStop,
    source,
    template,
    metrics: dict,
    parity_rows: list[list[int]],
    sample_prompt: list[int] | None = None,
    sample_images: list[str] | None = None,
) -> Path | None:
    """Once adapter/ is saved: loss plot, merge with parity, sample generation, eval (`eval.enabled`), metrics.json
    (the run is finished once it exists), model card, push. Returns the merged dir (None without `output.merge`).
    A signal stops each of these at once (`stop`): they write atomically, and the saved adapter is resumable."""
    with stop.during("the merge and sample", at_once=True):
        merged_dir = _merge_and_sample(
            recipe, run_dir, source=source, template=template, metrics=metrics, parity_rows=parity_rows,
            sample_prompt=sample_prompt, sample_images=sample_images,
        )  # fmt: skip
    if recipe.eval.enabled:
        with stop.during("the eval.enabled scoring", at_once=True):
            metrics["eval"] = evaluate_run(recipe, run_dir, base=str(source.path), template=template)
    with stop.during("the metrics and model card", at_once=True):
        atomic_write_json(run_dir / "metrics.json", _plain(metrics))
        if merged_dir is not None:  # after metrics.json and eval.md: the card shows both; base by name
            from ..export import card_for_run

            atomic_write_text(merged_dir / "README.md", card_for_run(run_dir))
    if recipe.output.push_to_hub and merged_dir is not None:
        from ..serve import push_after_training

        with stop.during("the push", at_once=True):
            push_after_training(run_dir, recipe.output.push_to_hub)
    return merged_dir


def _merge_and_sample(
    recipe: Recipe,
    run_dir: Path,
    *,
    source,
    template,
    metrics: dict,
    parity_rows: list[list[int]],
    sample_prompt: list[int] | None,
    sample_images: list[str] | None,
) -> Path | None:
    """The loss plot, then (`output.merge`) the merge with parity and the sample generation; merged/ or None."""
    adapter_dir = run_dir / "adapter"
    merged_dir = None
    show_in_notebook(plot_losses(run_dir))  # inline in a notebook cell; a file either way
    if recipe.output.merge:
        merged = merge_adapter(
            adapter_dir,
            run_dir / "merged",
            base=source.path,
            qlora_merge=recipe.output.qlora_merge,
            parity_input_ids=parity_rows,
            chat_template=template.text,
            model_card={
                "base": recipe.model.source,
                "data": recipe.data.train,
                "method": recipe.method,
                "peft": recipe.peft.method,
                "metrics": _plain(metrics),
            },
        )
        merged_dir = merged.output_dir
        metrics["merge"] = {
            "mode": merged.mode,
            "max_abs_diff": merged.max_abs_diff,
            "tolerance": merged.tolerance,
            "untied": merged.untied,
        }
        log(f"merged ({merged.mode}) into {merged.output_dir}; parity max |Δlogit| = {merged.max_abs_diff:.2e}")
        if recipe.output.sample_tokens > 0 and sample_prompt:
            metrics["sample"] = sample_generation(
                merged.output_dir, sample_prompt, recipe.output.sample_tokens, images=sample_images
            )
            atomic_write_text(run_dir / "sample.txt", metrics["sample"]["prompt"] + metrics["sample"]["completion"])
            patches.release_host_memory()  # the eval's models load into what the sample's model freed
            log(
                "sample generation from the merged model (plain transformers, greedy):\n"
                + metrics["sample"]["completion"]
            )
    return merged_dir


def parity_rows_of(data, count: int = 3) -> list[list[int]]:
    """The merge's parity rows: the first train rows as text ids (SFT: the row; DPO: prompt + chosen; GRPO: the
    prompt; no pixels)."""
    rows = data.head.select(range(min(count, len(data.head))))  # a stream's first rows
    ids = [r["prompt_input_ids"] + r.get("chosen_input_ids", []) if "prompt_input_ids" in r else r["input_ids"]
           for r in rows]  # fmt: skip
    return ids if data.images is None else [text_only(row, data.images) for row in ids]


def sample_row_of(data) -> dict:
    """The row whose prompt the merged model answers after training: the first eval row, else the first train row."""
    return (data.eval if data.eval is not None else data.head)[0]


def finish_trained_run(recipe: Recipe) -> TrainResult:
    """`--resume` on a run whose training ended (adapter/ saved) but whose merge did not: the steps after training,
    without retraining: same data, same parity rows and sample prompt as the trained run would have used."""
    from .resume import check_same_recipe

    run_dir = run_dir_for(recipe)
    check_same_recipe(recipe, run_dir)
    result = TrainResult(run_dir=run_dir, adapter_dir=run_dir / "adapter")
    if not is_main_process():
        return result
    log(f"{run_dir}: training had ended (adapter/ saved); finishing the run without retraining: plot, merge, metrics")
    with GracefulStop(recipe, run_dir).guard() as stop:  # a signal: stopped at once, still resumable this way
        source, _, _, data = prepare_inputs(recipe, streaming=True)
        result.data_reports = [r.to_dict() for r in data.reports]
        metrics = result.metrics = {"finished_by_resume": True, **_trained_metrics(run_dir)}
        sample = sample_row_of(data)
        result.merged_dir = after_training(
            recipe, run_dir, stop=stop, source=source, template=data.template, metrics=metrics,
            parity_rows=parity_rows_of(data), sample_prompt=prompt_of(sample), sample_images=sample.get("image_files"),
        )  # fmt: skip
    return result


def _trained_metrics(run_dir: Path) -> dict:
    """What the trainer reported at the end of training (its last log row: train_runtime, train_loss, ...); where a
    signal stopped the evaluation at the end of training before that row, the last step logged."""
    rows = read_metrics(run_dir)
    for row in reversed(rows):
        if "train_runtime" in row:
            return {**{k: v for k, v in row.items() if k not in ("step", "epoch")}, "global_step": row.get("step")}
    steps = [row["step"] for row in rows if "loss" in row and "step" in row]
    return {"global_step": max(steps)} if steps else {}


def prompt_of(row: dict) -> list[int]:
    """The ids a model sees before its first trained token: the official rendering up to the generation prompt."""
    if "prompt_input_ids" in row:
        return list(row["prompt_input_ids"])
    first = next(i for i, label in enumerate(row["labels"]) if label != -100)
    return list(row["input_ids"][:first])


def sample_generation(
    model_dir: Path, prompt_ids: list[int], max_new_tokens: int, *, images: list[str] | None = None
) -> dict[str, str]:
    """Greedy generation from a merged dir loaded the way a user would: plain AutoModelForCausalLM + AutoTokenizer
    (Qwen2-VL: AutoModelForImageTextToText, with the prompt's images through the saved image processor)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..model import is_vision_model, pixel_inputs

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = {"input_ids": torch.tensor([prompt_ids])}
    if is_vision_model(model_dir):
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
        inputs |= pixel_inputs(model_dir, inputs["input_ids"], images or [])
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    completion = tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=False)
    return {"prompt": tokenizer.decode(prompt_ids, skip_special_tokens=False), "completion": completion}


def _plain(metrics: dict) -> dict:
    return json.loads(json.dumps(metrics, default=str))
