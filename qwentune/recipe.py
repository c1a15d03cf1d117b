"""Recipes: typed dataclass sections, loaded from YAML plus `a.b=value` overrides, every value checked up front.

Unknown keys are errors (with a did-you-mean), in the file and in overrides. A recipe is a plain tree of dataclasses,
so the notebook API and the CLI read the same object.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import QwentuneError, did_you_mean
from .inmemory import InMemoryData, public_value, stash, stash_in_memory
from .recipe_checks import MAX_LENGTH_CAP, OUTPUT_DIR_FIELDS, check_recipe  # noqa: F401 - re-exported
from .recipe_yaml import StrictLoader, key_in_message, line_of_key, read_yaml
from .trainer_fields import check_trainer_section

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = ("auto", "bfloat16", "float16", "float32")
NAME_MAX = 255  # the longest file name (bytes) of every common filesystem


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
    # files (jsonl/json/parquet/csv), datasets dirs, or hub ids; from Python also in-memory data (inmemory.py)
    train: list[str] = field(default_factory=list)
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
class EvalSection:
    """What `qwentune eval RECIPE_OR_RUN_DIR` (and, once wired, the end of training) scores."""

    enabled: bool = field(default=False, metadata={"help": "score the tuned model at the end of training"})
    data: list[str] = field(default_factory=list, metadata={"help": "eval files; empty: the recipe's data.eval"})
    limit: int | None = field(default=None, metadata={"help": "only the first N scoreable rows of each eval file"})
    base: bool = field(default=True, metadata={"help": "score the base model too, side by side with the tuned one"})
    max_new_tokens: int = field(default=256, metadata={"help": "greedy tokens per generated reply"})
    batch_size: int = field(default=8, metadata={"help": "prompts generated together (left-padded)"})


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
    eval: EvalSection = field(default_factory=EvalSection)
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
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 1 << 63:
                raise QwentuneError(
                    f"'{key}' is out of range: {value}", where=where, hint=f"set {key} to a smaller int"
                )
            return value
        raise _type_error(key, value, tp, where)
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            number = value
        if number is None:
            raise _type_error(key, value, tp, where)
        try:
            number = float(number)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise QwentuneError(
                f"'{key}' must be a finite number, got {value}", where=where, hint=f"set {key} to a plain number"
            )
        return number
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
    where = f"override '{text}'"
    if "=" not in text:
        raise QwentuneError(
            f"'{text}' has no '=' (expected section.key=value)", where="command line", hint="e.g. training.epochs=2"
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise QwentuneError("empty key (expected section.key=value)", where=where, hint="e.g. training.epochs=2")
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw.strip() else ""  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        if raw.strip()[:1] in ("[", "{", '"', "'"):  # meant as a list / mapping / quoted string: say what is wrong
            problem = getattr(e, "problem", None) or "cannot be parsed"
            raise QwentuneError(
                f"value {raw.strip()!r} is not valid YAML: {problem}",
                where=where,
                hint="close the brackets/quotes, e.g. peft.target_modules=[q_proj,v_proj]",
            ) from None
        value = raw  # plain text YAML cannot type (e.g. a system prompt with ': ' in it)
    return key.split("."), value


def _apply_override(tree: dict, parts: list[str], value: Any, raw: str) -> None:
    cls: type = Recipe
    node = tree
    where = f"override '{raw}'"
    for i, part in enumerate(parts):
        known = _fields(cls)
        dotted = ".".join(parts[: i + 1])
        if part not in known:
            hint = did_you_mean(part, known) or f"allowed keys here: {', '.join(known)}"
            raise QwentuneError(f"unknown key '{dotted}'", where=where, hint=hint)
        tp = typing.get_type_hints(cls)[part]
        if typing.get_origin(tp) is dict and len(parts) == i + 2:  # trainer.<field>=value
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node[part][parts[-1]] = value
            return
        if i == len(parts) - 1:
            if _is_section(tp):
                raise QwentuneError(
                    f"'{dotted}' is a section, not a value", where=where, hint=f"set {dotted}.<key>=value"
                )
            node[part] = value
            return
        if not _is_section(tp):
            raise QwentuneError(f"'{dotted}' is a value, not a section", where=where, hint=f"use {dotted}=...")
        sub = node.get(part)
        if not isinstance(sub, dict):
            sub = node[part] = {}
        node, cls = sub, tp


# ---------------------------------------------------------------- public entry points


def load_recipe(
    source: str | Path | dict,
    overrides: list[str] | dict | None = None,
    *,
    train_data: Any = None,
    eval_data: Any = None,
) -> Recipe:
    """A checked Recipe from a YAML path or a dict, with overrides (`["a.b=1"]` or `{"a.b": 1}`) applied first.

    From Python (a dict recipe, dict overrides, `train_data` / `eval_data`), data.train / data.eval may also be
    in memory: a datasets.Dataset, a DatasetDict split, or a list of row dicts (never from a YAML file).
    An error names the override a bad value came from, else the recipe file's line."""
    path: Path | None = None
    memory: dict[str, InMemoryData] = {}  # placeholder text in the tree → the in-memory source it stands for
    if isinstance(source, dict):
        tree, where = _deepcopy(stash_in_memory(source, memory)), "recipe"
    else:
        path = Path(source)
        where = str(path)
        if not os.path.isfile(path):
            raise QwentuneError("recipe file not found", where=where, hint="check the path; recipes live in recipes/")
        tree = read_yaml(path, where) or {}
        if not isinstance(tree, dict):
            raise QwentuneError("a recipe must be a mapping of sections", where=where, hint="see recipes/")
    if isinstance(overrides, dict):
        items = [(k.split("."), stash(v, memory, k), f"{k}={v}") for k, v in overrides.items()]
    else:
        items = [(*parse_override(o), o) for o in overrides or []]
    for which, value in (("train", train_data), ("eval", eval_data)):
        if value is not None:
            items.append((["data", which], stash(value, memory, f"{which}_data"), f"{which}_data"))
    origin: dict[str, str] = {}  # dotted key → the override that set it
    trainer_overrides: dict[str, str] = {}  # trainer field → the override that set it (errors name it)
    for parts, value, raw in items:
        _apply_override(tree, parts, value, raw)
        origin[".".join(parts)] = raw
        if parts[0] == "trainer" and len(parts) == 2:
            trainer_overrides[parts[1]] = raw
    try:
        recipe = _build(Recipe, tree, "", where)
        recipe.path = path
        for which in ("train", "eval"):  # the placeholders back to the objects they stand for
            setattr(recipe.data, which, [memory.get(v, v) for v in getattr(recipe.data, which)])
        check_recipe(recipe, where)
        recipe.trainer = check_trainer_section(recipe.trainer, recipe.method, where=where, overrides=trainer_overrides)
    except QwentuneError as e:
        raise _locate(e, where, path, origin) from None
    return recipe


def _locate(error: QwentuneError, where: str, path: Path | None, origin: dict[str, str]) -> QwentuneError:
    """Point an error about key 'a.b' at the override that set it, or at the recipe file's line that holds it."""
    key = key_in_message(error.message)
    if error.where != where or key is None:
        return error
    for dotted, raw in origin.items():
        if key == dotted or key.startswith((dotted + "[", dotted + ".")):
            return QwentuneError(error.message, where=f"override '{raw}'", hint=error.hint)
    line = line_of_key(path, key) if path is not None else None
    return QwentuneError(error.message, where=f"{path}:{line}", hint=error.hint) if line else error


def _deepcopy(tree: dict) -> dict:
    return yaml.safe_load(yaml.safe_dump(tree))


def dump_recipe(recipe: Recipe) -> str:
    tree = recipe.to_dict()
    for which in ("train", "eval"):  # in-memory data: a placeholder with its row count and fingerprint
        tree["data"][which] = public_value(tree["data"][which])
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


def resolve_path(recipe: Recipe, value: str) -> Path:
    """A path from the recipe: absolute, relative to the current dir if it exists there, else to the recipe's dir."""
    p = Path(value).expanduser()
    if any(len(os.fsencode(part)) > NAME_MAX for part in p.parts):  # else every later stat() is an OSError
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise QwentuneError(
            f"path '{shown}' has a name longer than {NAME_MAX} bytes",
            where=str(recipe.path or "recipe"),
            hint="check the path",
        )
    if p.is_absolute() or os.path.exists(p):  # os.path: False (not an error) for names too long for the filesystem
        return p
    return recipe.base_dir / p
