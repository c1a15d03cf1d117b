"""The recipe's `trainer:` section: fields of the installed TRL SFTConfig / DPOConfig / GRPOConfig passed through as
they are.

Checked up front against the dataclass of the recipe's method: unknown fields fail with a did-you-mean, fields
qwentune sets itself fail naming the recipe key to use instead, values are checked against the field's type. TRL is
imported only when the section is not empty (it is a heavy import; `qwentune --help` stays fast).
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import re
import types
import typing
from typing import Any

from ..errors import QwentuneError, did_you_mean

# Every SFTConfig/DPOConfig/GRPOConfig field qwentune sets (steps.trainer_arguments, sft/dpo/grpo.py) or replaces with
# its own pipeline (data rendering, model loading, the reference, checkpoints, hub pushes) → what to write instead.
OWNED: dict[str, str] = {
    "output_dir": "use output.dir",
    "per_device_train_batch_size": "use training.per_device_batch_size",
    "per_device_eval_batch_size": "use training.per_device_batch_size",
    "gradient_accumulation_steps": "use training.grad_accum",
    "learning_rate": "use training.learning_rate",
    "lr_scheduler_type": "use training.lr_scheduler",
    "warmup_steps": "use training.warmup_ratio",
    "num_train_epochs": "use training.epochs",
    "max_steps": "use training.max_steps",
    "weight_decay": "use training.weight_decay",
    "max_grad_norm": "use training.max_grad_norm",
    "optim": "use training.optim",
    "seed": "use training.seed",
    "data_seed": "use training.seed",
    "bf16": "use training.precision",
    "fp16": "use training.precision",
    "logging_steps": "use training.logging_steps",
    "eval_strategy": "use training.eval_steps",
    "eval_steps": "use training.eval_steps",
    "save_strategy": "use training.save_steps",
    "save_steps": "use training.save_steps",
    "save_total_limit": "use training.save_total_limit",
    "resume_from_checkpoint": "use training.resume (CLI: train --resume)",
    "gradient_checkpointing": "use training.gradient_checkpointing",
    "gradient_checkpointing_kwargs": "use training.gradient_checkpointing (qwentune enables it non-reentrant)",
    "activation_checkpointing": "use training.gradient_checkpointing",
    "activation_checkpointing_kwargs": "use training.gradient_checkpointing (qwentune enables it non-reentrant)",
    "enable_jit_checkpoint": "qwentune checkpoints on SIGTERM itself (continue with training.resume)",
    "dataloader_num_workers": "use training.dataloader_num_workers",
    "train_sampling_strategy": "use training.shuffle or sft.group_by_length",
    "report_to": "use logging.report_to",
    "run_name": "use logging.run_name",
    "push_to_hub": "use output.push_to_hub (pushes the verified merged model)",
    "use_cpu": "qwentune uses the GPU when one is visible (CUDA_VISIBLE_DEVICES= runs on the CPU)",
    "remove_unused_columns": "qwentune's rows carry exactly the columns the trainer reads",
    "disable_tqdm": "qwentune keeps the progress bar",
    "model_init_kwargs": "qwentune loads the model itself: use the model.* keys",
    "trust_remote_code": "use model.trust_remote_code",
    "max_length": "use data.max_length",
    "dataset_num_proc": "use data.num_proc",
    "truncation_mode": "use data.overlong",
}
OWNED_SFT: dict[str, str] = {
    "packing": "use sft.packing",
    "padding_free": "use sft.packing (packing is padding-free)",
    "packing_strategy": "use sft.packing (whole rows in bins, never cut)",
    "eval_packing": "use sft.packing",
    "shuffle_dataset": "use training.shuffle",
    "dataset_kwargs": "qwentune renders and tokenizes the data itself (data.*)",
    "dataset_text_field": "qwentune renders and tokenizes the data itself (data.*)",
    "chat_template_path": "use data.template",
    "eos_token": "use data.template (the template's end-of-turn token)",
    "assistant_only_loss": "use data.train_on (qwentune's labels are exact template masks)",
    "completion_only_loss": "use data.train_on (qwentune's labels are exact template masks)",
}
OWNED_DPO: dict[str, str] = {
    "beta": "use dpo.beta",
    "loss_type": "use dpo.loss_type",
    "loss_weights": "use dpo.loss_weights",
    "label_smoothing": "use dpo.label_smoothing",
    "precompute_ref_log_probs": "use dpo.precompute_ref_log_probs",
}
OWNED_GRPO: dict[str, str] = {
    "num_generations": "use grpo.num_generations",
    "max_completion_length": "use grpo.max_completion_length",
    "temperature": "use grpo.temperature",
    "beta": "use grpo.beta",
    "loss_type": "use grpo.loss_type",
    "scale_rewards": "use grpo.scale_rewards",
    "use_vllm": "use grpo.use_vllm",
    "reward_weights": "use grpo.rewards (name: weight)",
    "shuffle_dataset": "use training.shuffle",
    "chat_template_kwargs": "use data.template (qwentune renders the prompts itself)",
}
CONFIGS = {"sft": "SFTConfig", "dpo": "DPOConfig", "grpo": "GRPOConfig"}  # the TRL config of each method


def owned_fields(method: str) -> dict[str, str]:
    """The fields a `trainer:` section may not set for `method`, each with what to write instead."""
    return {**OWNED, **{"sft": OWNED_SFT, "dpo": OWNED_DPO, "grpo": OWNED_GRPO}[method]}


@functools.cache
def config_fields(method: str) -> dict[str, Any]:
    """Field name → type annotation of the installed TRL config for `method` (SFTConfig, DPOConfig, GRPOConfig)."""
    import trl

    return typing.get_type_hints(getattr(trl, CONFIGS[method]))


def check_trainer_section(
    values: dict[str, Any], method: str, *, where: str, overrides: dict[str, str] | None = None
) -> dict[str, Any]:
    """`values` checked against the installed TRL config of `method`; the values with numbers coerced. `overrides`:
    field → the command-line override that set it (errors then name the override instead of the file)."""
    if not values:
        return {}
    overrides = overrides or {}
    owned = owned_fields(method)
    known = config_fields(method)
    config = CONFIGS[method]
    checked = {}
    for name, value in values.items():
        key = f"trainer.{name}"
        at = where
        suffix = ""
        if name in overrides:
            at, suffix = "command line", f" in override '{overrides[name]}'"
        if name in owned:
            instead = owned[name]
            raise QwentuneError(f"'{key}' is set by qwentune{suffix}", where=at, hint=instead)
        if name not in known:
            other = next((m for m in CONFIGS if m != method and _settable(name, m)), None)
            if other is not None:
                hint = f"it is a {CONFIGS[other]} field; this recipe's method is {method}"
            else:
                candidates = [f for f in known if f not in owned]
                hint = did_you_mean(str(name), candidates) or f"a field of the installed TRL {config}"
            raise QwentuneError(f"unknown key '{key}'{suffix} (not a TRL {config} field)", where=at, hint=hint)
        try:
            checked[name] = _coerce(value, known[name])
        except _Mismatch as e:
            raise QwentuneError(
                f"'{key}'{suffix} must be {_type_name(known[name])}, got {type(value).__name__} {value!r}",
                where=at,
                hint=e.hint or f"see TRL's {config}.{name}",
            ) from None
    if checked.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        at = "command line" if "use_liger_kernel" in overrides else where
        raise QwentuneError(
            "'trainer.use_liger_kernel' is true but liger-kernel is not installed",
            where=at,
            hint="pip install liger-kernel",
        )
    return checked


def _settable(name: str, method: str) -> bool:
    return name in config_fields(method) and name not in owned_fields(method)


class _Mismatch(Exception):
    def __init__(self, hint: str | None = None):
        self.hint = hint


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(value: Any, tp: Any) -> Any:
    """`value` as the annotation `tp` takes it; numbers YAML reads as text (`1e-4`) become floats. Types a recipe
    cannot write (class instances) refuse every value; anything else not simple is left to TRL's own checks."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hints = []
        for arg in _alternatives(args):
            try:
                return _coerce(value, arg)
            except _Mismatch as e:
                hints.append(e.hint)
        raise _Mismatch(next((h for h in hints if h), None))
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch(did_you_mean(str(value), map(str, args)) or f"one of {', '.join(map(str, args))}")
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch()
        return [_coerce(v, args[0]) if args else v for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch()
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        choices = [m.value for m in tp]
        if value in choices:
            return value
        raise _Mismatch(did_you_mean(str(value), map(str, choices)) or f"one of {', '.join(map(str, choices))}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        raise _Mismatch()
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch()
    raise _Mismatch("this field takes an object a recipe cannot write")


def _alternatives(args: tuple) -> list:
    """A union's types, None left out; `SomeEnum | str` is the enum (TRL turns the text into a member, or fails)."""
    inner = [a for a in args if a is not type(None)]
    if any(isinstance(a, type) and issubclass(a, enum.Enum) for a in inner):
        inner = [a for a in inner if a is not str]
    return inner


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = _alternatives(args)
        return " or ".join(_type_name(a) for a in inner) + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def build_config(config_cls: type, passed: dict[str, Any], **arguments: Any) -> Any:
    """`config_cls(**arguments)`; when TRL/transformers refuse a combination that the `trainer:` section (`passed`)
    takes part in (e.g. load_best_model_at_end without matching strategies), a QwentuneError instead of a traceback."""
    try:
        return config_cls(**arguments)
    except (ValueError, ImportError) as e:
        if not passed:
            raise
        raise QwentuneError(
            f"TRL's {config_cls.__name__} refused these settings: {' '.join(str(e).split())}",
            where=", ".join(f"trainer.{name}" for name in passed),
            hint="check the trainer: fields against the TRL docs (the other values come from the recipe's keys)",
        ) from None
