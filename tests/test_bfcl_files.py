"""The public BFCL subset under benchmarks/bfcl/ (measurement only): every question reads, every possible answer passes
qwentune's AST checker, and `qwentune eval` scores the files as BFCL ships them (`.json` JSON Lines, answers in
possible_answer/, an answer file holding more ids than `--limit` scores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwentune.eval.bfcl import check_case, read_bfcl

BFCL = Path(__file__).resolve().parent.parent / "benchmarks" / "bfcl"
FILES = {"BFCL_v4_simple_python.json": "simple", "BFCL_v4_multiple.json": "multiple",
         "BFCL_v4_parallel.json": "parallel", "BFCL_v4_irrelevance.json": "irrelevance"}  # fmt: skip


def answers_of(name: str) -> Path | None:
    path = BFCL / "possible_answer" / name
    return path if path.exists() else None


def _first(options):
    options = options if isinstance(options, list) else [options]
    return next((o for o in options if o != ""), None)


def _value(v):
    """A value built from a possible answer: the first acceptable option of each key, optional ones left out."""
    if isinstance(v, dict):
        return {k: _value(_first(o)) for k, o in v.items() if _first(o) is not None}
    if isinstance(v, list):
        return [_value(x) for x in v]
    return v


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_question_reads_and_its_answers_pass(name):
    lines = (BFCL / name).read_text(encoding="utf-8").splitlines()
    with pytest.raises(json.JSONDecodeError):
        json.loads((BFCL / name).read_text(encoding="utf-8"))  # JSON Lines in a .json file, as BFCL ships it
    cases = read_bfcl(BFCL / name, answers_of(name))
    assert len(cases) == len(lines) == 100 and {c.category for c in cases} == {FILES[name]}
    for case in cases:
        assert case.tools and all(t["function"]["parameters"]["type"] == "object" for t in case.tools)
        if case.category == "irrelevance":
            assert check_case(case, []) == "" and check_case(case, [{"name": "x", "arguments": {}}])
            continue
        truth = [next(iter(g.items())) for g in case.ground_truth]
        calls = [{"name": name.replace(".", "_"), "arguments": _value(params)} for name, params in truth]
        assert check_case(case, calls) == "", case.id
        assert check_case(case, calls[:-1] if len(calls) > 1 else []), case.id  # one call short: wrong


def test_licence_and_provenance():
    assert "Apache License" in (BFCL / "LICENSE").read_text() and "Version 2.0" in (BFCL / "LICENSE").read_text()
    readme = (BFCL / "README.md").read_text()
    assert "6ea57973c7a6097fd7c5915698c54c17c5b1b6c8" in readme and all(name in readme for name in FILES)


def test_cli_scores_the_shipped_files(tmp_path, tiny_model_path):
    """`qwentune eval --data BFCL_v4_simple_python.json --bfcl-answers possible_answer/... --limit 2` (the answer
    file holds 100 ids) and an irrelevance file, in one table."""
    from cli_in_process import run_main

    out = tmp_path / "out"
    simple = "BFCL_v4_simple_python.json"
    code, err = run_main(["eval", str(tiny_model_path), "--data", str(BFCL / simple), "--data",
                          str(BFCL / "BFCL_v4_irrelevance.json"), "--bfcl-answers", str(answers_of(simple)),
                          "--limit", "2", "--max-new-tokens", "2", "--output", str(out)])  # fmt: skip
    assert code == 0, err
    metrics = json.loads((out / "eval.json").read_text())["metrics"][str(tiny_model_path)]
    assert metrics["bfcl simple"]["total"] == 2 and metrics["bfcl irrelevance"]["total"] == 2
    assert metrics["bfcl overall"]["total"] == 4
