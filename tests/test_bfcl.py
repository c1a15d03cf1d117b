"""BFCL files and AST-checker rules, on hand-written cases that follow BFCL's documented rules (no BFCL data)."""

from __future__ import annotations

import json

import pytest

from qwentune.errors import QwentuneError
from qwentune.eval.bfcl import BfclCase, category_of, check_call, check_case, read_bfcl, standardize, to_tool

AREA = {
    "name": "geometry.area_circle",
    "description": "Area of a circle.",
    "parameters": {
        "type": "dict",
        "properties": {
            "radius": {"type": "float", "description": "radius"},
            "units": {"type": "string", "description": "units", "default": "cm"},
            "point": {"type": "tuple", "items": {"type": "integer"}},
            "opts": {"type": "dict", "properties": {"round": {"type": "boolean"}}},
            "tags": {"type": "array", "items": {"type": "string"}},
            "extra": {"type": "any"},
        },
        "required": ["radius"],
    },
}
TRUTH = {"geometry.area_circle": {"radius": [5.0], "units": ["cm", ""], "tags": [["Red Car", "blue"], ""]}}


def call(name="geometry_area_circle", **arguments):
    return {"name": name, "arguments": arguments}


def test_specs_convert_as_bfcl_fc_handlers_do():
    tool = to_tool(AREA)
    fn = tool["function"]
    assert tool["type"] == "function" and fn["name"] == "geometry_area_circle"
    props = fn["parameters"]["properties"]
    assert fn["parameters"]["type"] == "object"
    assert (props["radius"]["type"], props["point"]["type"], props["opts"]["type"], props["extra"]["type"]) == (
        "number",
        "array",
        "object",
        "string",
    )
    assert props["point"]["items"]["type"] == "integer" and props["opts"]["properties"]["round"]["type"] == "boolean"
    assert AREA["parameters"]["type"] == "dict"  # the published spec is not modified


def test_categories_from_ids():
    assert [
        category_of(i) for i in ("simple_3", "multiple_0", "parallel_9", "parallel_multiple_1", "irrelevance_2")
    ] == [
        "simple",
        "multiple",
        "parallel",
        "parallel_multiple",
        "irrelevance",
    ]
    assert category_of("live_parallel_multiple_0-1-2") == "parallel_multiple"


def test_simple_rules():
    assert check_call(AREA, call(radius=5), TRUTH) == ""  # int accepted for float; optional units absent
    assert check_call(AREA, call("geometry.area_circle", radius=5.0, units="cm"), TRUTH) == ""  # dotted name ok
    assert check_call(AREA, call(radius=5.0, tags=["red car", "Blue"]), TRUTH) == ""  # strings normalized
    assert check_call(AREA, call("area", radius=5.0), TRUTH).startswith("wrong_func_name")
    assert check_call(AREA, call(units="cm"), TRUTH).startswith("missing_required")
    assert check_call(AREA, call(radius=5.0, colour="red"), TRUTH).startswith("unexpected_param")
    assert check_call(AREA, call(radius=5.0, extra="x"), TRUTH).startswith("unexpected_param")  # not in the answer
    assert check_call(AREA, call(radius="5"), TRUTH).startswith("type_error")
    assert check_call(AREA, call(radius=6.0), TRUTH).startswith("value_error:others")
    assert check_call(AREA, call(radius=5.0, units="inch"), TRUTH).startswith("value_error:string")
    assert check_call(AREA, call(radius=5.0, tags=["blue", "red car"]), TRUTH).startswith("value_error:list")
    assert check_call(AREA, call(radius=5.0, tags=["red car", 3]), TRUTH).startswith("type_error")
    strict = {"geometry.area_circle": {"radius": [5.0], "units": ["cm"]}}
    assert check_call(AREA, call(radius=5.0), strict).startswith("missing_optional")  # no "" → must be given


def test_string_normalization():
    assert standardize("New York, NY") == standardize("newyork ny") == "newyorkny"
    assert standardize("a-b_c*d^e/f.g") == "abcdefg"


def test_dict_values_key_by_key():
    truth = {"geometry.area_circle": {"radius": [5.0], "opts": [{"round": [True], "digits": [2, ""]}]}}
    assert check_call(AREA, call(radius=5.0, opts={"round": True}), truth) == ""
    assert check_call(AREA, call(radius=5.0, opts={"round": False}), truth).startswith("value_error:dict")
    assert check_call(AREA, call(radius=5.0, opts={"round": True, "x": 1}), truth).startswith("value_error:dict")


def _case(category, truth, functions=(AREA,)):
    return BfclCase(f"{category}_0", category, [], list(functions), [to_tool(f) for f in functions], truth)


def test_parallel_any_order_multiple_needs_one_call_irrelevance_needs_none():
    truth = [{"geometry.area_circle": {"radius": [1.0]}}, {"geometry.area_circle": {"radius": [2.0]}}]
    case = _case("parallel", truth)
    assert check_case(case, [call(radius=2), call(radius=1)]) == ""
    assert check_case(case, [call(radius=1), call(radius=1)]).startswith("parallel")
    assert check_case(case, [call(radius=1)]).startswith("wrong_count")
    multi = _case("multiple", [{"geometry.area_circle": {"radius": [1.0]}}], (AREA, {**AREA, "name": "other"}))
    assert check_case(multi, [call(radius=1)]) == ""
    assert check_case(multi, [call(radius=1), call(radius=1)]).startswith("wrong_count")
    irrelevant = _case("irrelevance", None)
    assert check_case(irrelevant, []) == ""
    assert check_case(irrelevant, [call(radius=1)]).startswith("irrelevance")
    assert check_case(_case("simple", truth[:1]), None).startswith("invalid_format")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_files_and_refuse_a_question_without_an_answer(tmp_path):
    q = [
        {"id": "simple_0", "question": [[{"role": "user", "content": "area of r=5"}]], "function": [AREA]},
        {"id": "simple_1", "question": [[{"role": "user", "content": "area of r=2"}]], "function": [AREA]},
    ]
    questions = _write(tmp_path / "q.json", q)
    answers = _write(
        tmp_path / "a.json", [{"id": "simple_0", "ground_truth": [TRUTH]}, {"id": "simple_1", "ground_truth": [TRUTH]}]
    )
    cases = read_bfcl(questions, answers)
    assert [c.id for c in cases] == ["simple_0", "simple_1"] and cases[0].messages[0]["content"] == "area of r=5"
    assert cases[0].tools[0]["function"]["name"] == "geometry_area_circle"
    bad = _write(
        tmp_path / "bad.json", [{"id": "simple_0", "ground_truth": [TRUTH]}, {"id": "simple_7", "ground_truth": []}]
    )
    with pytest.raises(QwentuneError) as err:
        read_bfcl(questions, bad)
    assert "row 2" in str(err.value) and "simple_1" in str(err.value)
    assert [c.id for c in read_bfcl(questions, bad, limit=1)] == ["simple_0"]  # only scored questions need one
    extra = _write(  # more answers than questions (one answer file for a subset): fine, in any order
        tmp_path / "extra.json",
        [{"id": "x_9", "ground_truth": []}, *({"id": r["id"], "ground_truth": [TRUTH]} for r in reversed(q))],
    )
    assert [c.ground_truth for c in read_bfcl(questions, extra)] == [[TRUTH], [TRUTH]]


def _bfcl_files(folder, answer_ids):
    """A question file and its possible-answer file named and shaped as BFCL ships them: `.json` files holding JSON
    Lines, one compact object a line, the answers in `possible_answer/`; and an irrelevance file (no answers)."""
    q = [
        {"id": f"simple_{k}", "question": [[{"role": "user", "content": f"area of a circle of radius {k + 2}"}]],
         "function": [AREA]}
        for k in range(2)
    ]  # fmt: skip
    (folder / "possible_answer").mkdir(parents=True)
    questions = folder / "BFCL_v3_simple.json"
    questions.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in q))
    answers = folder / "possible_answer" / "BFCL_v3_simple.json"
    truth = {"geometry.area_circle": {"radius": [2.0], "units": ["cm", ""]}}
    answers.write_text("".join(json.dumps({"id": f"simple_{k}", "ground_truth": [truth]}) + "\n" for k in answer_ids))
    irrelevance = folder / "BFCL_v3_irrelevance.json"  # no possible answers: the model must not call
    irrelevance.write_text(json.dumps({"id": "irrelevance_0", "question": [[{"role": "user", "content": "Hi"}]],
                                       "function": [AREA]}) + "\n")  # fmt: skip
    return questions, answers, irrelevance


def test_cli_scores_bfcl_files_as_shipped(tmp_path, tiny_model_path):
    from cli_in_process import run_main

    questions, answers, irrelevance = _bfcl_files(tmp_path / "all", [2, 1, 0])  # an extra id, another order
    out = tmp_path / "out"
    model = ["eval", str(tiny_model_path), "--max-new-tokens", "2", "--output", str(out)]
    code, err = run_main(
        [*model, "--data", str(questions), "--data", str(irrelevance), "--bfcl-answers", str(answers)]
    )
    assert code == 0, err
    metrics = json.loads((out / "eval.json").read_text())["metrics"][str(tiny_model_path)]
    assert metrics["bfcl simple"] == {"correct": 0, "total": 2} and metrics["bfcl irrelevance"]["total"] == 1
    assert metrics["bfcl overall"]["total"] == 3
    questions, answers, _ = _bfcl_files(tmp_path / "subset", [0, 2])  # simple_1 has no answer
    code, err = run_main([*model, "--data", str(questions), "--bfcl-answers", str(answers), "--limit", "1"])
    assert code == 0, err  # it is not scored
    metrics = json.loads((out / "eval.json").read_text())["metrics"][str(tiny_model_path)]
    assert metrics["bfcl simple"] == {"correct": 0, "total": 1}
    code, err = run_main([*model, "--data", str(questions), "--bfcl-answers", str(answers)])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"{questions} row 2: id 'simple_1' has no possible answer" in lines[0]
