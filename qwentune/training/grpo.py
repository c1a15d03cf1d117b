"""GRPO with LoRA or QLoRA, one readable script: recipe → model source → prompts, one per expected assistant turn of
each row, rendered as eval and inference render them, the turn as the reference (`grpo_prompts`) → model + adapter (a
new one, or model.adapter continued, e.g. the SFT adapter) → TRL GRPOTrainer: for each prompt a group of
grpo.num_generations sampled completions, scored by the named rewards (eval's scoring rules, eval/rewards.py, or
callables passed from Python; `grpo_rewards`), each completion's advantage its reward against its group's →
adapter → merged checkpoint. docs/grpo.md has the keys and the rewards' exact values.

The reference, only with grpo.beta > 0 (TRL's default is 0: no KL term, no reference pass):
- a fresh adapter: the policy with its adapter disabled, i.e. the base — no second copy in memory;
- continuing an adapter (`model.adapter`): a frozen copy of that adapter, made by TRL as "ref" (as dpo does).
Generation: transformers' generate (CPU or GPU), or vLLM colocated on the GPU with grpo.use_vllm.
`setup_grpo` stops at the configured GRPOTrainer and returns it in a Run; `Run.train()` trains, saves and merges.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable

from transformers import set_seed

from .. import patches
from ..errors import QwentuneError
from ..eval import reward_functions, stop_token_ids
from ..logs import _cuda, is_main_process, log, process_state
from ..model import (
    QuantSpec,
    add_adapter,
    check_tokens,
    load_adapter_for_training,
    load_base_model,
    resolve_precision,
)
from ..recipe import Recipe, build_config, resolve_path
from .grpo_rewards import measured, trl_rewards
from .metrics import MetricsFile, read_metrics
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


def check_grpo_recipe(
    recipe: Recipe,
    where: str = "recipe",
    rewards: dict[str, Callable] | None = None,
    processes: int = 1,
    adapter_made_later: bool = False,
) -> None:
    """The grpo section and what it needs, before anything loads: the rewards exist (did-you-mean), the batch holds
    whole groups, prompts have room to answer, the adapter to continue (`adapter_made_later`, validate: a dir that
    does not exist yet is the run that makes it still to come), vLLM. Raises QwentuneError naming the key."""
    g, t, d = recipe.grpo, recipe.training, recipe.data
    if not g.rewards:
        raise QwentuneError("'grpo.rewards' is empty", where=where, hint="e.g. {tool_call: 1.0, no_call: 1.0}")
    reward_functions(list(g.rewards), rewards, where=where)
    completions = t.per_device_batch_size * t.grad_accum * processes
    if completions % g.num_generations:
        raise QwentuneError(
            f"the effective batch of {completions} completions (training.per_device_batch_size × grad_accum × "
            f"{processes} process(es)) does not hold whole groups of grpo.num_generations {g.num_generations}",
            where=where,
            hint=f"make per_device_batch_size × grad_accum a multiple of {g.num_generations}, e.g. "
            f"grad_accum: {g.num_generations}",
        )
    if d.max_length <= g.max_completion_length:
        raise QwentuneError(
            f"'data.max_length' ({d.max_length}) leaves no room for a prompt beside grpo.max_completion_length "
            f"({g.max_completion_length})",
            where=where,
            hint="data.max_length bounds prompt + completion: raise it, or lower grpo.max_completion_length",
        )
    unsupported = {
        "data.overlong: truncate": d.overlong == "truncate",  # a prompt is never cut
        "data.eval_fraction": d.eval_fraction > 0,
        "data.train weights / data.mix_rows": any(getattr(e, "weight", None) is not None for e in d.train),
        "data.dedupe": d.dedupe,
    }
    for key, used in unsupported.items():
        if used:
            raise QwentuneError(
                f"'{key}' is not supported with method: grpo",
                where=where,
                hint="prompts are never cut (over-long ones are skipped: data.overlong drop or error); give eval rows "
                "as data.eval; mix or dedupe the rows before",
            )
    if recipe.model.adapter is not None:
        adapter = resolve_path(recipe, recipe.model.adapter)
        if not (adapter / "adapter_config.json").is_file() and not (adapter_made_later and not adapter.exists()):
            raise QwentuneError(
                f"'model.adapter' is not a PEFT adapter dir (no adapter_config.json): {adapter}",
                where=where,
                hint="point it at the adapter/ dir of an earlier run, e.g. runs/<sft run>/adapter",
            )
    if g.use_vllm and (importlib.util.find_spec("vllm") is None or not _cuda()):
        raise QwentuneError(
            "'grpo.use_vllm' needs vLLM installed and a CUDA GPU",
            where=where,
            hint="pip install vllm on a GPU machine, or set grpo.use_vllm: false (transformers' generate)",
        )


def setup_grpo(recipe: Recipe, held: contextlib.ExitStack, rewards: dict[str, Callable] | None = None) -> Run:
    """Everything up to the configured GRPOTrainer; `held` (the run dir lock) also holds the TRL patches until
    `Run.train()` or `Run.close()`. `rewards`: reward callables from Python by name (docs/grpo.md)."""
    from trl import GRPOConfig

    g = recipe.grpo
    check_grpo_recipe(recipe, str(recipe.path or "recipe"), rewards, process_state().num_processes)
    # run dir, model source, tokenizer, prompts rendered as eval renders them (one per expected turn)
    checkpoint, run_dir, source, tokenizer, data, reports = start_run(recipe)
    functions, weights = trl_rewards(g.rewards, rewards, tokenizer)

    precision = resolve_precision(recipe.model, recipe.training)
    quant = QuantSpec.for_peft(recipe.peft)  # None for LoRA
    set_seed(recipe.training.seed)  # the adapter's random init must not depend on what ran before in this process
    model = load_base_model(recipe.model, source.path, precision, quant=quant, train_vision=recipe.peft.train_vision)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)  # completions stop where eval's replies stop
    new_tokens = check_tokens(model, tokenizer, data.train)  # no labels: no token rows made trainable (docs/grpo.md)
    continuing = recipe.model.adapter is not None
    if continuing:  # the adapter keeps the trainable token rows it was made with
        adapter_dir = resolve_path(recipe, recipe.model.adapter)
        model = load_adapter_for_training(
            model, adapter_dir, quant=quant, gradient_checkpointing=recipe.training.gradient_checkpointing
        )
        reference = f"a frozen copy of the adapter {adapter_dir}"
    else:
        model = add_adapter(
            recipe.peft, model, [], quant=quant, gradient_checkpointing=recipe.training.gradient_checkpointing
        )
        reference = "the policy with its adapter disabled (the base model)"
    if g.beta == 0:
        reference = "none (grpo.beta 0: no KL term)"
    if is_main_process():
        model.print_trainable_parameters()

    batch, processes = effective_batch(recipe)
    log(
        f"effective batch {batch} completions = {batch // g.num_generations} prompt(s) × {g.num_generations} "
        f"generations ({recipe.training.per_device_batch_size} per device × {recipe.training.grad_accum} "
        f"accumulation × {processes} process(es)); precision {precision.name}; {len(data.train)} train prompts"
        + (f", {len(data.eval)} eval prompts" if data.eval is not None else "")
    )
    log(
        f"grpo: rewards {' + '.join(f'{w}×{f.__name__}' for f, w in zip(functions, weights))}; loss {g.loss_type}, "
        f"scale_rewards {g.scale_rewards}, temperature {g.temperature}, up to {g.max_completion_length} tokens per "
        f"completion, generated by {'vLLM' if g.use_vllm else 'transformers'}; beta {g.beta}, reference: {reference}"
    )
    arguments = trainer_arguments(recipe, precision, run_dir, has_eval=data.eval is not None)
    arguments["per_device_eval_batch_size"] = g.num_generations  # an eval batch is one prompt's group
    args = build_config(  # TRL refusing a trainer: combination is a QwentuneError
        GRPOConfig,
        recipe.trainer,
        **arguments,
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        beta=g.beta,
        loss_type=g.loss_type,
        scale_rewards=g.scale_rewards,
        use_vllm=g.use_vllm,
        reward_weights=weights,
        shuffle_dataset=recipe.training.shuffle,
    )
    metrics: dict = {
        "effective_batch": batch,
        "processes": processes,
        "trainable_tokens": new_tokens.to_dict(),
        "grpo": {"rewards": {f.__name__: w for f, w in zip(functions, weights)}, "num_generations": g.num_generations,
                 "max_completion_length": g.max_completion_length, "temperature": g.temperature, "beta": g.beta,
                 "loss_type": g.loss_type, "scale_rewards": g.scale_rewards, "reference": reference,
                 "prompts": len(data.train)},
    }  # fmt: skip
    patched = held.enter_context(contextlib.ExitStack())
    patched.enter_context(patches.fsdp_on_cpu())  # FSDP on CPU ranks is FSDP, not DDP (patches/sharding.py)
    GRPOTrainer = patched.enter_context(patches.trl_for_grpo(model))  # noqa: N806 - TRL patched for this trainer
    trainer = GRPOTrainer(  # checks that TRL generates from exactly our prompt ids
        model=model,
        reward_funcs=functions,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[MetricsFile(run_dir / "metrics.jsonl")],
        continuing=continuing,
    )
    settle_trainer(trainer, precision, patched)

    def train_run() -> TrainResult:
        # SIGTERM/SIGINT: a step finishes and is checkpointed, an evaluation stops at its next batch, then the run
        # exits saying what is resumable (stopping.py)
        with GracefulStop(recipe, run_dir).guard() as stop:
            with patched:  # construct, evaluate and train inside the patches; restored before saving and merging
                before = evaluate_before(trainer, stop) if data.eval is not None else lambda: None
                train_output = train_until_stopped(trainer, stop, checkpoint)
                metrics.update(train_output.metrics, global_step=train_output.global_step)
                if data.eval is not None:
                    metrics["eval_before"] = _eval_rewards(before())
                    metrics["eval_after"] = _eval_rewards(stop.evaluate(trainer, "the evaluation after training"))
            # rewards, their parts and the zero-variance share, first and last step: metrics.json and the card
            metrics["grpo"]["measured"] = measured(read_metrics(run_dir), [f.__name__ for f in functions])
            if continuing and "ref" in trainer.model.peft_config:
                trainer.model.delete_adapter("ref")  # save and merge the trained adapter only, not the reference
                trainer.model.set_adapter("default")
            return finish_run(
                recipe, trainer, run_dir, stop=stop, source=source, tokenizer=tokenizer, template=data.template,
                metrics=metrics, reports=reports, parity_rows=parity_rows_of(data), precision=precision,
                sample_prompt=prompt_of(sample_row_of(data)),
            )  # fmt: skip

    return Run(
        recipe=recipe, run_dir=run_dir, trainer=trainer, model=model, tokenizer=tokenizer, data=data, held=held,
        train=train_run,
    )  # fmt: skip


def _eval_rewards(metrics: dict | None) -> dict:
    """The reward keys of an evaluation ({} where a signal stopped it)."""
    return {k.removeprefix("eval_"): v for k, v in (metrics or {}).items() if "reward" in k}
