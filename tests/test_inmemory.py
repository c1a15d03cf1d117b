"""In-memory data (inmemory.py, the `memory` source of datafiles.py): a list of row dicts and a datasets.Dataset go
through the same format detection, exact rendering and bad-row accounting as the same rows in a jsonl file, with rows
named by index; the recipe keeps the objects, recipe.yaml a placeholder with a fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from qwentune.data.pipeline import prepare_data
from qwentune.errors import QwentuneError
from qwentune.recipe.in_memory import InMemoryData
from qwentune.recipe.load import dump_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
TOOLS = json.loads((ROOT / "data/tools.json").read_text(encoding="utf-8"))

SHAREGPT = [
    {
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
            {"from": "observation", "value": '{"weather": "snow"}'},
            {"from": "gpt", "value": "Snowing."},
        ],
        "tools": json.dumps([{"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}]),
    },
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
]
ALPACA = [
    {"instruction": "Translate to French:", "input": "good morning", "output": "bonjour"},
    {"instruction": "Say hi", "output": "hi", "system": "You are terse."},
    {"instruction": "Add", "input": "1+1", "output": "2", "history": [["What is 0+0?", "0."]]},
]


def jsonl_rows(name: str, n: int) -> list[dict]:
    lines = (ROOT / "data" / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


def arrow_friendly(row: dict) -> dict:
    """Tool arguments and tool lists as JSON text (as hub datasets store them): Arrow cannot hold arguments that are
    objects in one row and text in another. The converted rows are in a format the files accept too."""
    row = json.loads(json.dumps(row))
    if isinstance(row.get("tools"), list):
        row["tools"] = json.dumps(row["tools"])
    for message in row.get("messages", []):
        for call in message.get("tool_calls") or []:
            fn = call.get("function", call)
            if not isinstance(fn.get("arguments"), str):
                fn["arguments"] = json.dumps(fn["arguments"])
    return row


def as_dataset(rows: list[dict]) -> datasets.Dataset:
    """A Dataset with every key of every row (Dataset.from_list keeps only the first row's keys)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return datasets.Dataset.from_dict({k: [row.get(k) for row in rows] for k in keys})


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe(train, method: str = "sft", **data):
    return load_recipe({"model": {"source": "x"}, "method": method, "data": {"train": train, **data}})


def prepare(r, tok):
    return prepare_data(r.data, r.method, r.base_dir, tok, quiet=True)


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWENTUNE_DATA_CACHE", str(tmp_path / "cache"))


def columns(prepared) -> dict:
    return {c: prepared.train[c] for c in prepared.train.column_names}


@pytest.mark.parametrize(
    "rows",
    [
        [arrow_friendly(r) for r in jsonl_rows("tool_calls.jsonl", 6)],
        SHAREGPT,
        ALPACA,
        jsonl_rows("preferences.jsonl", 3),
    ],
    ids=["messages_with_tool_calls", "sharegpt", "alpaca", "preference"],
)
def test_list_and_dataset_give_the_ids_and_labels_of_the_same_jsonl(tmp_path, qwen_tokenizer, rows):
    method = "dpo" if "chosen" in rows[0] else "sft"
    from_file = prepare(recipe([str(write_jsonl(tmp_path / "rows.jsonl", rows))], method), qwen_tokenizer)
    from_list = prepare(recipe(rows, method), qwen_tokenizer)
    from_dataset = prepare(recipe(as_dataset(rows), method), qwen_tokenizer)
    assert len(from_file.train) == len(rows)
    if method == "sft" and "messages" in rows[0]:  # the tool calls were rendered, not dropped
        assert sum("<tool_call>" in qwen_tokenizer.decode(ids) for ids in from_file.train["input_ids"]) >= 3
    assert columns(from_list) == columns(from_file)
    assert columns(from_dataset) == columns(from_file)
    (report,) = from_dataset.reports
    assert report.detected_format == from_file.reports[0].detected_format
    assert report.source.startswith("<in-memory: Dataset") and report.fingerprint


def test_train_data_keyword_replaces_data_train_and_keeps_eval(tmp_path, qwen_tokenizer):
    rows = jsonl_rows("instructions.jsonl", 4)
    r = load_recipe(
        {"model": {"source": "x"}, "data": {"train": ["unused.jsonl"]}},
        ["data.max_length=512"],
        train_data=rows,
        eval_data=datasets.Dataset.from_list(rows[:2]),
    )
    prepared = prepare(r, qwen_tokenizer)
    assert len(prepared.train) == 4 and len(prepared.eval) == 2
    assert [x.split for x in prepared.reports] == ["train", "eval"]


BAD = [
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": "anyone?"}]},  # row 1: no assistant turn
    {"messages": "not a list"},  # row 2: wrong type
    {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "search", "arguments": "{query: x}"}]},
        ]
    },  # row 3: tool arguments that are not JSON
    42,  # row 4: not an object (a string would name a file: rows and files do not mix)
    {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
]


def test_bad_in_memory_rows_are_counted_by_reason_with_their_index(qwen_tokenizer):
    prepared = prepare(recipe(BAD), qwen_tokenizer)
    (report,) = prepared.reports
    assert (report.total, report.kept) == (6, 2)
    where = {reason: [index for index, _ in examples] for reason, examples in report.examples.items()}
    assert where["no_assistant_turn"] == [1]
    assert where["invalid_tool_json"] == [3]
    assert sorted(i for indices in where.values() for i in indices) == [1, 2, 3, 4]
    assert report.index_kind == "row" and "row 1" in report.summary()
    with pytest.raises(QwentuneError) as e:
        prepare(recipe(BAD, bad_rows="error"), qwen_tokenizer)
    assert e.value.where.endswith("row 1") and e.value.where.startswith("<in-memory: list 6 rows")


def test_a_dataset_with_unknown_columns_names_its_columns_and_the_formats(qwen_tokenizer):
    ds = datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]})
    with pytest.raises(QwentuneError) as e:
        prepare(recipe(ds), qwen_tokenizer)
    text = str(e.value)
    assert "columns ['question', 'answer']" in text and "`instruction`+`output`" in text and "\n" not in text


def test_a_datasetdict_asks_for_a_split():
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA)})
    with pytest.raises(QwentuneError, match=r"DatasetDict \(it has train\).*one split"):
        recipe(dd)
    assert isinstance(recipe(dd["train"]).data.train[0], InMemoryData)


def test_recipe_yaml_records_a_placeholder_and_the_same_rows_the_same_fingerprint():
    rows = jsonl_rows("instructions.jsonl", 3)
    r = recipe(rows)
    text = dump_recipe(r)
    assert "<in-memory: list 3 rows, fingerprint " in text
    assert recipe([dict(x) for x in rows]).data.train == r.data.train  # a sha256 of the canonical JSON
    assert recipe(rows[:2]).data.train != r.data.train
    ds = datasets.Dataset.from_list(rows)
    assert ds._fingerprint[:16] in dump_recipe(recipe(ds))
    again = load_recipe(r.to_dict(), ["training.epochs=2"])  # a recipe copied with overrides keeps its rows
    assert again.data.train[0].rows is rows


def test_yaml_recipes_never_hold_in_memory_data(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {source: x}\ndata:\n  train:\n    - {messages: []}\n", encoding="utf-8")
    with pytest.raises(QwentuneError, match="data.train"):
        load_recipe(path)
