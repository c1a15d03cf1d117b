"""Recipes: typed dataclass sections, loaded from YAML plus `a.b=value` overrides, every value checked up front.

Unknown keys are errors (with a did-you-mean), in the file and in overrides. A recipe is a plain tree of dataclasses,
so the notebook API and the CLI read the same object.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import QwentuneError, did_you_mean
from .trainer_fields import check_trainer_section

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = ("auto", "bfloat16", "float16", "float32")


def _choices(*values: Any, help: str = "") -> dict:
    return {"choices": values, "help": help}


@dataclass
class ModelSection:
    source: str = ""  # hub id | local dir | .gguf file | offline:qwen2.5-coder-0.5b-instruct
    adapter: str | None = None  # an adapter dir to keep training (e.g. DPO after SFT); None: a fresh adapter
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = field(default="auto", metadata=_choices(*DTYPES))
    attn_implementation: str = field(default="sdpa", metadata=_choices("sdpa", "eager", "flash_attention_2"))
    # Qwen2-VL image processor limits (pixels); ignored for text models.
    min_pixels: int | None = None
    max_pixels: int | None = None


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)  # files (jsonl/json/parquet/csv), datasets dirs, or hub ids
    eval: list[str] = field(default_factory=list)
    eval_fraction: float = 0.0  # carve an eval split out of train when `eval` is empty
    format: str = field(
        default="auto", metadata=_choices("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "preference")
    )
    # "model" (the tokenizer's own) | qwen2.5-instruct | qwen2.5-base | qwen2-instruct | qwen2-vl-instruct | a path
    template: str = "model"
    tools: str | None = None  # a JSON file with tools offered to every row that has none
    system_prompt: str | None = None  # a system message put first in rows that have none
    max_length: int = 2048
    overlong: str = field(default="drop", metadata=_choices("drop", "truncate", "error"))
    bad_rows: str = field(default="skip", metadata=_choices("skip", "error"))
    train_on: str = field(default="all", metadata=_choices("all", "last"))
    limit: int | None = None  # use only the first N rows of each file (for quick runs)
    eval_limit: int | None = None  # use only the first N rows of each data.eval file
    num_proc: int = 1
    split: str = "train"  # split name for hub / saved datasets
    seed: int = 42  # for the eval_fraction split


@dataclass
class SFTSection:
    packing: bool = False  # padding-free packing with position_ids; no attention across rows
    group_by_length: bool = False


@dataclass
class DPOSection:
    beta: float = 0.1
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    reference: str | None = None  # explicit reference model source; default: the policy with the adapter disabled
    precompute_ref_log_probs: bool = False
    rpo_alpha: float | None = None


@dataclass
class QuantSection:
    bits: int = field(default=4, metadata=_choices(4, 8))
    quant_type: str = field(default="nf4", metadata=_choices("nf4", "fp4"))
    double_quant: bool = True
    compute_dtype: str = field(default="bfloat16", metadata=_choices("bfloat16", "float16", "float32"))


@dataclass
class PeftSection:
    method: str = field(default="lora", metadata=_choices("lora", "qlora"))
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    # Special/added tokens in the trained labels whose embedding rows look untrained get trainable rows.
    train_new_tokens: str = field(default="auto", metadata=_choices("auto", "off"))
    # Qwen2-VL only: off (vision tower and merger frozen) | merger (LoRA also on the merger MLP) | all (LoRA also on
    # every vision block's qkv/proj/fc1/fc2 and the merger). Text models refuse anything but off.
    train_vision: str = field(default="off", metadata=_choices("off", "merger", "all"))
    quant: QuantSection = field(default_factory=QuantSection)


@dataclass
class TrainingSection:
    learning_rate: float = 2e-4
    lr_scheduler: str = field(
        default="cosine", metadata=_choices("cosine", "linear", "constant", "constant_with_warmup")
    )
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    per_device_batch_size: int = 1
    grad_accum: int = 8
    seed: int = 42
    precision: str = field(default="auto", metadata=_choices(*PRECISIONS))
    gradient_checkpointing: bool = True
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    logging_steps: int = 1
    eval_steps: int | None = None  # None: evaluate at the end of each epoch when there is an eval split
    save_steps: int | None = None  # periodic checkpoints; None: none
    save_total_limit: int = 2
    dataloader_num_workers: int = 0
    shuffle: bool = True  # false: rows in file order (multi-process runs then match one process with accumulation)
    resume: bool = False  # continue from the run dir's newest complete checkpoint (CLI: train --resume)


@dataclass
class OutputSection:
    dir: str = "runs/{model}-{method}-{peft}"
    merge: bool = True
    qlora_merge: str = field(default="dequantized", metadata=_choices("dequantized", "original"))
    overwrite: bool = False
    # After merging: greedy generation from the merged model (plain transformers) for the first eval (or train)
    # prompt, printed and saved to sample.txt; 0 turns it off.
    sample_tokens: int = 128
    push_to_hub: str | None = None  # OWNER/NAME: after a verified merge, upload merged/ and its card


@dataclass
class LoggingSection:
    report_to: list[str] = field(default_factory=list)  # wandb | tensorboard | mlflow | ... (REPORT_TO)
    project: str = "qwentune"
    run_name: str | None = None


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    method: str = field(default="sft", metadata=_choices("sft", "dpo"))
    sft: SFTSection = field(default_factory=SFTSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    peft: PeftSection = field(default_factory=PeftSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    output: OutputSection = field(default_factory=OutputSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    # Fields of the installed TRL SFTConfig/DPOConfig (for `method`) that qwentune does not set, passed through as
    # they are (neftune_noise_alpha, use_liger_kernel, torch_compile, ...); checked by trainer_fields.
    trainer: dict[str, Any] = field(default_factory=dict)
    # Where the recipe came from (not a recipe key): relative data paths resolve against its directory.
    path: Path | None = field(default=None, metadata={"internal": True}, compare=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "path"}

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()


# The integrations transformers reports to (transformers.integrations.INTEGRATION_TO_CALLBACK).
REPORT_TO = ("wandb", "tensorboard", "mlflow", "trackio", "comet_ml", "neptune", "clearml", "azure_ml", "dagshub",
             "dvclive", "flyte", "kubeflow", "codecarbon", "swanlab")  # fmt: skip


# ---------------------------------------------------------------- building from plain data


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + (" or null" if len(inner) < len(args) else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`; accept what YAML gets wrong (e.g. `2e-4` read as a string)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, where)
            except QwentuneError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if isinstance(value, (str, int, float, bool)) and not isinstance(value, list):
            value = [value]  # a single value where a list is expected: `train: data.jsonl`
        if not isinstance(value, list):
            raise _type_error(key, value, tp, where)
        return [_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:  # a free mapping (trainer:): its keys are checked where their meaning is known
        if not isinstance(value, dict):
            raise _type_error(key, value, tp, where)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, value, tp, where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _type_error(key, value, tp, where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        raise _type_error(key, value, tp, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, value, tp, where)
    raise TypeError(f"unsupported recipe type {tp!r} for {key}")


def _type_error(key: str, value: Any, tp: Any, where: str) -> QwentuneError:
    return QwentuneError(
        f"'{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}",
        where=where,
        hint=f"set {key} to a {_type_name(tp)} value",
    )


def _build(cls: type, data: Any, prefix: str, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise QwentuneError(
            f"'{prefix or 'recipe'}' must be a mapping of keys, got {type(data).__name__}",
            where=where,
            hint="check the indentation",
        )
    known = _fields(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            hint = did_you_mean(str(key), known) or f"allowed keys here: {', '.join(known)}"
            raise QwentuneError(f"unknown key '{full}'", where=where, hint=hint)
        tp = hints[key]
        if _is_section(tp):
            kwargs[key] = _build(tp, value, full, where)
            continue
        choices = known[key].metadata.get("choices")
        if value is False and choices and "off" in choices:
            value = "off"  # YAML 1.1 reads a bare `off` as false
        value = _coerce(value, tp, full, where)
        if choices and value not in choices:
            hint = did_you_mean(str(value), [str(c) for c in choices]) or ""
            raise QwentuneError(
                f"'{full}' must be one of {', '.join(map(str, choices))}; got {value!r}",
                where=where,
                hint=hint or f"pick one of {', '.join(map(str, choices))}",
            )
        kwargs[key] = value
    return cls(**kwargs)


# ---------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.learning_rate=1e-4` → (['training', 'learning_rate'], 1e-4), values typed by YAML rules."""
    if "=" not in text:
        raise QwentuneError(
            f"override '{text}' has no '='", where="command line", hint="write overrides as section.key=value"
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise QwentuneError(f"override '{text}' has an empty key", where="command line", hint="e.g. training.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _apply_override(tree: dict, parts: list[str], value: Any, raw: str) -> None:
    cls: type = Recipe
    node = tree
    for i, part in enumerate(parts):
        known = _fields(cls)
        dotted = ".".join(parts[: i + 1])
        if part not in known:
            hint = did_you_mean(part, known) or f"allowed keys here: {', '.join(known)}"
            raise QwentuneError(f"unknown key '{dotted}' in override '{raw}'", where="command line", hint=hint)
        tp = typing.get_type_hints(cls)[part]
        if typing.get_origin(tp) is dict and len(parts) == i + 2:  # trainer.<field>=value
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node[part][parts[-1]] = value
            return
        if i == len(parts) - 1:
            if _is_section(tp):
                raise QwentuneError(
                    f"'{dotted}' is a section, not a value", where="command line", hint=f"set {dotted}.<key>=value"
                )
            node[part] = value
            return
        if not _is_section(tp):
            raise QwentuneError(
                f"'{dotted}' is a value, not a section", where="command line", hint=f"use {dotted}=..."
            )
        sub = node.get(part)
        if not isinstance(sub, dict):
            sub = node[part] = {}
        node, cls = sub, tp


# ---------------------------------------------------------------- checks across keys


def _check(recipe: Recipe, where: str) -> None:
    def fail(key: str, message: str, hint: str) -> None:
        raise QwentuneError(f"'{key}' {message}", where=where, hint=hint)

    if not recipe.model.source:
        fail("model.source", "is required", "a hub id, local dir, .gguf file or offline:qwen2.5-coder-0.5b-instruct")
    if not recipe.data.train:
        fail("data.train", "is required", "one or more data files, e.g. data/tool_calls.jsonl")
    if not 0.0 <= recipe.data.eval_fraction < 1.0:
        fail("data.eval_fraction", f"must be in [0, 1), got {recipe.data.eval_fraction}", "e.g. 0.05")
    if recipe.data.max_length < 16:
        fail("data.max_length", f"must be at least 16, got {recipe.data.max_length}", "e.g. 2048")
    if recipe.data.num_proc < 1:
        fail("data.num_proc", "must be ≥ 1", "e.g. 4")
    t = recipe.training
    for key, value in (("per_device_batch_size", t.per_device_batch_size), ("grad_accum", t.grad_accum)):
        if value < 1:
            fail(f"training.{key}", f"must be ≥ 1, got {value}", "e.g. 1")
    if t.learning_rate <= 0:
        fail("training.learning_rate", "must be > 0", "e.g. 2e-4")
    if t.max_steps <= 0 and t.epochs <= 0:
        fail("training.epochs", "must be > 0 when training.max_steps is not set", "e.g. epochs: 1 or max_steps: 100")
    if not 0.0 <= t.warmup_ratio < 1.0:
        fail("training.warmup_ratio", "must be in [0, 1)", "e.g. 0.03")
    p = recipe.peft
    if p.r < 1:
        fail("peft.r", "must be ≥ 1", "e.g. 16")
    if not 0.0 <= p.dropout < 1.0:
        fail("peft.dropout", "must be in [0, 1)", "e.g. 0.05")
    if p.method == "qlora" and p.quant.bits != 4:
        fail("peft.quant.bits", "must be 4 for QLoRA merges to be exact", "use bits: 4 (nf4)")
    for target in recipe.logging.report_to:
        if target not in REPORT_TO:
            hint = did_you_mean(target, REPORT_TO) or "wandb or tensorboard"
            fail("logging.report_to", f"has unknown target {target!r}", hint)
    d = recipe.dpo
    if d.beta <= 0:
        fail("dpo.beta", "must be > 0", "e.g. 0.1")
    if d.loss_weights is not None and len(d.loss_weights) != len(d.loss_type):
        fail("dpo.loss_weights", f"needs one weight per loss_type ({len(d.loss_type)})", "e.g. [1.0, 0.5]")
    if recipe.method == "sft" and recipe.data.format == "preference":
        fail("data.format", "is 'preference' but method is sft", "use method: dpo, or a conversation format")


# ---------------------------------------------------------------- public entry points


def load_recipe(source: str | Path | dict, overrides: list[str] | dict | None = None) -> Recipe:
    """A checked Recipe from a YAML path or a dict, with overrides (`["a.b=1"]` or `{"a.b": 1}`) applied first."""
    path: Path | None = None
    if isinstance(source, dict):
        tree, where = _deepcopy(source), "recipe"
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise QwentuneError("recipe file not found", where=where, hint="check the path; recipes live in recipes/")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f"{where}:{mark.line + 1}" if mark else where
            problem = getattr(e, "problem", e)
            raise QwentuneError(f"not valid YAML: {problem}", where=at, hint="check quoting and indentation") from None
        tree = tree or {}
        if not isinstance(tree, dict):
            raise QwentuneError("a recipe must be a mapping of sections", where=where, hint="see recipes/")
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    trainer_overrides: dict[str, str] = {}  # trainer field → the override that set it (errors name it)
    for raw_parts, value in items:
        parts = raw_parts.split(".") if isinstance(raw_parts, str) else raw_parts
        raw = f"{'.'.join(parts)}={value}"
        _apply_override(tree, parts, value, raw)
        if parts[0] == "trainer" and len(parts) == 2:
            trainer_overrides[parts[1]] = raw
    try:
        recipe = _build(Recipe, tree, "", where)
        recipe.trainer = check_trainer_section(recipe.trainer, recipe.method, where=where, overrides=trainer_overrides)
    except QwentuneError as e:
        if path is not None and e.where == where:
            e = _with_line(e, path)
        raise e from None
    recipe.path = path
    _check(recipe, where)
    return recipe


def _with_line(error: QwentuneError, path: Path) -> QwentuneError:
    """Point an error about key 'a.b' at the line of the YAML file where that key is written."""
    m = re.search(r"'([\w.\[\]]+)'", error.message)
    if not m:
        return error
    parts = re.sub(r"\[\d+\]", "", m.group(1)).split(".")
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return error
    line = None
    for part in parts:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == part:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            break
    if line is None:
        return error
    return QwentuneError(error.message, where=f"{path}:{line}", hint=error.hint)


def _deepcopy(tree: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(tree))


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)


def resolve_path(recipe: Recipe, value: str) -> Path:
    """A path from the recipe: absolute, relative to the current dir if it exists there, else to the recipe's dir."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return recipe.base_dir / p
