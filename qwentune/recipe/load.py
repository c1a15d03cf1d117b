"""Recipes loaded from YAML plus `a.b=value` overrides, every value checked up front.

Unknown keys are errors (with a did-you-mean), in the file and in overrides. A recipe is a plain tree of dataclasses
(`sections.py`), so the notebook API and the CLI read the same object.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import QwentuneError, did_you_mean
from .checks import MAX_LENGTH_CAP, OUTPUT_DIR_FIELDS, check_recipe  # noqa: F401 - re-exported
from .in_memory import InMemoryData, public_value, stash, stash_in_memory
from .sections import NAME_MAX, DataSource, Recipe
from .trainer_fields import check_trainer_section
from .yaml_file import StrictLoader, key_in_message, line_of_key, read_yaml

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
    if _is_section(tp):  # a mapping inside a list: data.train[0] as {path: ..., weight: ...}
        return _build(tp, value, key, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        # a mapping tries the mapping types first, so that its error (an unknown key, a bad value) is the one shown
        ordered = sorted(
            (a for a in args if a is not type(None)), key=lambda a: not (isinstance(value, dict) and _is_section(a))
        )
        for arg in ordered:
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
    if origin is dict:  # a mapping (trainer:, grpo.rewards): its keys are checked where their meaning is known
        if not isinstance(value, dict):
            raise _type_error(key, value, tp, where)
        if args and args[1] is not Any:  # typed values (grpo.rewards: name → weight)
            return {str(k): _coerce(v, args[1], f"{key}.{k}", where) for k, v in value.items()}
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
        if choices and value is not None and value not in choices:
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
            setattr(recipe.data, which, [_restore(v, memory) for v in getattr(recipe.data, which)])
        check_recipe(recipe, where)
        recipe.trainer = check_trainer_section(recipe.trainer, recipe.method, where=where, overrides=trainer_overrides)
    except QwentuneError as e:
        raise _locate(e, where, path, origin) from None
    return recipe


def _restore(entry: Any, memory: dict[str, InMemoryData]) -> Any:
    """A data entry with its in-memory placeholder (a plain entry, or a mapping entry's path) back to the object."""
    if isinstance(entry, DataSource):
        return dataclasses.replace(entry, path=memory.get(entry.path, entry.path))
    return memory.get(entry, entry)


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
    return path_in(recipe.base_dir, value, where=str(recipe.path or "recipe"))


def path_in(base_dir: Path, value: str, *, where: str = "recipe") -> Path:
    """The one rule for paths in a recipe: absolute, relative to the current dir if it exists there, else to
    `base_dir` (the recipe's dir). A name longer than the filesystem allows is an error here, not an OSError later."""
    p = Path(value).expanduser()
    if any(len(os.fsencode(part)) > NAME_MAX for part in p.parts):  # else every later stat() is an OSError
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise QwentuneError(
            f"path '{shown}' has a name longer than {NAME_MAX} bytes", where=where, hint="check the path"
        )
    if p.is_absolute() or os.path.exists(p):  # os.path: False (not an error) for names too long for the filesystem
        return p
    return Path(base_dir) / p
