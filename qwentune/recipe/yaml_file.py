"""Recipe YAML as a user writes it: read strictly (UTF-8, no duplicate keys), and find the line a key is on.

`yaml.safe_load` keeps the last of two equal keys without a word; `StrictLoader` is SafeLoader (same safe types, same
merge keys) that refuses them, naming both lines.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import QwentuneError


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping holding the same key twice (merge keys `<<` may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            ident = (key_node.tag, key_node.value)
            line = key_node.start_mark.line + 1
            if ident in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key_node.value}' (first on line {seen[ident]})", key_node.start_mark
                )
            seen[ident] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, where: str) -> Any:
    """The YAML document in `path` (safe types only), or a QwentuneError naming the file and line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise QwentuneError(f"cannot read the recipe: {e.strerror or e}", where=where, hint="check the path") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise QwentuneError(
            f"not UTF-8 text (byte {data[e.start]:#04x})", where=f"{where}:{line}", hint="save the recipe as UTF-8"
        ) from None
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark else where
        problem = getattr(e, "problem", None) or e
        raise QwentuneError(f"not valid YAML: {problem}", where=at, hint="check quoting and indentation") from None


def key_in_message(message: str) -> str | None:
    """The dotted recipe key ('training.epochs', 'data.train[0]') an error message names first, if any."""
    m = re.search(r"'([\w.\[\]]+)'", message)
    return m.group(1) if m else None


def line_of_key(path: Path, key: str) -> int | None:
    """The 1-based line of `path` where the dotted `key` is written (`data.train[1].weight`: into the list's second
    item), or None."""
    parts = [p for p in re.split(r"\.|(\[\d+\])", key) if p]
    try:
        node = yaml.compose(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return None
    line = None
    for part in parts:
        if part.startswith("["):
            index = int(part[1:-1])
            if not isinstance(node, yaml.SequenceNode) or index >= len(node.value):
                break
            node = node.value[index]
            line = node.start_mark.line + 1
            continue
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == part:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            break
    return line
