"""`docs/recipe-reference.md`: every recipe key with its type, default, allowed values and help, generated from the
dataclass fields in `sections.py` (the one place a key is declared). Regenerate after adding a key:

    python -m qwentune.recipe.reference docs/recipe-reference.md

tests/test_recipe_reference.py fails while the file in docs/ differs from what this writes.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from pathlib import Path

import yaml

from .load import _fields, _is_section, _type_name
from .sections import Recipe

COMMAND = "python -m qwentune.recipe.reference docs/recipe-reference.md"


def _default(f: dataclasses.Field) -> str:
    """The default as a YAML value."""
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None or value == "" or value == [] or value == {}:
        return "empty"
    return f"`{yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix('...').strip()}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _entry_type(tp: type) -> type | None:
    """The mapping type a list key's items may be (data.train: list[str | DataSource]), or None."""
    if typing.get_origin(tp) is not list:
        return None
    inner = typing.get_args(tp)[0]
    return next((a for a in typing.get_args(inner) if _is_section(a)), None)


def _rows(cls: type, prefix: str) -> tuple[list[str], list[tuple[str, type]]]:
    hints = typing.get_type_hints(cls)
    rows, sections = [], []
    for name, f in _fields(cls).items():
        tp = hints[name]
        if _is_section(tp):
            sections.append((prefix + name, tp))
            continue
        entry = _entry_type(tp)
        if entry is not None and (prefix + name + "[]", entry) not in sections:
            sections.append((prefix + name + "[]", entry))
        choices = f.metadata.get("choices")
        allowed = f" One of: {', '.join(f'`{c}`' for c in choices)}." if choices else ""
        help_text = f.metadata["help"][0].upper() + f.metadata["help"][1:]
        kind = "list of path or mapping" if _entry_type(tp) is not None else _type_name(tp)
        rows.append(f"| `{prefix}{name}` | {kind} | {_default(f)} | {_cell(help_text)}.{allowed} |")
    return rows, sections


def reference_markdown() -> str:
    out = [
        "# Recipe reference",
        "",
        "Every key a recipe YAML (or a `section.key=value` override) may set; any other key is an error.",
        "Generated from the dataclass fields in `qwentune/recipe/sections.py` (edit the help text there, not here) by",
        f"`{COMMAND}`.",
        "`empty` is YAML's `null` (or nothing): the key's documented fallback applies.",
        "",
    ]
    queue: list[tuple[str, type, str]] = [("", Recipe, "Top level")]
    hints = typing.get_type_hints(Recipe)
    for name, f in _fields(Recipe).items():
        if _is_section(hints[name]):
            queue.append((f"{name}.", hints[name], f"`{name}:` — {f.metadata['help']}"))
    while queue:
        prefix, cls, title = queue.pop(0)
        rows, nested = _rows(cls, prefix)
        entries = [(name, tp) for name, tp in nested if name.endswith("[]")]
        if entries:  # the items of list keys written as mappings (data.train[], data.eval[]): one table
            names = " and ".join(f"`{name}`" for name, _ in entries)
            doc = " ".join(inspect.cleandoc(entries[0][1].__doc__ or "").split())
            queue.insert(0, (f"{entries[0][0]}.", entries[0][1], f"{names}: {doc}"))
        for name, tp in reversed(nested):
            if name.endswith("[]"):
                continue
            if prefix:  # sections inside a section (peft.quant) follow their parent
                parent = _fields(cls)[name.rsplit(".", 1)[1]]
                queue.insert(0, (f"{name}.", tp, f"`{name}:` — {parent.metadata['help']}"))
        if rows:
            out += [f"## {title}", "", "| key | type | default | what it does |", "|---|---|---|---|", *rows, ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = reference_markdown()
    if not args:
        sys.stdout.write(text)
        return 0
    Path(args[0]).write_text(text, encoding="utf-8")
    print(f"wrote {args[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
