"""data.py: the one pipeline (files → canonical rows → official rendering with masks → ids), its bad-row accounting,
length policies, sources, splits, num_proc and caching; and preview.py on top of it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_models import shared_tokenizer

from qwentune.data.highlight import preview
from qwentune.data.mapped import DPO_COLUMNS
from qwentune.data.pipeline import prepare_data as prepare_sections
from qwentune.data.report import DataReport
from qwentune.data.sources import Unparsed, load_rows
from qwentune.errors import QwentuneError
from qwentune.recipe.load import load_recipe
from qwentune.rows.render import IGNORE_INDEX, render_batch
from qwentune.rows.template import load_template

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}},
    },
}


def chat(q: str = "Hi", a: str = "Hello!") -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def tool_row(name: str, arguments: dict, tools: list | None) -> dict:
    row = {
        "messages": [
            {"role": "user", "content": f"use {name}"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}],
            },
            {"role": "tool", "content": "ok"},
            {"role": "assistant", "content": "Done."},
        ]
    }
    if tools is not None:
        row["tools"] = tools
    return row


def pair(q: str = "2+2?", chosen: str = "4", rejected: str = "5") -> dict:
    return {
        "prompt": [{"role": "user", "content": q}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def recipe(train, method: str = "sft", **data):
    return load_recipe(
        {
            "model": {"source": "x"},
            "method": method,
            "data": {"train": [str(p) for p in (train if isinstance(train, list) else [train])], **data},
        }
    )


def prepare_data(r, tokenizer, **kwargs):
    """The data step as the jobs call it: with the recipe's data section, method and directory."""
    return prepare_sections(r.data, r.method, r.base_dir, tokenizer, **kwargs)


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("QWENTUNE_DATA_CACHE", str(cache))
    return cache


@pytest.fixture
def tok(qwen_tokenizer):
    return qwen_tokenizer


def only_report(prepared) -> DataReport:
    (report,) = prepared.reports
    return report


def official_ids(tok, row) -> list[int]:
    text = tok.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- the basic path


def test_sft_columns_masks_and_report(tmp_path, tok):
    rows = [chat("Hi", "Hello!"), tool_row("get_weather", {"city": "Paris"}, [WEATHER])]
    prepared = prepare_data(recipe(write_jsonl(tmp_path / "t.jsonl", rows)), tok, quiet=True)
    assert prepared.train.column_names == ["input_ids", "labels", "length"]
    assert prepared.eval is None and prepared.template.name == "model"
    for row, out in zip(rows, prepared.train):
        assert out["input_ids"] == official_ids(tok, row)
        assert len(out["labels"]) == len(out["input_ids"]) == out["length"]
    trained = [t for t, lab in zip(prepared.train[0]["input_ids"], prepared.train[0]["labels"]) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "Hello!<|im_end|>"
    report = only_report(prepared)
    assert (report.detected_format, report.total, report.kept, report.skipped) == ("messages", 2, 2, {})
    assert json.loads(json.dumps(report.to_dict()))["kept"] == 2
    assert "2 of 2 rows kept" in report.summary()


def test_summary_goes_to_stderr(tmp_path, tok, capsys):
    prepare_data(recipe(write_jsonl(tmp_path / "t.jsonl", [chat(), "{oops"])), tok)
    err = capsys.readouterr().err
    assert "format messages: 1 of 2 rows kept" in err and "skipped 1 invalid_json: line 2" in err


# ---------------------------------------------------------------- one test per bad-row reason

GOOD = chat()
SFT_BAD = {
    "invalid_json": '{"messages": [',
    "empty": {"messages": []},
    "no_assistant_turn": {"messages": [{"role": "user", "content": "anyone?"}]},
    "bad_role_order": {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
    "invalid_tool_json": {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "search", "arguments": "{query: x}"}]},
        ]
    },
    # a trained turn that starts inside a token ("assistant\n" + "\nX" tokenizes "\n\n" as one token)
    "mask_verification_failed": {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\nX"}]
    },
    "empty_completion": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
    "over_length": chat("long " * 40, "answer"),
}


@pytest.mark.parametrize("reason", list(SFT_BAD))
def test_sft_bad_row_counted_with_its_line(tmp_path, tok, reason):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, GOOD, SFT_BAD[reason]])
    report = only_report(prepare_data(recipe(path, max_length=40), tok, quiet=True))
    assert report.skipped == {reason: 1}
    assert report.kept == 2 and report.total == 3
    assert report.examples[reason][0][0] == 3  # the 1-based line of the bad row
    assert f"skipped 1 {reason}: line 3" in report.summary()


DPO_BAD = {
    "identical_pair": pair(chosen="same", rejected="same"),
    "empty_completion": pair(chosen=""),
    "prompt_over_length": pair(q="long " * 60),
    "over_length": pair(chosen="word " * 30),
}


@pytest.mark.parametrize("reason", list(DPO_BAD))
def test_dpo_bad_row_counted_with_its_line(tmp_path, tok, reason):
    path = write_jsonl(tmp_path / "p.jsonl", [pair(), DPO_BAD[reason], pair()])
    report = only_report(prepare_data(recipe(path, "dpo", max_length=48), tok, quiet=True))
    assert report.skipped == {reason: 1} and report.kept == 2
    assert report.examples[reason][0][0] == 2


def _prompt_len(tok, q: str) -> int:
    text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_dpo_truncate_cuts_completions_but_never_to_nothing(tmp_path, tok):
    q, q_long = "2+2?", "x " * 30
    max_length = _prompt_len(tok, q_long)  # the third prompt fills max_length by itself
    rows = [pair(q, "four " * 40, "five " * 40), pair(q, "4", "5"), pair(q_long, "a", "b")]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    prepared = prepare_data(recipe(path, "dpo", max_length=max_length, overlong="truncate"), tok, quiet=True)
    report = only_report(prepared)
    assert prepared.train.column_names == list(DPO_COLUMNS)
    first = prepared.train[0]
    assert len(first["prompt_input_ids"]) + len(first["chosen_input_ids"]) == max_length
    assert tok.convert_ids_to_tokens(first["chosen_input_ids"][-1]) != "<|im_end|>"  # cut: reported as truncated
    assert report.truncated == 1
    assert tok.decode(prepared.train[1]["chosen_input_ids"]) == "4<|im_end|>"  # untouched, no trailing "\n"
    assert report.skipped == {"completion_truncated_to_nothing": 1}, report.summary()


def test_dpo_matches_official_rendering(tmp_path, tok):
    row = pair("What is the capital of Peru?", "Lima.", "Cusco.")
    prepared = prepare_data(recipe(write_jsonl(tmp_path / "p.jsonl", [row]), "dpo"), tok, quiet=True)
    out = prepared.train[0]
    whole = tok(tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False), add_special_tokens=False)
    assert (
        out["prompt_input_ids"] + out["chosen_input_ids"] == whole["input_ids"][:-1]
    )  # through <|im_end|>, not the "\n"


def test_bad_rows_error_names_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, GOOD, SFT_BAD["bad_role_order"], "{oops"])
    with pytest.raises(QwentuneError) as e:
        prepare_data(recipe(path, bad_rows="error"), tok, quiet=True)
    assert e.value.where == f"{path}:3" and "bad_role_order" in e.value.message
    assert e.value.exit_code == 2
    path = write_jsonl(tmp_path / "u.jsonl", [GOOD, "{oops"])
    with pytest.raises(QwentuneError) as e:
        prepare_data(recipe(path, bad_rows="error"), tok, quiet=True)
    assert e.value.where == f"{path}:2" and "invalid_json" in e.value.message


def test_every_row_bad_is_an_error_with_reasons(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", ["{oops", SFT_BAD["empty"], SFT_BAD["empty_completion"]])
    with pytest.raises(QwentuneError) as e:
        prepare_data(recipe(path), tok, quiet=True)
    assert "no usable train rows" in e.value.message
    assert all(r in e.value.message for r in ("invalid_json", "empty", "empty_completion"))


# ---------------------------------------------------------------- length policies


def test_overlong_drop_truncate_error(tmp_path, tok):
    rows = [GOOD, chat("q", "word " * 60)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    dropped = prepare_data(recipe(path, max_length=40), tok, quiet=True)
    assert len(dropped.train) == 1 and only_report(dropped).skipped == {"over_length": 1}
    cut = prepare_data(recipe(path, max_length=40, overlong="truncate"), tok, quiet=True)
    assert len(cut.train) == 2 and only_report(cut).truncated == 1 and only_report(cut).skipped == {}
    assert cut.train[1]["length"] == 40 and len(cut.train[1]["labels"]) == 40
    assert any(lab != IGNORE_INDEX for lab in cut.train[1]["labels"])
    with pytest.raises(QwentuneError) as e:
        prepare_data(recipe(path, max_length=40, overlong="error"), tok, quiet=True)
    assert e.value.where == f"{path}:2" and "max_length" in e.value.message + (e.value.hint or "")


def test_overlong_drop_is_not_a_bad_row_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, chat("q", "word " * 60)])
    prepared = prepare_data(recipe(path, max_length=40, bad_rows="error"), tok, quiet=True)
    assert only_report(prepared).skipped == {"over_length": 1}


# ---------------------------------------------------------------- tools through Arrow


def _texts(tok, prepared) -> list[str]:
    return [tok.decode(ids) for ids in prepared.train["input_ids"]]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_no_null_keys_injected_into_arguments_or_tools(tmp_path, tok, kind):
    """Rows whose calls have different argument keys: Arrow struct unification would add `"query": null` to the
    weather call, `"city": null` to the search call and every other tool's keys to each schema."""
    rows = [
        tool_row("get_weather", {"city": "Paris"}, [WEATHER]),
        tool_row("search", {"query": "qwen", "limit": 3}, [SEARCH]),
    ]
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "t.jsonl", rows)
    else:  # the hazard is real: a parquet file written from these rows already holds the nulls
        table = pa.Table.from_pylist(rows)
        path = tmp_path / "t.parquet"
        pq.write_table(table, path)
        assert None in table.to_pylist()[0]["messages"][1]["tool_calls"][0]["function"]["arguments"].values()
    texts = _texts(tok, prepare_data(recipe(path), tok, quiet=True))
    assert all("null" not in t for t in texts), texts
    assert '"arguments": {"city": "Paris"}}' in texts[0]
    assert '"arguments": {"query": "qwen", "limit": 3}}' in texts[1]
    assert texts[0].count('"name": "search"') == 0 and texts[1].count('"name": "get_weather"') == 0


def test_tools_missing_in_first_row_still_render_in_later_rows(tmp_path, tok):
    """TRL builds columns from the first row: a `tools` key absent there is dropped for every row."""
    rows = [chat("Hi", "Hello"), tool_row("get_weather", {"city": "Paris"}, [WEATHER])]
    json_file = tmp_path / "t.json"
    json_file.write_text(json.dumps(rows))
    for path in (write_jsonl(tmp_path / "t.jsonl", rows), json_file):
        prepared = prepare_data(recipe(path), tok, quiet=True)
        texts = _texts(tok, prepared)
        assert "# Tools" not in texts[0]
        assert "# Tools" in texts[1] and '"name": "get_weather", "description": "Weather"' in texts[1]
        assert prepared.train[1]["input_ids"] == official_ids(tok, rows[1])


def test_tools_on_a_template_without_tool_support_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, GOOD, tool_row("get_weather", {"city": "Oslo"}, [WEATHER])])
    with pytest.raises(QwentuneError) as e:
        prepare_data(recipe(path, template="qwen2-instruct"), tok, quiet=True)
    assert "qwen2-instruct" in e.value.message and "1 of 3" in e.value.message
    assert e.value.where == f"{path}:3"
    # refused up front, before a bad_rows: error on an earlier row
    path = write_jsonl(tmp_path / "w.jsonl", [GOOD, "{oops", tool_row("get_weather", {"city": "Oslo"}, [WEATHER])])
    with pytest.raises(QwentuneError, match="no tool support"):
        prepare_data(recipe(path, template="qwen2-instruct", bad_rows="error"), tok, quiet=True)
    # recipe-level tools make every row a tool row: the error points at data.tools
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps([WEATHER]))
    with pytest.raises(QwentuneError) as e:
        prepare_data(
            recipe(write_jsonl(tmp_path / "u.jsonl", [GOOD]), template="qwen2-vl-instruct", tools=str(tools_file)),
            tok,
            quiet=True,
        )
    assert e.value.where == "data.tools"
    # the same plain rows are fine on that template
    prepared = prepare_data(
        recipe(write_jsonl(tmp_path / "v.jsonl", [GOOD]), template="qwen2-instruct"), tok, quiet=True
    )
    assert prepared.template.name == "qwen2-instruct" and not prepared.template.supports_tools


def test_recipe_tools_and_system_prompt(tmp_path, tok):
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps([WEATHER["function"]]))  # bare schemas are wrapped
    rows = [
        GOOD,
        {**chat(), "tools": [SEARCH]},
        {"messages": [{"role": "system", "content": "Own."}, *GOOD["messages"]]},
    ]
    prepared = prepare_data(
        recipe(write_jsonl(tmp_path / "t.jsonl", rows), tools=str(tools_file), system_prompt="House."), tok, quiet=True
    )
    texts = _texts(tok, prepared)
    assert texts[0].startswith("<|im_start|>system\nHouse.\n\n# Tools") and '"get_weather"' in texts[0]
    assert '"search"' in texts[1] and '"get_weather"' not in texts[1]
    assert texts[2].startswith("<|im_start|>system\nOwn.\n\n# Tools")


# ---------------------------------------------------------------- sources


def _all_sources(tmp_path: Path, rows: list[dict]) -> dict[str, Path]:
    paths = {"jsonl": write_jsonl(tmp_path / "s.jsonl", rows)}
    paths["json"] = tmp_path / "s.json"
    paths["json"].write_text(json.dumps(rows))
    paths["parquet"] = tmp_path / "s.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [{"messages": json.dumps(r["messages"]), "tools": json.dumps(r.get("tools"))} for r in rows]
        ),
        paths["parquet"],
    )
    paths["csv"] = tmp_path / "s.csv"
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["messages", "tools"])
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {"messages": json.dumps(r["messages"]), "tools": json.dumps(r["tools"]) if r.get("tools") else ""}
            )
    paths["disk"] = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(paths["disk"]))  # Arrow structs: nulls injected
    paths["dict"] = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(paths["dict"]))
    return paths


def test_every_source_kind_gives_the_same_ids(tmp_path, tok):
    rows = [
        {**chat("Hi", "Hello"), "tools": None},  # Dataset.from_list takes its columns from the first row
        tool_row("get_weather", {"city": "Paris"}, [WEATHER]),
        tool_row("search", {"query": "x"}, [SEARCH, WEATHER]),
    ]
    expected = [official_ids(tok, r) for r in rows]
    for kind, path in _all_sources(tmp_path, rows).items():
        prepared = prepare_data(recipe(path), tok, quiet=True)
        assert prepared.train["input_ids"] == expected, kind
        assert only_report(prepared).kept == 3
        assert only_report(prepared).index_kind == ("line" if kind in ("jsonl", "csv") else "row")


def test_load_rows_yields_source_index_and_row(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD, "", "{oops"])  # the blank line is not a row
    r = recipe(path)
    rows = list(load_rows(r.data, r.base_dir))
    assert [(i, type(r).__name__) for _, i, r in rows] == [(1, "dict"), (3, "Unparsed")]
    assert rows[0][0] == str(path) and isinstance(rows[1][2], Unparsed)


def test_directory_of_files(tmp_path, tok):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [GOOD])
    (folder / "b.json").write_text(json.dumps([{"instruction": "Say hi", "output": "hi"}]))
    (folder / "notes.txt").write_text("ignored")
    prepared = prepare_data(recipe(folder), tok, quiet=True)
    assert [r.detected_format for r in prepared.reports] == ["messages", "alpaca"]
    assert len(prepared.train) == 2


def test_missing_file_names_the_key(tmp_path, tok):
    with pytest.raises(QwentuneError) as e:
        prepare_data(recipe([write_jsonl(tmp_path / "ok.jsonl", [GOOD]), tmp_path / "nope.jsonl"]), tok, quiet=True)
    assert e.value.where == "data.train[1]" and "nope.jsonl" in e.value.message and e.value.hint


def test_hub_ids_and_missing_local_dirs(tmp_path, tok, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(QwentuneError) as e:  # data/ exists here: a missing local path, not a hub id
        prepare_data(recipe("data/train"), tok, quiet=True)
    assert "not found" in e.value.message and e.value.where == "data.train[0]"
    with pytest.raises(QwentuneError) as e:  # a hub id, offline in tests: a clear error, no traceback
        prepare_data(recipe("someone/some-dataset#test"), tok, quiet=True)
    assert "someone/some-dataset#test" in e.value.message and e.value.where == "data.train[0]"


def test_relative_paths_resolve_against_the_recipe_dir(tmp_path, tok, monkeypatch):
    write_jsonl(tmp_path / "rel.jsonl", [GOOD])
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("model: {source: x}\ndata: {train: [rel.jsonl]}\n")
    monkeypatch.chdir(Path("/"))
    assert len(prepare_data(load_recipe(recipe_file), tok, quiet=True).train) == 1


def test_unknown_format_and_method_mismatch(tmp_path, tok):
    with pytest.raises(QwentuneError) as e:
        prepare_data(recipe(write_jsonl(tmp_path / "t.jsonl", [{"text": "raw"}])), tok, quiet=True)
    assert "cannot tell the format" in e.value.message and "data.format" in e.value.hint
    prefs = write_jsonl(tmp_path / "p.jsonl", [pair()])
    with pytest.raises(QwentuneError, match="preference pairs"):
        prepare_data(recipe(prefs), tok, quiet=True)
    with pytest.raises(QwentuneError, match="not preference pairs"):
        prepare_data(recipe(write_jsonl(tmp_path / "c.jsonl", [GOOD]), "dpo"), tok, quiet=True)


def test_forced_format(tmp_path, tok):
    # detection says alpaca (instruction/output are checked first); data.format forces prompt/completion
    row = {"instruction": "Say hi", "output": "hi", "prompt": "ignored", "completion": "ignored"}
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    prepared = prepare_data(recipe(path, format="prompt_completion"), tok, quiet=True)
    assert only_report(prepared).detected_format == "prompt_completion"
    assert "ignored" in tok.decode(prepared.train[0]["input_ids"])


def test_limit(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}") for i in range(10)])
    assert len(prepare_data(recipe(path, limit=4), tok, quiet=True).train) == 4
    assert len(prepare_data(recipe(path, limit=4), tok, limit=2, quiet=True).train) == 2


# ---------------------------------------------------------------- splits, num_proc, cache


def test_eval_fraction_is_deterministic(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}", f"a{i}") for i in range(20)])
    a = prepare_data(recipe(path, eval_fraction=0.25, seed=1), tok, quiet=True)
    b = prepare_data(recipe(path, eval_fraction=0.25, seed=1), tok, quiet=True)
    c = prepare_data(recipe(path, eval_fraction=0.25, seed=2), tok, quiet=True)
    assert len(a.eval) == 5 and len(a.train) == 15
    assert a.eval["input_ids"] == b.eval["input_ids"] and a.train["input_ids"] == b.train["input_ids"]
    assert a.eval["input_ids"] != c.eval["input_ids"]
    everything = sorted(map(tuple, [*a.train["input_ids"], *a.eval["input_ids"]]))
    assert everything == sorted(map(tuple, prepare_data(recipe(path), tok, quiet=True).train["input_ids"]))
    assert [r.split for r in a.reports] == ["train", "eval"]


def test_eval_files(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", [GOOD, GOOD])
    ev = write_jsonl(tmp_path / "e.jsonl", [chat("eval q", "eval a"), "{oops"])
    prepared = prepare_data(recipe(train, eval=[str(ev)]), tok, quiet=True)
    assert len(prepared.train) == 2 and len(prepared.eval) == 1
    assert prepared.reports[1].split == "eval" and prepared.reports[1].skipped == {"invalid_json": 1}


def test_num_proc_2_equals_num_proc_1(tmp_path, tok, monkeypatch):
    rows = [tool_row("get_weather", {"city": f"c{i}"}, [WEATHER]) if i % 3 else chat(f"q{i}") for i in range(12)]
    rows[5] = "{oops"
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    one = prepare_data(recipe(path, num_proc=1), tok, quiet=True)
    monkeypatch.setenv("QWENTUNE_DATA_CACHE", str(tmp_path / "other-cache"))  # really run the 2 workers
    two = prepare_data(recipe(path, num_proc=2), tok, quiet=True)
    assert one.train.to_dict() == two.train.to_dict()
    assert one.reports[0].to_dict() == two.reports[0].to_dict()
    assert two.reports[0].examples == {"invalid_json": [(6, two.reports[0].examples["invalid_json"][0][1])]}


def test_cache_is_reused_and_keyed_by_template(tmp_path, tok, data_cache):
    path = write_jsonl(tmp_path / "t.jsonl", [GOOD])
    first = prepare_data(recipe(path), tok, quiet=True)
    files = set(data_cache.iterdir())
    assert len(files) == 1
    again = prepare_data(recipe(path), tok, quiet=True)
    assert set(data_cache.iterdir()) == files and again.train.to_dict() == first.train.to_dict()
    other = prepare_data(recipe(path, template="qwen2-instruct"), tok, quiet=True)
    assert len(set(data_cache.iterdir())) == 2
    assert other.train[0]["input_ids"] != first.train[0]["input_ids"]  # the Qwen2 default system prompt differs
    write_jsonl(path, [chat("changed")])
    prepare_data(recipe(path), tok, quiet=True)
    assert len(set(data_cache.iterdir())) == 3


# ---------------------------------------------------------------- preview


def test_preview_plain_marks_trained_text_and_lists_special_tokens(tmp_path, tok):
    rows = [chat("Hi", "Hello!"), tool_row("get_weather", {"city": "Paris"}, [WEATHER]), "{oops"]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    text = preview(recipe(path), tok, rows=2, color=False, flagged={tok.convert_tokens_to_ids("<tool_call>")})
    assert f"── {path}:1 · " in text and f"── {path}:2 · " in text
    assert "<|im_start|>assistant↵\n[[Hello!<|im_end|>]]↵\n" in text
    assert "[[!<tool_call>!]]" in text  # trained and flagged
    assert "<|im_start|>user↵\nHi<|im_end|>↵" in text  # untrained text unmarked, special tokens literal
    assert "skipped 1 invalid_json: line 3" in text
    assert "<|im_end|> (151645)" in text and "<tool_call> (151657) ×1  ← flagged" in text
    assert "\x1b[" not in text


def test_preview_color_and_dpo(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [pair()])
    text = preview(recipe(path, "dpo"), tok, rows=1, color=True)
    assert "\x1b[30;42m4<|im_end|>\x1b[0m" in text and "\x1b[30;42m5<|im_end|>\x1b[0m" in text
    assert "·· chosen ··" in text and "·· rejected ··" in text


def test_trained_counts_in_preview_header(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [chat("Hi", "Hello!")])
    prepared = prepare_data(recipe(path), tok, quiet=True)
    n_trained = sum(lab != IGNORE_INDEX for lab in prepared.train[0]["labels"])
    assert f"{prepared.train[0]['length']} tokens · {n_trained} trained" in preview(recipe(path), tok, color=False)


def test_same_function_as_chat_render(tmp_path, tok):
    """The pipeline's ids and labels are render.render_batch's, unchanged."""
    rows = [tool_row("get_weather", {"city": "Paris"}, [WEATHER]), chat()]
    prepared = prepare_data(recipe(write_jsonl(tmp_path / "t.jsonl", rows)), tok, quiet=True)
    direct = render_batch(rows, tok, load_template("model", tok))
    assert prepared.train["input_ids"] == [r.input_ids for r in direct]
    assert prepared.train["labels"] == [r.labels for r in direct]


def test_no_tools_template_tokenizer_fixture_available():
    tok2 = shared_tokenizer("qwen2-instruct")
    assert load_template("model", tok2).supports_tools is False


def test_dpo_columns_feed_trl_collator_unchanged(tmp_path, tok):
    """TRL 1.16 has no pre-tokenized DPO path: dpo.py renames our columns to the collator's names."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = [pair("2+2?", "4", "five"), pair("Capital of Peru?", "Lima.", "Cusco.")]
    prepared = prepare_data(recipe(write_jsonl(tmp_path / "p.jsonl", rows), "dpo"), tok, quiet=True)
    renamed = prepared.train.rename_columns(dict(zip(DPO_COLUMNS, ("prompt_ids", "chosen_ids", "rejected_ids"))))
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(list(renamed))
    first = prepared.train[0]
    chosen = first["prompt_input_ids"] + first["chosen_input_ids"]
    assert batch["input_ids"][0][: len(chosen)].tolist() == chosen
    assert batch["completion_mask"][0].sum().item() == len(first["chosen_input_ids"])


def test_train_on_last_reaches_the_renderer(tmp_path, tok):
    row = {"messages": [*chat("q1", "a1")["messages"], *chat("q2", "a2")["messages"]]}
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    for train_on, expected in (("all", "a1<|im_end|>a2<|im_end|>"), ("last", "a2<|im_end|>")):
        out = prepare_data(recipe(path, train_on=train_on), tok, quiet=True).train[0]
        assert tok.decode([t for t, lab in zip(out["input_ids"], out["labels"]) if lab != IGNORE_INDEX]) == expected


def test_json_object_holding_a_list_and_alpaca_csv(tmp_path, tok):
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"version": 1, "data": [{"instruction": "Say hi", "output": "hi"}]}))
    alpaca_csv = tmp_path / "a.csv"
    alpaca_csv.write_text('instruction,input,output,history\nSay hi,,hi,"[[""q"", ""a""]]"\n', encoding="utf-8")
    prepared = prepare_data(recipe([wrapped, alpaca_csv]), tok, quiet=True)
    assert [r.detected_format for r in prepared.reports] == ["alpaca", "alpaca"]
    history = {"messages": [*chat("q", "a")["messages"], *chat("Say hi", "hi")["messages"]]}
    assert prepared.train["input_ids"] == [official_ids(tok, chat("Say hi", "hi")), official_ids(tok, history)]
