"""Weighted mixing of data.train entries (data/mix.py through the pipeline): exact quotas by largest remainder,
seeded draws per entry, repeats reported, eval_fraction per entry; data.dedupe; and the bad input of both."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_in_process import run_main
from hypothesis import given, settings
from hypothesis import strategies as st

from qwentune.data.mix import largest_total, quotas
from qwentune.data.pipeline import prepare_data as prepare_sections
from qwentune.errors import QwentuneError
from qwentune.recipe.load import load_recipe


def chat(tag: str, i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"{tag} question {i}"}, {"role": "assistant", "content": f"{i}"}]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe(train: list, **data):
    return load_recipe({"model": {"source": "x"}, "data": {"train": train, "max_length": 64, **data}})


def prepare(r, tok, **kwargs):
    return prepare_sections(r.data, r.method, r.base_dir, tok, keep_origin=True, quiet=True, **kwargs)


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QWENTUNE_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def three(tmp_path) -> list[Path]:
    """Three sources of 2,000 / 1,500 / 500 rows; in the third every 100th line is not JSON (a bad row)."""
    a = write_jsonl(tmp_path / "a.jsonl", [chat("a", i) for i in range(2000)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat("b", i) for i in range(1500)])
    c_rows = [chat("c", i) if i % 100 else "{not json" for i in range(500)]
    c = tmp_path / "c.jsonl"
    c.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in c_rows), encoding="utf-8")
    return [a, b, c]


def tags(prepared) -> list[str]:
    """Which source each drawn row came from (its _src column) and its line."""
    return list(zip(prepared.train["_src"], prepared.train["_row"]))


# ---------------------------------------------------------------- the arithmetic


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 100), min_size=1, max_size=6), st.integers(1, 100_000))
def test_quotas_sum_to_the_total_and_stay_within_one_row_of_the_exact_share(weights, total):
    q = quotas(weights, total)
    assert sum(q) == total
    exact = np.asarray(weights) / sum(weights) * total
    assert all(abs(x - e) < 1 for x, e in zip(q, exact))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 10), st.integers(1, 5000)), min_size=1, max_size=5))
def test_the_default_total_is_the_largest_that_repeats_no_row(entries):
    weights, sizes = [w for w, _ in entries], [s for _, s in entries]
    n = largest_total(weights, sizes)
    assert all(q <= s for q, s in zip(quotas(weights, n), sizes))
    share = np.asarray(weights) / sum(weights)
    bound = min(int(np.ceil((s + 1) / p)) for p, s in zip(share, sizes))  # from here an entry's floor share is past it
    for bigger in range(n + 1, bound + 2):
        assert any(q > s for q, s in zip(quotas(weights, bigger), sizes)), bigger


# ---------------------------------------------------------------- through the pipeline


def test_three_sources_exact_quotas_at_10k_rows_seeded_and_reported(tmp_path, three, qwen_tokenizer):
    a, b, c = three
    train = [{"path": str(a), "weight": 0.5}, {"path": str(b), "weight": 0.3}, {"path": str(c), "weight": 0.2}]
    prepared = prepare(recipe(train, mix_rows=10_000), qwen_tokenizer)
    assert len(prepared.train) == 10_000
    counts = np.bincount(np.asarray(prepared.train["_src"]), minlength=3).tolist()
    assert counts == [5000, 3000, 2000]  # exact shares, not sampled ones
    ra, rb, rc = prepared.reports
    assert (ra.kept, ra.drawn, ra.repeated, ra.weight) == (2000, 5000, 3000, 0.5)
    assert (rb.kept, rb.drawn, rb.repeated) == (1500, 3000, 1500)
    assert (rc.total, rc.kept, rc.skipped, rc.drawn, rc.repeated) == (500, 495, {"invalid_json": 5}, 2000, 1505)
    assert "5000 drawn into the mix (weight 0.5), 3000 of them repeats" in ra.summary()
    # every kept row of an entry whose quota is a whole multiple of its rows is drawn equally often
    lines_a = [row for src, row in tags(prepared) if src == 0]
    assert set(np.unique(lines_a, return_counts=True)[1].tolist()) == {2, 3}
    # the same seed draws the same rows; another seed other rows
    assert tags(prepare(recipe(train, mix_rows=10_000), qwen_tokenizer)) == tags(prepared)
    other = prepare(recipe(train, mix_rows=10_000, seed=7), qwen_tokenizer)
    assert tags(other) != tags(prepared)
    assert np.bincount(np.asarray(other.train["_src"]), minlength=3).tolist() == [5000, 3000, 2000]


def test_default_total_repeats_nothing_and_each_entry_draws_on_its_own(tmp_path, three, qwen_tokenizer):
    a, b, c = three
    train = [{"path": str(a), "weight": 2}, {"path": str(b), "weight": 1}]
    prepared = prepare(recipe(train), qwen_tokenizer)
    # b's 1,500 rows at a third of the mix: 4,500 rows, a gives 3,000 (> its 2,000 rows: smaller total) →
    # the largest N with a's quota ≤ 2,000 is 3,000: 2,000 + 1,000
    assert [r.drawn for r in prepared.reports] == [2000, 1000] and not any(r.repeated for r in prepared.reports)
    drawn_b = sorted(row for src, row in tags(prepared) if src == 1)
    # entry b's draw does not move when entry a changes (its own seeded stream)
    write_jsonl(a, [chat("a2", i) for i in range(2000)])
    again = prepare(recipe(train), qwen_tokenizer)
    assert sorted(row for src, row in tags(again) if src == 1) == drawn_b


def test_limit_split_and_format_per_entry(tmp_path, qwen_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [chat("a", i) for i in range(30)])
    sharegpt = [
        {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]} for i in range(9)
    ]
    b = write_jsonl(tmp_path / "b.jsonl", sharegpt)
    train = [{"path": str(a), "weight": 1, "limit": 10}, {"path": str(b), "weight": 1, "format": "sharegpt"}]
    prepared = prepare(recipe(train, limit=20), qwen_tokenizer)
    ra, rb = prepared.reports
    assert (ra.total, rb.total, rb.detected_format) == (10, 9, "sharegpt")  # the smaller of the limits
    assert (ra.drawn, rb.drawn) == (10, 9)  # 19 rows: 9.5 each, the tie rounded up for the first entry


def test_eval_fraction_is_split_off_per_entry(tmp_path, three, qwen_tokenizer):
    a, b, _ = three
    train = [{"path": str(a), "weight": 1}, {"path": str(b), "weight": 1}]
    prepared = prepare(recipe(train, eval_fraction=0.1), qwen_tokenizer)
    evals = np.bincount(np.asarray(prepared.eval["_src"]), minlength=2).tolist()
    assert evals == [200, 150]  # each entry its own tenth
    train_rows = set(tags(prepared))
    assert not train_rows & set(zip(prepared.eval["_src"], prepared.eval["_row"]))


def test_mixing_from_python_in_memory_rows_and_a_file(tmp_path, qwen_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [chat("a", i) for i in range(40)])
    rows = [chat("mem", i) for i in range(10)]
    r = load_recipe({"model": {"source": "x"}, "data": {"max_length": 64}}, train_data=[
        {"path": rows, "weight": 1}, {"path": str(a), "weight": 3}
    ])  # fmt: skip
    prepared = prepare(r, qwen_tokenizer)
    assert [x.drawn for x in prepared.reports] == [10, 31]  # 41 rows: 10.25 and 30.75
    assert prepared.reports[0].source.startswith("<in-memory: list 10 rows")


def test_dedupe_drops_the_same_conversation_counted_with_its_line(tmp_path, qwen_tokenizer):
    same = chat("x", 1)
    reordered = {"messages": [{"content": m["content"], "role": m["role"]} for m in same["messages"]]}
    sharegpt = [
        {"conversations": [{"from": "human", "value": f"x question {i}"}, {"from": "gpt", "value": f"{i}"}]}
        for i in (1, 3)
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [same, chat("x", 2), reordered, same])
    other = write_jsonl(tmp_path / "e.jsonl", sharegpt)
    off = prepare(recipe([str(path)]), qwen_tokenizer)
    assert len(off.train) == 4  # off by default
    on = prepare(recipe([str(path), str(other)], dedupe=True, bad_rows="error"), qwen_tokenizer)
    first, second = on.reports
    assert (first.kept, first.skipped, [line for line, _ in first.examples["duplicate"]]) == (
        2,
        {"duplicate": 2},
        [3, 4],
    )
    assert (second.kept, second.skipped) == (1, {"duplicate": 1})  # across files and formats
    assert tags(on) == [(0, 1), (0, 2), (1, 2)]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train": [{"path": "a.jsonl", "weight": 1}, "b.jsonl"]}, "'data.train[1]' has no weight"),
        ({"train": [{"path": "a.jsonl", "weight": 0}]}, "'data.train[0].weight' must be > 0"),
        ({"train": [{"path": "a.jsonl", "weight": -2}]}, "'data.train[0].weight' must be > 0"),
        ({"train": [{"path": "a.jsonl", "weight": float("inf")}]}, "'data.train[0].weight' must be a finite number"),
        ({"train": [{"path": "a.jsonl", "weight": float("nan")}]}, "'data.train[0].weight' must be a finite number"),
        ({"train": [{"path": "a.jsonl", "weight": 1}, {"path": "b", "weight": 1}], "mix_rows": 1}, "at least the"),
        ({"train": ["a.jsonl"], "mix_rows": 100}, "'data.mix_rows' sets the rows of a weighted mix"),
        ({"train": [{"path": "a.jsonl", "wieght": 1}]}, "unknown key 'data.train[0].wieght'"),
        ({"train": [{"path": "a.jsonl", "format": "chatml"}]}, "'data.train[0].format' must be one of"),
        ({"train": [{"path": "", "weight": 1}]}, "'data.train[0].path' is required"),
        ({"train": ["a.jsonl"], "eval": [{"path": "e.jsonl", "weight": 1}]}, "'data.eval[0].weight' has no use"),
    ],
)
def test_bad_mix_settings_are_refused_before_any_row_is_read(data, message):
    with pytest.raises(QwentuneError) as e:
        load_recipe({"model": {"source": "x"}, "data": data})
    assert message in e.value.message


def test_a_bad_weight_in_a_recipe_file_is_one_line_naming_its_line_exit_2(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "model:\n  source: x\ndata:\n  train:\n    - path: a.jsonl\n      weight: 1\n    - path: b.jsonl\n"
        "      weight: 0\n",
        encoding="utf-8",
    )
    code, err = run_main(["validate", str(path)])
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {path}:8: 'data.train[1].weight' must be > 0, got 0.0 (hint: e.g. 0.2 (weights are relative))"
    ]
