"""`qwentune preprocess` and `qwentune preview` as a user runs them (subprocess, real exit codes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tiny_models import shared_tokenizer, tiny_model_dir

from qwentune.rows.render import render_conversation
from qwentune.rows.template import load_template

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/qwen2.5-0.5b-instruct/sft_lora.yaml"


def qwentune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwentune", *args], cwd=ROOT, capture_output=True, text=True)


def test_preprocess_writes_exactly_the_rendered_rows(tmp_path):
    model = tiny_model_dir(tmp_path)
    out = tmp_path / "rows.jsonl"
    run = qwentune(
        "preprocess", str(RECIPE), f"model.source={model}", "data.eval=[]", "--output", str(out), "--limit", "5"
    )
    assert run.returncode == 0, run.stderr
    assert "5 of 5 rows kept" in run.stderr and "wrote 5 rows" in run.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and set(rows[0]) == {"input_ids", "labels"}
    raw = [json.loads(line) for line in (ROOT / "data/tool_calls.jsonl").read_text().splitlines()[:5]]
    tok = shared_tokenizer("qwen2.5-instruct")
    template = load_template("qwen2.5-instruct")
    from qwentune.rows.formats import convert

    for row, raw_row in zip(rows, raw):
        canon = convert(raw_row, "messages")
        expected = render_conversation(canon["messages"], canon["tools"], tok, template)
        assert row["input_ids"] == expected.input_ids and row["labels"] == expected.labels


def test_preprocess_bad_input_exits_2_and_writes_nothing(tmp_path):
    model = tiny_model_dir(tmp_path / "model")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run = qwentune(
        "preprocess", str(RECIPE), f"model.source={model}", "data.train=nope.jsonl", "-o", str(out_dir / "r.jsonl")
    )
    assert run.returncode == 2 and "nope.jsonl" in run.stderr and "data.train[0]" in run.stderr
    assert not list(out_dir.iterdir())


def test_preview_marks_trained_spans_in_plain_text(tmp_path):
    model = tiny_model_dir(tmp_path)
    run = qwentune("preview", str(RECIPE), f"model.source={model}", "data.eval=[]", "--rows", "1", "--no-color")
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert "<|im_start|>" in text and "[[" in text and "]]" in text
    trained = text[text.index("[[") : text.index("]]") + 2]
    assert "<|im_end|>" in trained and "<|im_start|>" not in trained  # headers are never trained
