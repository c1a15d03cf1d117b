"""Bad input as a user types it (subprocess): exit code 2, exactly one line on stderr naming the override or the
file:line with a hint, never a traceback; and values that used to pass `validate` and crash later are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/qwen2.5-0.5b-instruct/sft_lora.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "QWENTUNE_DEBUG": ""}


def qwentune(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwentune", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**ENV, **env},
    )


def one_line_error(run: subprocess.CompletedProcess, *needles: str) -> str:
    """The run exited 2 with one `error: ... (hint: ...)` line that holds every needle; returns that line."""
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0] == run.stderr.strip().splitlines()[-1], run.stderr
    assert "hint:" in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize(
    "override, needles",
    [
        (
            "training.learning_rate=.nan",
            ["override 'training.learning_rate=.nan'", "must be a finite number, got nan"],
        ),
        ("training.learning_rate=.inf", ["override 'training.learning_rate=.inf'", "finite number, got inf"]),
        ("training.epochs=-.inf", ["override 'training.epochs=-.inf'", "finite number"]),
        ("data.limit=-5", ["override 'data.limit=-5'", "'data.limit' must be ≥ 1, got -5"]),
        ("data.eval_limit=0", ["override 'data.eval_limit=0'", "must be ≥ 1"]),
        ("training.save_steps=-1", ["'training.save_steps' must be ≥ 1"]),
        ("training.max_steps=0", ["'training.max_steps' must be ≥ 1, or -1"]),
        ("training.seed=99999999999", ["'training.seed' must be < 2^32"]),
        ("training.grad_accum=100000000000000000000", ["'training.grad_accum' is out of range"]),
        (
            "output.dir=out/{foo}",
            ["override 'output.dir=out/{foo}'", "unknown placeholder {foo}", "{model}, {method}"],
        ),
        ("output.dir=out/{model", ["override 'output.dir=out/{model'", "not a valid path template"]),
        ("data.max_length=1000000000", ["'data.max_length' must be at most 1048576"]),
        ("peft.target_modules=[q_proj", ["override 'peft.target_modules=[q_proj'", "is not valid YAML"]),
        ("training.epochs=abc", ["override 'training.epochs=abc'", "'training.epochs' must be float"]),
        ("peft.rank=8", ["override 'peft.rank=8'", "unknown key 'peft.rank'"]),
    ],
)
def test_validate_refuses_values_that_would_crash_later(override, needles):
    one_line_error(qwentune("validate", RECIPE, override), *needles)


def test_validate_accepts_the_recipe_as_shipped():
    run = qwentune("validate", RECIPE)
    assert run.returncode == 0, run.stderr


def test_bad_values_in_a_file_name_the_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.read_text().replace("  epochs: 2\n", "  epochs: .nan\n"))
    line = RECIPE.read_text().splitlines().index("  epochs: 2") + 1
    one_line_error(qwentune("validate", recipe), f"{recipe}:{line}:", "'training.epochs' must be a finite number")


def test_a_type_error_in_an_override_blames_the_override_not_the_file():
    line = one_line_error(qwentune("validate", RECIPE, "training.learning_rate=fast"), "override")
    assert "sft_lora.yaml" not in line


def test_a_word_without_equals_is_not_taken_for_a_recipe():
    one_line_error(
        qwentune("validate", RECIPE, "foo"),
        "'foo' is not an override (expected section.key=value) and not a recipe file",
    )


def test_duplicate_yaml_keys_name_both_lines(tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text(RECIPE.read_text() + "training:\n  epochs: 3\n")
    first = RECIPE.read_text().splitlines().index("training:") + 1
    last = len(RECIPE.read_text().splitlines()) + 1
    one_line_error(
        qwentune("validate", recipe), f"{recipe}:{last}:", f"duplicate key 'training' (first on line {first})"
    )


def test_a_non_utf8_recipe_names_the_line(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(RECIPE.read_bytes() + "# caf\u00e9\n".encode("latin-1"))
    line = len(RECIPE.read_text().splitlines()) + 1
    one_line_error(qwentune("validate", recipe), f"{recipe}:{line}:", "not UTF-8")


def test_json_errors_do_not_say_at_at():
    from qwentune.errors import json_error_text

    try:
        json.loads('{"a": "unterminated')
    except json.JSONDecodeError as e:
        assert json_error_text(e) == "Unterminated string starting at column 7"


def test_a_broken_model_config_is_one_line(tmp_path, model):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model.iterdir():
        (broken / f.name).symlink_to(f)
    (broken / "config.json").unlink()
    (broken / "config.json").write_text('{"model_type": "qwen2",\n')
    one_line_error(
        qwentune("validate", RECIPE, f"model.source={broken}"), f"{broken}/config.json:2:", "not valid JSON"
    )
    one_line_error(
        qwentune("preprocess", RECIPE, f"model.source={broken}", "data.eval=[]", "-o", tmp_path / "o.jsonl"),
        "config.json",
    )


def test_max_length_is_bounded_by_the_models_context(model):
    one_line_error(
        qwentune("validate", RECIPE, f"model.source={model}", "data.max_length=40000"),
        "'data.max_length' (40000) is above the model's context of 32768 tokens",
    )


def test_a_corrupt_parquet_file_is_one_line(tmp_path, model):
    bad = tmp_path / "rows.parquet"
    bad.write_bytes(b"PAR1 this is not really parquet PAR1")
    one_line_error(
        qwentune("validate", RECIPE, f"model.source={model}", f"data.train={bad}", "data.eval=[]"),
        "data.train[0]",
        "as Parquet",
    )


@pytest.mark.parametrize("limit", ["0", "-1", "many"])
def test_preprocess_limit_must_be_a_positive_count(tmp_path, model, limit):
    run = qwentune("preprocess", RECIPE, f"model.source={model}", "-o", tmp_path / "o.jsonl", "--limit", limit)
    needle = "is not a whole number" if limit == "many" else f"{limit} is not a valid limit (must be ≥ 1)"
    one_line_error(run, "--limit", needle)


def test_preprocess_output_that_is_a_directory_or_unwritable(tmp_path, model):
    one_line_error(
        qwentune("preprocess", RECIPE, f"model.source={model}", "--limit", "2", "-o", tmp_path), "is a directory"
    )
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    one_line_error(
        qwentune("preprocess", RECIPE, f"model.source={model}", "--limit", "2", "-o", blocker / "o.jsonl"),
        "cannot write",
    )


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only dirs")
def test_preprocess_into_a_read_only_dir(tmp_path, model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    one_line_error(
        qwentune("preprocess", RECIPE, f"model.source={model}", "--limit", "2", "-o", ro / "o.jsonl"), "cannot write"
    )


def test_user_message_with_null_content_is_a_counted_bad_row(tmp_path, model):
    data = tmp_path / "rows.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    null = {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "hello"}]}
    data.write_text("\n".join(json.dumps(r) for r in (good, null, good)) + '\n{"messages": "cut\n')
    run = qwentune(
        "preprocess", RECIPE, f"model.source={model}", f"data.train={data}", "data.eval=[]", "-o", tmp_path / "o.jsonl"
    )
    assert run.returncode == 0, run.stderr
    assert "2 of 4 rows kept" in run.stderr
    assert "skipped 1 null_content: line 2 (message 0 (user) has no content)" in run.stderr
    assert "skipped 1 invalid_json: line 4 (" in run.stderr and " at column " in run.stderr
    assert "at at" not in run.stderr
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2


def test_debug_env_shows_the_traceback():
    run = qwentune("validate", RECIPE, "data.limit=-5", QWENTUNE_DEBUG="1")
    assert run.returncode == 2 and "Traceback" in run.stderr and "QwentuneError" in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: override 'data.limit=-5'")


def test_an_internal_error_is_one_line_with_exit_1(monkeypatch, capsys):
    from qwentune import cli

    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli, "cmd_validate", broken)  # stands in for a bug anywhere below the CLI
    monkeypatch.delenv("QWENTUNE_DEBUG", raising=False)
    assert cli.main(["validate", str(RECIPE)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("internal error: RuntimeError: boom") and "QWENTUNE_DEBUG=1" in err and "\n" not in err


def test_train_into_an_unwritable_output_dir_is_one_line(tmp_path, model):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    run = qwentune(
        "train", RECIPE, f"model.source={model}", f"output.dir={blocker}/run", "data.eval=[]", "data.limit=2",
        "training.max_steps=1", "training.precision=fp32",
    )  # fmt: skip
    one_line_error(run, f"output.dir {blocker}/run", "cannot write the run dir")
