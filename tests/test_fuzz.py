"""Property-based tests (hypothesis): random recipes, overrides and data rows never make `validate` or `preprocess`
end in a traceback; they exit 0 or 2 (one `error:` line), and every row of a data file is kept or counted bad.

Most examples run in-process through `qwentune.cli.main` (an exception other than SystemExit escaping it is the
traceback a user would see); a few run as real subprocesses. QWENTUNE_FUZZ_EXAMPLES=N runs N examples per property
instead of the quick default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from cli_in_process import run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model_dir

from qwentune.recipe.sections import Recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/qwen2.5-0.5b-instruct/sft_lora.yaml"
FUZZ = int(os.environ.get("QWENTUNE_FUZZ_EXAMPLES", "0"))


def examples(default: int) -> settings:
    return settings(
        max_examples=FUZZ or default,
        deadline=None,
        derandomize=not FUZZ,  # the default run is the same every time; QWENTUNE_FUZZ_EXAMPLES explores
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
        database=None,
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    tiny_model_dir(root)
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (root / "good.jsonl").write_text(json.dumps(good) + "\n")
    return root


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, workspace):
    monkeypatch.setenv("QWENTUNE_DATA_CACHE", str(workspace / "cache"))
    monkeypatch.delenv("QWENTUNE_DEBUG", raising=False)


def assert_clean_exit(code: int, stderr: str) -> None:
    assert code in (0, 2), (code, stderr)
    if code == 2:
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr


# ---------------------------------------------------------------- recipes and overrides


def _leaf_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys += _leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


KEYS = _leaf_keys()
# Keys naming files, dirs or hub ids: random text there would only test "not found"; they get these values instead.
PATH_KEYS = {
    "model.source",
    "model.adapter",
    "data.train",
    "data.eval",
    "data.tools",
    "data.template",
    "dpo.reference",
}

misspelt = st.builds(
    lambda key, i, c: key[:i] + c + key[i + 1 :], st.sampled_from(KEYS), st.integers(0, 30), st.sampled_from("xq_.")
)
any_key = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS), misspelt, st.text(max_size=12))

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["off", "auto", "sft", "dpo", "lora", "qlora", "sigmoid", "{model}", "out/{x}", "a{", "}"]),
)
json_like = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
override_text = st.one_of(
    st.sampled_from([".nan", ".inf", "-.inf", "1e400", "-1", "0", "[a", "[a, b]", "{a: 1}", "'x", "null", "~", ""]),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(repr),
    st.text(max_size=20).filter(lambda s: "\x00" not in s),
)


def path_values(workspace: Path) -> st.SearchStrategy:
    return st.sampled_from(
        [str(workspace / "tiny-qwen2.5-0.5b-instruct"), str(workspace / "good.jsonl"), str(workspace / "missing"),
         str(workspace), "", "qwen2.5-instruct", "model", "[]", "null", "n" * 300, f"/{'n' * 300}/x.jsonl"]
    )  # fmt: skip


def base_tree(workspace: Path) -> dict:
    tree = yaml.safe_load(RECIPE.read_text())
    tree["model"]["source"] = str(workspace / "tiny-qwen2.5-0.5b-instruct")
    tree["data"].update(train=str(workspace / "good.jsonl"), eval=[])
    return tree


def set_key(tree: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


@examples(20)
@given(data=st.data())
def test_random_overrides_never_crash_validate(workspace, data):
    overrides = []
    for key in data.draw(st.lists(any_key, min_size=1, max_size=4), label="keys"):
        value = data.draw(path_values(workspace) if key in PATH_KEYS else override_text, label=key)
        overrides.append(f"{key}={value}")
    if data.draw(st.booleans(), label="a stray word"):
        word = st.text(max_size=8) | st.just("w" * 300) | st.just("w" * 300 + ".yaml")
        overrides.append(data.draw(word.filter(lambda s: s and "=" not in s), label="word"))
    tree = base_tree(workspace)
    path = workspace / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    code, stderr = run_main(["validate", str(path), *overrides])
    assert_clean_exit(code, stderr)


@examples(20)
@given(data=st.data())
def test_random_recipe_files_never_crash_validate(workspace, data):
    tree = base_tree(workspace)
    for key in data.draw(st.lists(any_key, min_size=1, max_size=5), label="keys"):
        value = data.draw(path_values(workspace) if key in PATH_KEYS else json_like, label=key)
        if "." in key and all(key.split(".")):
            set_key(tree, key, value)
        else:
            tree[key] = value
    path = workspace / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=data.draw(st.booleans(), label="unicode")))
    code, stderr = run_main(["validate", str(path)])
    assert_clean_exit(code, stderr)


# ---------------------------------------------------------------- data rows

text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", " ", "<|im_end|>", "<|im_start|>assistant", "<tool_call>", "{{ x }}", "\ud800", "é" * 50]),
    st.integers(2_000, 30_000).map(lambda n: "long " * n),
)
odd = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), text, st.lists(text, max_size=2))
json_values = st.recursive(
    odd,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
roles = st.one_of(
    st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "function_call", "observation", "x"]),
    odd,
)
arguments = st.one_of(json_values, st.dictionaries(st.text(max_size=5), json_values, max_size=2).map(json.dumps))
call = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries({"name": text, "arguments": arguments})}
    ),
    st.fixed_dictionaries({}, optional={"name": odd, "arguments": arguments, "id": odd, "function": json_values}),
    json_values,
)
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": odd}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "image_url", "video"])}, optional={"image": odd}),
    json_values,
)
content = st.one_of(text, text, st.none(), json_values, st.lists(part, max_size=3))
message = st.fixed_dictionaries(
    {"role": roles},
    optional={
        "content": content,
        "tool_calls": st.one_of(st.lists(call, max_size=3), json_values),
        "name": odd,
        "train": odd,
        "weight": st.sampled_from([0, 1, 2, None]),
    },
)
turn = st.fixed_dictionaries({"from": roles}, optional={"value": content})
tool = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("function"), "function": st.fixed_dictionaries({"name": text}, optional={"parameters": odd})}
    ),
    json_values,
)
conversation = st.lists(
    st.sampled_from(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"}]
    ),
    min_size=1,
    max_size=4,
)
row = st.one_of(
    st.fixed_dictionaries(
        {"messages": st.one_of(st.lists(message, max_size=5), conversation, json_values)},
        optional={"tools": st.one_of(st.lists(tool, max_size=2), json_values)},
    ),
    st.fixed_dictionaries({"conversations": st.one_of(st.lists(turn, max_size=4), json_values)}),
    st.fixed_dictionaries({"instruction": odd, "output": odd}, optional={"input": odd, "system": odd}),
    st.fixed_dictionaries({"prompt": st.one_of(odd, conversation), "completion": st.one_of(odd, conversation)}),
    json_values,
)
not_json = st.sampled_from(['{"messages": ', "[1, 2", "nan", "{'role': 'user'}", "\ufeffnot json", "{}{}"])


def jsonl_line(value, ascii_only: bool) -> str:
    try:
        return json.dumps(value, ensure_ascii=ascii_only)
    except ValueError:  # not JSON-serializable (never for these strategies): keep the line as text
        return str(value)


def write_rows(path: Path, lines: list[str]) -> int:
    """Write the jsonl file; returns its number of non-blank lines (the rows the report must account for)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return sum(1 for line in lines if line.strip())


@st.composite
def data_file(draw) -> list[str]:
    ascii_only = draw(st.booleans(), label="ensure_ascii")
    lines = []
    for value in draw(st.lists(st.one_of(row, row, row, not_json.map(lambda t: ("raw", t))), min_size=1, max_size=6)):
        if isinstance(value, tuple) and value[:1] == ("raw",):
            lines.append(value[1])
            continue
        line = jsonl_line(value, ascii_only)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: only valid in a file when escaped
            line = jsonl_line(value, True)
        lines.append(line)
    return lines


REPORT = re.compile(r"\[train\] format \S+: (\d+) of (\d+) rows kept")
SKIPPED = re.compile(r"^\s+skipped (\d+) \S+:", re.M)


def assert_rows_add_up(stderr: str, rows_in_file: int) -> None:
    reports = REPORT.findall(stderr)
    assert len(reports) == 1, stderr
    kept, total = map(int, reports[0])
    skipped = sum(int(n) for n in SKIPPED.findall(stderr))
    assert kept + skipped == total == rows_in_file, stderr


def preprocess_args(workspace: Path, data: Path, fmt: str) -> list[str]:
    return [
        "preprocess", str(RECIPE), f"model.source={workspace / 'tiny-qwen2.5-0.5b-instruct'}", f"data.train={data}",
        "data.eval=[]", "data.max_length=512", f"data.format={fmt}", "-o", str(data.with_suffix(".out.jsonl")),
    ]  # fmt: skip


FORMATS = st.sampled_from(["auto", "auto", "messages", "sharegpt", "alpaca", "prompt_completion"])


@examples(8)
@given(lines=data_file(), fmt=FORMATS)
def test_random_rows_never_crash_preprocess_and_every_row_is_counted(workspace, lines, fmt):
    data = workspace / "rows.jsonl"
    rows_in_file = write_rows(data, lines)
    code, stderr = run_main(preprocess_args(workspace, data, fmt))
    assert_clean_exit(code, stderr)
    if code == 0:
        assert_rows_add_up(stderr, rows_in_file)
        written = data.with_suffix(".out.jsonl").read_text().splitlines()
        assert len(written) == int(REPORT.findall(stderr)[0][0])


@examples(1)
@given(
    lines=data_file(), fmt=FORMATS, overrides=st.lists(st.sampled_from(KEYS).map(lambda k: f"{k}=.nan"), max_size=1)
)
def test_random_rows_as_a_user_runs_it(workspace, lines, fmt, overrides):
    """The same property through a real subprocess: exit 0 or 2, no traceback on stderr."""
    data = workspace / "sub.jsonl"
    rows_in_file = write_rows(data, lines)
    run = subprocess.run(
        [sys.executable, "-m", "qwentune", *preprocess_args(workspace, data, fmt), *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "QWENTUNE_DEBUG": ""},
    )
    assert "Traceback" not in run.stderr, run.stderr
    assert_clean_exit(run.returncode, run.stderr)
    if run.returncode == 0:
        assert_rows_add_up(run.stderr, rows_in_file)
