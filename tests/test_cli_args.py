"""Command-line parsing: positionals (recipe, `section.key=value` overrides, models) anywhere after the command,
before, between or after its options (issue #25: `train R --resume training.max_steps=5` was refused with
`unrecognized arguments`); usage errors stay one line with exit code 2."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest
from cli_in_process import run_main
from tiny_models import tiny_model_dir

from qwentune import cli, cli_args
from qwentune.recipe import dump_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes/qwen2.5-0.5b-instruct/sft_lora.yaml")
OFFLINE_RECIPE = str(ROOT / "recipes/qwen2.5-coder-0.5b-instruct-offline/sft_qlora_tools.yaml")
OVERRIDE = "training.max_steps=5"


def parse(argv: list[str]) -> dict:
    """The namespace `qwentune ARGV` runs with, as a dict (a fresh parser each time)."""
    return vars(cli.build_parser().parse_args(argv))


def usage_error(capsys, argv: list[str]) -> str:
    """`qwentune ARGV` is refused by the parser: exit 2 and exactly one line on stderr; returns that line."""
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("error: qwentune"), err
    return err.strip()


def one_error_line(code: int, stderr: str, *needles: str) -> str:
    """An in-process run that ended in exit 2 with one `error:` line (the last), holding every needle."""
    assert code == 2, (code, stderr)
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == stderr.strip().splitlines()[-1], stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def main_output(capsys, argv: list[str]) -> tuple[int, str, str]:
    """`qwentune ARGV` in this process: (exit code, stdout, stderr); run_main keeps only stderr."""
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------- parsing only

# command → (its options as typed, one list per option, what they parse to) for the commands that take
# RECIPE_OR_OVERRIDE items (validate has no option but --help).
RECIPE_COMMANDS = {
    "validate": ([], {}),
    "preprocess": ([["--output", "rows.jsonl"], ["--limit", "3"]], {"output": "rows.jsonl", "limit": 3}),
    "preview": ([["--rows", "2"], ["--no-color"]], {"rows": 2, "no_color": True}),
    "train": ([["--resume"]], {"resume": True}),
    "estimate": (
        [["--device", "cpu"], ["--seq-len", "64"], ["--token-rows", "1"], ["--json"]],
        {"device": "cpu", "seq_len": 64, "token_rows": 1, "json": True},
    ),
}

# command → (argv orderings that must all parse alike, what they parse to) for the other commands.
OTHER_COMMANDS = {
    "merge": (
        [
            ["merge", "adapter", "--output", "out", "--no-parity"],
            ["merge", "--output", "out", "adapter", "--no-parity"],
            ["merge", "--no-parity", "-o", "out", "adapter"],
        ],
        {"adapter_dir": "adapter", "output": "out", "no_parity": True},
    ),
    "chat": (
        [
            ["chat", "model", "--prompt", "hi", "--max-new-tokens", "7"],
            ["chat", "--prompt", "hi", "model", "--max-new-tokens", "7"],
            ["chat", "--prompt", "hi", "--max-new-tokens", "7", "model"],
        ],
        {"model": "model", "prompt": "hi", "max_new_tokens": 7},
    ),
    "push": (
        [
            ["push", "run", "me/repo", "--dry-run"],
            ["push", "run", "--dry-run", "me/repo"],
            ["push", "--dry-run", "run", "me/repo"],
        ],
        {"target": "run", "repo_id": "me/repo", "dry_run": True, "private": False},
    ),
    "export": (
        [
            ["export", "model", "--gguf", "out.gguf", "--type", "q8_0"],
            ["export", "--gguf", "out.gguf", "model", "--type", "q8_0"],
            ["export", "--gguf", "out.gguf", "--type", "q8_0", "model"],
        ],
        {"model": "model", "gguf": "out.gguf", "type": "q8_0"},
    ),
    "eval": (
        [
            ["eval", "m1", "m2", "--data", "f.jsonl"],
            ["eval", "m1", "--data", "f.jsonl", "m2"],
            ["eval", "--data", "f.jsonl", "m1", "m2"],
        ],
        {"models": ["m1", "m2"], "data": ["f.jsonl"]},
    ),
    "serve": (
        [
            ["serve", "run", "--port", "8090", "--backend", "transformers", "--server-args=--dtype bfloat16"],
            ["serve", "--port", "8090", "run", "--backend", "transformers", "--server-args=--dtype bfloat16"],
            ["serve", "--port", "8090", "--backend", "transformers", "--server-args=--dtype bfloat16", "run"],
        ],
        {
            "model": "run",
            "port": 8090,
            "host": "127.0.0.1",
            "backend": "transformers",
            "server_args": "--dtype bfloat16",
        },
    ),
}


def test_every_command_is_tested_both_ways():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(RECIPE_COMMANDS) | set(OTHER_COMMANDS)


@pytest.mark.parametrize("command", sorted(RECIPE_COMMANDS))
def test_overrides_parse_alike_before_between_and_after_options(command):
    groups, expected = RECIPE_COMMANDS[command]
    options, first, rest = sum(groups, []), sum(groups[:1], []), sum(groups[1:], [])
    orderings = [
        [command, RECIPE, OVERRIDE, *options],  # what always worked
        [command, RECIPE, *options, OVERRIDE],  # issue #25: refused with `unrecognized arguments`
        [command, *options, RECIPE, OVERRIDE],
        [command, RECIPE, *first, OVERRIDE, *rest],
        [command, *first, RECIPE, *rest, OVERRIDE],
    ]
    parsed = [parse(argv) for argv in orderings]
    assert all(p == parsed[0] for p in parsed), parsed
    assert parsed[0]["command"] == command and parsed[0]["items"] == [RECIPE, OVERRIDE]
    assert parsed[0]["func"] is getattr(cli, f"cmd_{command}")
    for key, value in expected.items():
        assert parsed[0][key] == value, (key, parsed[0])


def test_items_keep_their_order_around_options():
    """Several recipes and overrides split by options: every item kept, in the order typed."""
    argv = ["estimate", RECIPE, "a.b=1", "--json", OFFLINE_RECIPE, "--device", "cpu", "c.d=2"]
    parsed = parse(argv)
    assert parsed["items"] == [RECIPE, "a.b=1", OFFLINE_RECIPE, "c.d=2"]
    assert parsed["json"] is True and parsed["device"] == "cpu"


@pytest.mark.parametrize("command", sorted(OTHER_COMMANDS))
def test_positionals_parse_alike_before_between_and_after_options(command):
    orderings, expected = OTHER_COMMANDS[command]
    parsed = [parse(argv) for argv in orderings]
    assert all(p == parsed[0] for p in parsed), parsed
    assert parsed[0]["command"] == command and parsed[0]["func"] is getattr(cli, f"cmd_{command}")
    for key, value in expected.items():
        assert parsed[0][key] == value, (key, parsed[0])


def test_help_says_where_overrides_go_and_its_examples_parse(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "anywhere after the command" in text and "after the recipe" not in text
    examples = [shlex.split(line)[1:] for line in cli_args.EPILOG.splitlines() if line.startswith("  qwentune ")]

    def override_after_an_option(argv: list[str]) -> bool:
        options = [i for i, word in enumerate(argv) if word.startswith("--")]
        return bool(options) and max(i for i, word in enumerate(argv) if "=" in word) > min(options)

    assert examples and any(map(override_after_an_option, examples))
    for argv in examples:
        items = parse(argv)["items"]
        assert items[0].endswith(".yaml") and items[1:] and all("=" in item for item in items[1:]), argv


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", RECIPE, OVERRIDE, "--bogus"], "unrecognized arguments: --bogus"),
        (["train", RECIPE, "--bogus", OVERRIDE], "unrecognized arguments: --bogus"),
        (["merge", "adapter", "--bogus", "-o", "out"], "unrecognized arguments: --bogus"),
        (["eval", "m1", "--data", "f", "m2", "--bogus"], "unrecognized arguments: --bogus"),
        (["preprocess", RECIPE, OVERRIDE], "the following arguments are required: --output/-o"),
        (["preprocess", "--output", "rows.jsonl"], "the following arguments are required: RECIPE_OR_OVERRIDE"),
        (["preprocess", RECIPE, OVERRIDE, "--output"], "argument --output/-o: expected one argument"),
        (["preview", RECIPE, "--rows", "0", OVERRIDE], "argument --rows: 0 is not a valid number of rows"),
        (["push", "run", "--dry-run"], "the following arguments are required: OWNER/NAME"),
        (["push", "run", "me/repo", "extra", "--dry-run"], "unrecognized arguments: extra"),
    ],
)
def test_usage_errors_stay_one_line_with_exit_2(capsys, argv, needle):
    line = usage_error(capsys, argv)
    assert needle in line and "(hint: qwentune" in line, line


def test_a_parser_parses_again_after_a_refusal(capsys):
    """The intermixed parse's guard is reset when a parse fails (SystemExit), so one parser keeps working."""
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", RECIPE, "--bogus"])
    capsys.readouterr()
    parsed = vars(parser.parse_args(["train", RECIPE, "--resume", OVERRIDE]))
    assert parsed["items"] == [RECIPE, OVERRIDE] and parsed["resume"] is True


# --------------------------------------------------------------------------------------- end to end, in process


def test_unknown_option_is_refused_in_one_line_before_anything_runs(tmp_path):
    out = tmp_path / "rows.jsonl"
    code, stderr = run_main(["preprocess", RECIPE, "--output", str(out), "data.limit=2", "--bogus"])
    assert code == 2 and stderr == "error: qwentune: unrecognized arguments: --bogus (hint: qwentune --help)\n"
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["estimate", OFFLINE_RECIPE, "--json", "training.per_device_batch_size2"],
        ["estimate", OFFLINE_RECIPE, "training.per_device_batch_size2", "--json"],
        ["validate", RECIPE, "training.per_device_batch_size2"],
    ],
)
def test_a_mistyped_override_is_still_refused(argv):
    code, stderr = run_main(argv)
    one_error_line(
        code, stderr, "'training.per_device_batch_size2' is not an override (expected section.key=value)", "hint:"
    )


def test_estimate_json_is_the_same_with_the_override_before_or_after_json(capsys):
    after = ["estimate", OFFLINE_RECIPE, "--json", "training.per_device_batch_size=3"]
    before = ["estimate", OFFLINE_RECIPE, "training.per_device_batch_size=3", "--json"]
    runs = [main_output(capsys, argv) for argv in (after, before, ["estimate", OFFLINE_RECIPE, "--json"])]
    assert [code for code, _, _ in runs] == [0, 0, 0], [err for _, _, err in runs]
    (_, out_after, _), (_, out_before, _), (_, out_default, _) = runs
    assert out_after == out_before
    batch3, default = json.loads(out_after), json.loads(out_default)
    assert "3 × 1024 tokens per micro-batch" in batch3["setting"]  # the override took effect
    assert "2 × 1024 tokens per micro-batch" in default["setting"] and batch3["total_bytes"] > default["total_bytes"]
    # and through run_main (stderr only): nothing is refused with the override after the option
    assert run_main(after) == (0, "")


def test_validate_applies_an_override_typed_after_the_recipe(capsys, tmp_path):
    missing = tmp_path / "missing.jsonl"
    code, stderr = run_main(["validate", RECIPE, f"data.train={missing}"])
    one_error_line(code, stderr, str(missing), "data.train[0]")  # the override reached the recipe
    code, out, err = main_output(capsys, ["validate", RECIPE, "data.eval=[]"])
    assert code == 0, err
    assert "data.train[0]" in out and "data.eval" not in out and out.endswith("1 recipe(s) valid\n")


def test_preprocess_takes_an_override_after_output(tmp_path):
    """`qwentune preprocess R --output f data.limit=2` (the issue's example): 2 rows written, as with the override
    typed before --output."""
    model = tiny_model_dir(tmp_path / "model")
    common = [f"model.source={model}", "data.eval=[]"]
    written = []
    for name, argv in [
        ("after.jsonl", ["preprocess", RECIPE, *common, "--output", str(tmp_path / "after.jsonl"), "data.limit=2"]),
        ("before.jsonl", ["preprocess", RECIPE, *common, "data.limit=2", "--output", str(tmp_path / "before.jsonl")]),
    ]:
        code, stderr = run_main(argv)
        assert code == 0, stderr
        assert "wrote 2 rows" in stderr, stderr
        written.append((tmp_path / name).read_text())
    assert written[0] == written[1] and len(written[0].splitlines()) == 2


def test_train_resume_then_override_reaches_the_resume_check(tmp_path):
    """`qwentune train R --resume training.max_steps=5` (the issue's example): both took effect: the resume check
    compares the run dir's recorded recipe with one whose max_steps is 5, and refuses (before any weights load)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recorded = dump_recipe(load_recipe(RECIPE, [f"output.dir={run_dir}"]))
    (run_dir / "recipe.yaml").write_text(recorded)
    for argv in (
        ["train", RECIPE, "--resume", OVERRIDE, f"output.dir={run_dir}"],
        ["train", RECIPE, OVERRIDE, f"output.dir={run_dir}", "--resume"],
    ):
        code, stderr = run_main(argv)
        one_error_line(code, stderr, "cannot resume: the recipe differs", "training.max_steps: -1 → 5")
    assert (run_dir / "recipe.yaml").read_text() == recorded  # the run dir still records the first recipe
    assert not {"checkpoints", "adapter", "merged", "metrics.json"} & {p.name for p in run_dir.iterdir()}
