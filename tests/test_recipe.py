"""Recipes: every shipped recipe validates; bad keys, types and values fail up front, naming the key (and line)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qwentune.errors import QwentuneError
from qwentune.recipe.checks import MAXIMUMS, MINIMUMS
from qwentune.recipe.load import dump_recipe, load_recipe, parse_override
from qwentune.training.validate import validate_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
MINIMAL = {"model": {"source": "Qwen/Qwen2.5-0.5B-Instruct"}, "data": {"train": "data/tool_calls.jsonl"}}


def qwentune(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwentune", *args], cwd=cwd, capture_output=True, text=True)


def test_there_is_a_recipe_for_every_seed_model():
    models = {p.parent.name for p in RECIPES}
    assert {
        "qwen2.5-0.5b",
        "qwen2.5-0.5b-instruct",
        "qwen2.5-3b-instruct",
        "qwen2-0.5b-instruct",
        "qwen2-vl-2b-instruct",
    } <= models


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_recipe_validates_and_starts_with_its_command(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    first = path.read_text().splitlines()[0]
    rel = path.relative_to(ROOT)
    assert first.startswith("# ") and str(rel) in first and ("qwentune train" in first), first
    lines = validate_recipe(rel)
    assert lines[0].endswith("ok")
    recipe = load_recipe(rel)
    assert path.parent.name.split("-offline")[0] in path.parent.name  # layout recipes/<model>/<method>_<peft>.yaml
    assert path.stem.split("_")[0] == recipe.method
    assert path.stem.split("_")[1] == recipe.peft.method


def test_types_are_checked_and_coerced():
    recipe = load_recipe({**MINIMAL, "training": {"learning_rate": "2e-4", "epochs": 2}})
    assert recipe.training.learning_rate == 2e-4 and recipe.training.epochs == 2.0
    assert recipe.data.train == ["data/tool_calls.jsonl"]  # a single value where a list is expected
    with pytest.raises(QwentuneError, match=r"'training.max_steps' must be int"):
        load_recipe({**MINIMAL, "training": {"max_steps": "ten"}})
    with pytest.raises(QwentuneError, match=r"'peft.use_dora' must be bool"):
        load_recipe({**MINIMAL, "peft": {"use_dora": "yes"}})
    with pytest.raises(
        QwentuneError, match=r"'data.overlong' must be one of drop, truncate, error.*did you mean 'drop'"
    ):
        load_recipe({**MINIMAL, "data": {"train": "x", "overlong": "dorp"}})


def test_unknown_keys_fail_with_did_you_mean_and_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "training": {"learning_rte": 1e-4}}, sort_keys=False))
    with pytest.raises(QwentuneError) as err:
        load_recipe(path)
    text = str(err.value)
    assert "training.learning_rte" in text and "did you mean 'learning_rate'" in text
    assert f"{path}:6" in text  # the line where the key is written


def test_overrides_are_typed_and_unknown_override_keys_fail():
    recipe = load_recipe(
        MINIMAL,
        ["training.max_steps=7", "training.learning_rate=1e-5", "peft.target_modules=[q_proj,v_proj]",
         "output.merge=false", "model.revision=main"],
    )  # fmt: skip
    assert recipe.training.max_steps == 7 and recipe.training.learning_rate == 1e-5
    assert recipe.peft.target_modules == ["q_proj", "v_proj"] and recipe.output.merge is False
    with pytest.raises(QwentuneError, match=r"override 'peft.rank=8': unknown key 'peft.rank'"):
        load_recipe(MINIMAL, ["peft.rank=8"])
    with pytest.raises(QwentuneError, match="is a section"):
        load_recipe(MINIMAL, ["peft=3"])
    with pytest.raises(QwentuneError, match="'training.max_steps' has no '='"):
        parse_override("training.max_steps")


def test_cross_key_checks():
    with pytest.raises(QwentuneError, match="data.eval_fraction"):
        load_recipe({**MINIMAL, "data": {"train": "x", "eval_fraction": 1.5}})
    with pytest.raises(QwentuneError, match="dpo.loss_weights"):
        load_recipe({**MINIMAL, "dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}})
    with pytest.raises(QwentuneError, match="model.source"):
        load_recipe({"data": {"train": "x"}})


def test_dump_round_trips():
    recipe = load_recipe(MINIMAL, ["training.max_steps=3"])
    again = load_recipe(yaml.safe_load(dump_recipe(recipe)))
    assert again == recipe


def test_cli_help_and_exit_codes(tmp_path):
    out = qwentune("--help")
    assert out.returncode == 0
    for command in ("validate", "preprocess", "preview", "train", "merge"):
        assert command in out.stdout
    good = ROOT / "recipes/qwen2.5-0.5b-instruct/sft_lora.yaml"
    assert qwentune("validate", str(good)).returncode == 0

    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("  max_length:", "  max_lenght:"))
    out = qwentune("validate", str(bad))
    assert out.returncode == 2 and "data.max_lenght" in out.stderr and "max_length" in out.stderr

    out = qwentune("validate", str(good), "training.epocs=3")
    assert out.returncode == 2 and "training.epocs" in out.stderr and "did you mean 'epochs'" in out.stderr

    out = qwentune("validate", str(good), "data.train=missing.jsonl")
    assert out.returncode == 2 and "missing.jsonl" in out.stderr

    out = qwentune("validate", str(good), "model.source=/nonexistent/model")
    assert out.returncode == 2 and "/nonexistent/model" in out.stderr

    out = qwentune("validate", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "recipe file not found" in out.stderr


def test_tools_on_a_template_without_tool_support_is_refused():
    with pytest.raises(QwentuneError, match="no tool support"):
        validate_recipe(
            ROOT / "recipes/qwen2-0.5b-instruct/sft_lora.yaml", [f"data.train={ROOT}/data/tool_calls.jsonl"]
        )


def test_yaml_off_is_read_as_the_choice_off(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {source: x}\ndata: {train: a.jsonl}\npeft:\n  train_new_tokens: off\n")
    assert load_recipe(path).peft.train_new_tokens == "off"  # YAML 1.1 reads a bare `off` as false


@pytest.mark.parametrize("key", sorted(MINIMUMS))
def test_every_number_key_has_its_lower_bound(key):
    minimum, _ = MINIMUMS[key]
    strict = key == "training.learning_rate"
    below = minimum if strict else minimum - 1
    with pytest.raises(QwentuneError, match=rf"^override '{re.escape(key)}={below}': '{re.escape(key)}' must be"):
        load_recipe(MINIMAL, [f"{key}={below}"])
    if not strict:
        assert load_recipe(MINIMAL, [f"{key}={minimum}"]) is not None


@pytest.mark.parametrize("key, too_big", [*((k, v + 1) for k, v in MAXIMUMS.items()), ("training.seed", 2**32)])
def test_counts_that_would_start_thousands_of_processes_or_overflow_are_refused(key, too_big):
    with pytest.raises(QwentuneError, match=rf"'{re.escape(key)}' must be"):
        load_recipe(MINIMAL, [f"{key}={too_big}"])


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e400", "nan"])
def test_non_finite_floats_are_refused(value):
    with pytest.raises(QwentuneError, match=r"'training.learning_rate' must be (a finite number|float)"):
        load_recipe(MINIMAL, [f"training.learning_rate={value}"])
    with pytest.raises(QwentuneError, match=r"^recipe: 'dpo.loss_weights\[1\]' must be a finite number"):
        load_recipe({**MINIMAL, "dpo": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, float("inf")]}})


def test_checks_across_keys_name_the_file_line_or_the_override(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  source: m\ndata:\n  train: x.jsonl\n  limit: -5\n")
    with pytest.raises(QwentuneError, match=rf"^{re.escape(str(path))}:5: 'data.limit' must be ≥ 1, got -5"):
        load_recipe(path)
    with pytest.raises(QwentuneError, match=r"^override 'data.limit=0': 'data.limit' must be ≥ 1, got 0"):
        load_recipe(MINIMAL, ["data.limit=0"])
    with pytest.raises(QwentuneError, match=r"^override 'data.limit=-1': "):  # the API's dict overrides too
        load_recipe(MINIMAL, {"data.limit": -1})


@pytest.mark.parametrize(
    "template, ok",
    [("runs/{model}-{method}-{peft}", True), ("out/{{literal}}", True), ("out/{foo}", False), ("out/{model!r}", False),
     ("out/{model:>9}", False), ("out/{0}", False), ("out/{model", False), ("out/}", False)],
)  # fmt: skip
def test_output_dir_placeholders(template, ok):
    if ok:
        assert load_recipe(MINIMAL, {"output.dir": template}).output.dir == template
    else:
        with pytest.raises(QwentuneError, match=r"'output.dir' (has an unknown placeholder|is not a valid path temp)"):
            load_recipe(MINIMAL, {"output.dir": template})


def test_duplicate_keys_are_refused_at_every_depth_but_merge_keys_still_work(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  source: a\ndata:\n  train: x\n  limit: 1\n  limit: 2\n")
    with pytest.raises(
        QwentuneError, match=rf"^{re.escape(str(path))}:6: .*duplicate key 'limit' \(first on line 5\)"
    ):
        load_recipe(path)
    path.write_text("base: &b\n  source: a\nmodel:\n  <<: *b\n  source: c\ndata:\n  train: x\n")
    with pytest.raises(QwentuneError, match="unknown key 'base'"):  # merge keys parse; `base` is just not a section
        load_recipe(path)


def test_override_values_yaml_cannot_parse():
    assert parse_override("data.system_prompt=Note: a: b") == (
        ["data", "system_prompt"],
        "Note: a: b",
    )  # text YAML cannot type
    for bad in ("peft.target_modules=[q_proj", "data.train={a: 1", "data.system_prompt='unclosed"):
        with pytest.raises(QwentuneError, match=rf"^override '{re.escape(bad)}': value .* is not valid YAML"):
            parse_override(bad)


@pytest.mark.parametrize(
    "item",
    [
        "n" * 300,
        "n" * 300 + ".yaml",
        "data.train=" + "n" * 300,
        "data.template=/" + "n" * 300,
        "model.source=" + "n" * 300,
    ],
)
def test_names_too_long_for_the_filesystem_are_one_line_errors(item, capsys, monkeypatch):
    """Fuzz finding: a path component over 255 bytes made stat() raise OSError (ENAMETOOLONG) → a traceback."""
    from qwentune.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["validate", str(ROOT / "recipes/qwen2.5-0.5b-instruct/sft_lora.yaml"), item]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
