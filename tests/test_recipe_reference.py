"""Every recipe key has a one-line help text in its dataclass field, and docs/recipe-reference.md is what
`python -m qwentune.recipe.reference docs/recipe-reference.md` writes from them (regenerate it after adding a key)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from qwentune.recipe.reference import COMMAND, reference_markdown
from qwentune.recipe.sections import Recipe

DOC = Path(__file__).resolve().parents[1] / "docs" / "recipe-reference.md"


def all_keys(cls: type = Recipe, prefix: str = "") -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        found[prefix + f.name] = f
        if dataclasses.is_dataclass(hints[f.name]):
            found.update(all_keys(hints[f.name], f"{prefix}{f.name}."))
    return found


def test_every_recipe_key_has_a_one_line_help_text():
    keys = all_keys()
    assert {"model.source", "peft.quant.bits", "training.max_steps", "eval.batch_size", "trainer"} <= set(keys)
    missing = sorted(k for k, f in keys.items() if not f.metadata.get("help", "").strip())
    assert not missing, f"recipe keys without help text (add help= in qwentune/recipe/sections.py): {missing}"
    long = sorted(k for k, f in keys.items() if len(f.metadata["help"]) > 160 or "\n" in f.metadata["help"])
    assert not long, f"help texts longer than one line: {long}"


def test_the_reference_lists_every_key_with_its_help_and_choices():
    text = reference_markdown()
    for name, f in all_keys().items():
        if dataclasses.is_dataclass(typing.get_type_hints(Recipe).get(name)) or name == "peft.quant":
            assert f"`{name}:`" in text, name
            continue
        line = next((ln for ln in text.splitlines() if ln.startswith(f"| `{name}` |")), None)
        assert line is not None, f"{name} missing from the reference"
        assert f.metadata["help"][1:].replace("|", "\\|") in line
        for choice in f.metadata.get("choices", ()):
            assert f"`{choice}`" in line


def test_docs_recipe_reference_is_current():
    assert DOC.read_text(encoding="utf-8") == reference_markdown(), f"docs/recipe-reference.md is stale: run {COMMAND}"
