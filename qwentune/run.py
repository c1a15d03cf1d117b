"""What SFT and DPO runs share: trainer arguments from the recipe, metrics to jsonl, the loss plot, saving the
adapter and merging at the end. Plain functions, so each method's script stays readable top to bottom."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from .export import QuantSpec, merge_adapter, write_train_sidecar
from .inputs import prepare_inputs
from .logs import _cuda, is_main_process, log, process_state
from .metrics import plot_losses, show_in_notebook
from .model import Precision
from .recipe import Recipe
from .results import TrainResult
from .resume import resume_checkpoint
from .runinfo import atomic_write_json, atomic_write_text, make_staging_dir, prepare_run_dir


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


def save_adapter(model, run_dir: Path, sidecar: dict[str, Any]) -> Path:
    """adapter/ in PEFT format plus qwentune_train.json (`sidecar`: write_train_sidecar's arguments). Atomic."""
    target = run_dir / "adapter"
    tmp = make_staging_dir(run_dir, ".adapter.tmp-")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        write_train_sidecar(tmp, **sidecar)
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
    checkpoint = resume_checkpoint(recipe)  # before the run dir records this recipe
    if recipe.output.push_to_hub:  # a missing token must stop the run before training, not after
        from .push import check_repo_id, require_token

        check_repo_id(recipe.output.push_to_hub, where="output.push_to_hub")
        require_token()
    run_dir = prepare_run_dir(recipe, is_main=is_main_process(), resuming=checkpoint is not None)
    source, tokenizer, _, data = prepare_inputs(recipe)
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
    """Save the adapter, metrics and plot, then merge (main process only); every process returns together."""
    result = TrainResult(run_dir=run_dir, metrics=metrics, data_reports=reports)
    if is_main_process():
        result.adapter_dir = save_adapter(trainer.model, run_dir, adapter_sidecar(recipe, source, template, precision))
        tokenizer.save_pretrained(result.adapter_dir)
        show_in_notebook(plot_losses(run_dir))  # inline in a notebook cell; a file either way
        if recipe.output.merge:
            merged = merge_adapter(
                result.adapter_dir,
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
            result.merged_dir = merged.output_dir
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
                atomic_write_text(
                    run_dir / "sample.txt", metrics["sample"]["prompt"] + metrics["sample"]["completion"]
                )
                log(
                    "sample generation from the merged model (plain transformers, greedy):\n"
                    + metrics["sample"]["completion"]
                )
        atomic_write_json(run_dir / "metrics.json", _plain(metrics))
        if result.merged_dir is not None:  # the card from what the run recorded: base as the user wrote it
            from .card import card_for_run

            atomic_write_text(result.merged_dir / "README.md", card_for_run(run_dir))
        if recipe.output.push_to_hub and result.merged_dir is not None:
            from .push import push_after_training

            push_after_training(run_dir, recipe.output.push_to_hub)
    trainer.accelerator.wait_for_everyone()
    return result


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

    from .vision import is_vision_model, pixel_inputs

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
