"""Every physical line / record of a data file is accounted for, run as a user runs it (subprocess `preprocess` and
`validate`): a stray CSV quote, an invalid UTF-8 line or a decompression-bomb image is one counted bad row at its
line, never a crash or rows lost; kept + skipped = rows, and rows + blank lines (+ the CSV header) = lines; a huge row
is decided over length from a byte bound before it is tokenized."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from tiny_models import shared_tokenizer, tiny_model_dir

from qwentune.errors import BadRow, QwentuneError
from qwentune.rows.fit import length_bound, max_token_bytes
from qwentune.rows.render import render_batch, render_preference_batch
from qwentune.rows.template import load_template

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "QWENTUNE_DEBUG": ""}
SUMMARY = re.compile(r"^(\S+) \[train\] format \S+: (\d+) of (\d+) rows kept(?:.*\((\d+) blank lines?)?")
SKIPPED = re.compile(r"^  skipped (\d+) (\w+): (.*)$")


def qwentune(*args: object, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwentune", *map(str, args)], cwd=cwd, capture_output=True, text=True, env=ENV
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


def write_recipe(tmp_path: Path, model: Path, train: Path, **data) -> Path:
    recipe = {
        "model": {"source": str(model)},
        "data": {"train": str(train), "template": "qwen2.5-instruct", "max_length": 256, **data},
        "peft": {"method": "lora", "r": 4, "alpha": 8},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return path


def reports(stderr: str) -> dict[str, dict]:
    """The per-file reports printed on stderr: {file: {kept, total, blank, skipped: {reason: (count, shown)}}}."""
    out: dict[str, dict] = {}
    current: dict = {}
    for line in stderr.splitlines():
        if match := SUMMARY.match(line):
            current = {"kept": int(match[2]), "total": int(match[3]), "blank": int(match[4] or 0), "skipped": {}}
            out[match[1]] = current
        elif match := SKIPPED.match(line):
            current["skipped"][match[2]] = (int(match[1]), match[3])
    return out


def preprocess(tmp_path: Path, recipe: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `preprocess` on a one-file recipe; its report parsed from stderr, plus the rows written."""
    out = tmp_path / "rows.jsonl"
    run = qwentune("preprocess", recipe, *overrides, "--output", out)
    report = next(iter(reports(run.stderr).values()), {})
    if report:
        report["written"] = len(out.read_text().splitlines()) if out.exists() else None
    return run, report


def assert_adds_up(report: dict, lines: int, header: int = 0) -> None:
    """kept + skipped = rows; rows + blank lines + header = the file's physical lines (records)."""
    assert report["kept"] + sum(c for c, _ in report["skipped"].values()) == report["total"], report
    assert report["total"] + report["blank"] + header == lines, report
    assert report.get("written", report["kept"]) == report["kept"], report


def pc(i: int) -> dict:
    return {"prompt": f"Question {i}?", "completion": f"Answer {i}."}


# ---------------------------------------------------------------- CSV


def test_csv_stray_quote_costs_one_line_and_the_rest_still_reads(tmp_path, model):
    # row 2 of 5 opens a quote that never closes: Python's csv would swallow rows 3-5 into one field
    text = 'prompt,completion\nq1,a1\n"q2 stray,a2\nq3,a3\nq4,a4\nq5,a5\n'
    path = tmp_path / "d.csv"
    path.write_text(text)
    run, report = preprocess(tmp_path, write_recipe(tmp_path, model, path))
    assert run.returncode == 0, run.stderr
    assert (report["kept"], report["total"]) == (4, 5)
    count, shown = report["skipped"]["csv_malformed"]
    assert count == 1 and shown.startswith("line 3 (a quoted field opened on this line never closes")
    assert_adds_up(report, lines=6, header=1)
    check = qwentune("validate", write_recipe(tmp_path, model, path))
    assert check.returncode == 0 and "4/5 sample rows convert" in check.stdout, check.stdout + check.stderr
    strict = qwentune("preprocess", write_recipe(tmp_path, model, path, bad_rows="error"), "-o", tmp_path / "x.jsonl")
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    assert f"{path}:3: bad row (csv_malformed)" in strict.stderr, strict.stderr


def test_csv_counts_add_up_with_quoted_newlines_wrong_field_counts_and_blank_lines(tmp_path, model):
    lines = [
        "prompt,completion",  # 1 header
        "q1,a1",  # 2 kept
        '"q2 over',  # 3 a legitimately quoted field over two lines: one row, at line 3
        'two lines",a2',  # 4
        "",  # 5 blank
        "q3,a3,extra",  # 6 three fields: csv_malformed
        "q4",  # 7 one field: csv_malformed
        '"q5 ""quoted""",a5',  # 8 kept
        "   ",  # 9 blank
        "q6,a6",  # 10 kept
    ]
    path = tmp_path / "d.csv"
    path.write_text("\r\n".join(lines) + "\r\n")
    run, report = preprocess(tmp_path, write_recipe(tmp_path, model, path))
    assert run.returncode == 0, run.stderr
    assert (report["kept"], report["total"], report["blank"]) == (4, 6, 2)
    count, shown = report["skipped"]["csv_malformed"]
    assert count == 2 and shown.startswith("line 6 (3 fields, the header has 2), line 7"), shown
    # 10 physical lines: 1 header + 2 blank + 6 rows + the second line of the quoted record
    assert_adds_up(report, lines=9, header=1)


# ---------------------------------------------------------------- encodings


def test_invalid_utf8_line_is_one_bad_row_at_its_line(tmp_path, model):
    path = tmp_path / "d.jsonl"
    good = [json.dumps(pc(i)).encode() + b"\n" for i in range(5)]
    path.write_bytes(good[0] + b'{"prompt": "caf\xe9?", "completion": "x"}\n' + b"\n" + b"".join(good[2:]))
    run, report = preprocess(tmp_path, write_recipe(tmp_path, model, path))
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert (report["kept"], report["total"], report["blank"]) == (4, 5, 1)
    assert report["skipped"]["bad_encoding"] == (1, "line 2 (not UTF-8: byte 0xe9 at column 16)")
    assert_adds_up(report, lines=6)
    check = qwentune("validate", write_recipe(tmp_path, model, path))
    assert check.returncode == 0 and "4/5 sample rows convert" in check.stdout, check.stdout + check.stderr


def test_invalid_utf8_csv_line_is_one_bad_row(tmp_path, model):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,completion\nq1,a1\nq2,\xff\xfe\nq3,a3\n")
    run, report = preprocess(tmp_path, write_recipe(tmp_path, model, path))
    assert run.returncode == 0, run.stderr
    assert report["skipped"]["bad_encoding"] == (1, "line 3 (not UTF-8: byte 0xff at column 4)")
    assert_adds_up(report, lines=4, header=1)


def test_invalid_utf8_json_document_is_one_clean_error(tmp_path, model):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n {"prompt": "a", "completion": "b"},\n {"prompt": "\xc3(", "completion": "b"}\n]\n')
    for command in ("preprocess", "validate"):
        args = ["-o", tmp_path / "x.jsonl"] if command == "preprocess" else []
        run = qwentune(command, write_recipe(tmp_path, model, path), *args)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        (line,) = run.stderr.strip().splitlines()
        offset = path.read_bytes().index(b"\xc3")
        assert f"{path}:3: not UTF-8 text: byte 0xc3 at byte offset {offset}" in line and "hint:" in line, line


# ---------------------------------------------------------------- counts add up for every format


def test_counts_add_up_for_jsonl_json_csv_and_parquet(tmp_path, model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "d.jsonl"  # blank lines are no rows: counted as blank lines, apart from the rows
    jsonl.write_text(
        "\n".join([json.dumps(pc(1)), "", json.dumps({"prompt": "x"}), "{broken", "  ", json.dumps(pc(2))])
    )
    doc = tmp_path / "d.json"
    doc.write_text(json.dumps([pc(1), {"prompt": "no completion"}, pc(2), 7, pc(3)], indent=1))
    csv = tmp_path / "d.csv"
    csv.write_text('prompt,completion\nq1,a1\n\n"q2,a2\nq3,a3,a3\nq4,a4\n')
    parquet = tmp_path / "d.parquet"
    rows = [pc(1), {"prompt": "empty", "completion": ""}, pc(2), {"prompt": None, "completion": "x"}, pc(3)]
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=2)
    recipe = write_recipe(tmp_path, model, jsonl)
    run = qwentune("preprocess", recipe, f"data.train=[{jsonl},{doc},{csv},{parquet}]", "-o", tmp_path / "o.jsonl")
    assert run.returncode == 0, run.stderr
    got = reports(run.stderr)
    expected = {  # file: (kept, rows, blank lines, physical lines or records, header lines)
        jsonl: (2, 4, 2, 6, 0),
        doc: (3, 5, 0, 5, 0),
        csv: (2, 4, 1, 6, 1),
        parquet: (3, 5, 0, 5, 0),
    }
    for path, (kept, total, blank, lines, header) in expected.items():
        report = got[str(path)]
        assert (report["kept"], report["total"], report["blank"]) == (kept, total, blank), (path, report)
        assert_adds_up(report, lines=lines, header=header)
    assert got[str(jsonl)]["skipped"]["invalid_json"][1].startswith("line 4 (")
    shown = sorted(s for _, s in got[str(doc)]["skipped"].values())
    assert [s[:6] for s in shown] == ["row 1 ", "row 3 "], shown  # a .json file's rows: 0-based elements
    assert got[str(csv)]["skipped"]["csv_malformed"] == (
        2,
        "line 4 (a quoted field opened on this line never closes "
        "(unexpected end of data); the line is counted alone), line 5",
    )
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2 + 3 + 2 + 3


def test_limit_counts_rows_not_blank_lines(tmp_path, model):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n".join(json.dumps(pc(i)) for i in range(6)) + "\n")
    run, report = preprocess(tmp_path, write_recipe(tmp_path, model, path), "--limit", "3")
    assert run.returncode == 0, run.stderr
    assert (report["kept"], report["total"], report["blank"]) == (3, 3, 2)


# ---------------------------------------------------------------- decompression bombs


def bomb_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A tiny PNG whose header claims width×height pixels (one zlib-compressed scanline: never a real image)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("vl"), "qwen2-vl-2b-instruct")


def image_row(image: str, answer: str) -> dict:
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


def test_decompression_bomb_png_is_one_counted_bad_row(tmp_path, vl_model):
    from PIL import Image

    bomb = bomb_png(tmp_path / "bomb.png")
    assert len(bomb.read_bytes()) < 80
    Image.new("RGB", (56, 56), "red").save(tmp_path / "red.png")
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(image_row(n, a)) + "\n" for n, a in [("red.png", "Red."), ("bomb.png", "?")]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps({"model": {"source": str(vl_model)}, "data": {"train": str(path), "max_length": 512}})
    )
    run, report = preprocess(tmp_path, recipe)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert (report["kept"], report["total"]) == (1, 2)
    count, shown = report["skipped"]["image_too_large"]
    assert count == 1 and shown.startswith(f"line 2 ({bomb}: Image size (400000000 pixels) exceeds limit"), shown
    assert_adds_up(report, lines=2)
    check = qwentune("validate", recipe)
    assert check.returncode == 0 and "1/2 sample rows convert" in check.stdout, check.stdout + check.stderr
    path.write_text(json.dumps(image_row("bomb.png", "?")) + "\n")  # nothing left: one clean error, exit 2
    check = qwentune("validate", recipe)
    assert check.returncode == 2 and "Traceback" not in check.stderr and "convert" in check.stderr, check.stderr


def test_collator_path_turns_a_bomb_into_one_clean_error(tmp_path):
    from qwentune.rows.images import opened_image

    with pytest.raises(QwentuneError, match=r"cannot use the image \(image_too_large\)"):
        opened_image(str(bomb_png(tmp_path / "bomb.png")))


# ---------------------------------------------------------------- huge rows


def test_the_byte_bound_is_qwens_longest_token_times_the_nfc_factor():
    tok = shared_tokenizer("qwen2.5-instruct")
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    assert max(len(t) for t in vocab) == 128  # a byte-level token spells one byte per character
    assert max_token_bytes(tok) == 128 * 3 and length_bound(tok, 100) == 38400
    # the bound never drops a row that fits: the densest text still has at least bytes / 128 tokens
    for text in (" " * 5000, "a" * 5000, "\u1100\u1161\u11a8" * 500, "😀" * 2000):
        assert len(tok(text, add_special_tokens=False)["input_ids"]) * max_token_bytes(tok) >= len(text.encode())


def test_rows_over_the_bound_are_over_length_without_tokenizing_and_rows_under_it_are_tokenized():
    tok = shared_tokenizer("qwen2.5-instruct")
    template = load_template("qwen2.5-instruct")
    bound = length_bound(tok, 64)
    rows = [
        {"messages": [{"role": "user", "content": "x" * (bound + 1)}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "x " * 100}, {"role": "assistant", "content": "y"}]},
    ]
    over, under = render_batch(rows, tok, template, max_bytes=bound)
    assert isinstance(over, BadRow) and over.reason == "over_length" and "not tokenized" in over.detail
    assert not isinstance(under, BadRow) and len(under.input_ids) > 64  # tokenized; fit drops or truncates it
    pair = {"prompt": rows[0]["messages"][:1], "chosen": {"role": "assistant", "content": "a"}, "rejected": "b"}
    pair["rejected"] = {"role": "assistant", "content": "b"}
    (bad,) = render_preference_batch([pair], tok, template, max_bytes=bound)
    assert isinstance(bad, BadRow) and bad.reason == "prompt_over_length"


MEASURE = """
import json, resource, runpy, sys, atexit
def report():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print("USAGE " + json.dumps([usage.ru_utime + usage.ru_stime, usage.ru_maxrss]), file=sys.stderr)
atexit.register(report)
sys.argv = ["qwentune", *sys.argv[1:]]
runpy.run_module("qwentune", run_name="__main__")
"""


def measured(tmp_path: Path, *args: object) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run qwentune; its CPU seconds and peak resident MB (the process's own getrusage)."""
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=ENV
    )
    cpu, rss_kb = json.loads(run.stderr.rsplit("USAGE ", 1)[1])
    return run, cpu, rss_kb / 1024


@pytest.mark.slow
def test_a_50_mb_row_is_over_length_in_seconds_not_minutes(tmp_path, model):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(pc(i)) + "\n" for i in range(3)))
    big = tmp_path / "big.jsonl"
    huge = {"prompt": "Summarize this.", "completion": "word " * 10_000_000}  # 50 MB on one line
    big.write_text(json.dumps(pc(0)) + "\n" + json.dumps(huge) + "\n" + json.dumps(pc(2)) + "\n")
    assert big.stat().st_size > 50_000_000
    base, cpu0, rss0 = measured(tmp_path, "preprocess", write_recipe(tmp_path, model, small), "-o", tmp_path / "a")
    assert base.returncode == 0, base.stderr
    for overlong in ("drop", "truncate"):  # truncate: such a row is never cut (that would mean tokenizing it all)
        recipe = write_recipe(tmp_path, model, big, overlong=overlong)
        run, cpu, rss = measured(tmp_path, "preprocess", recipe, "-o", tmp_path / "b")
        assert run.returncode == 0, run.stderr
        assert "2 of 3 rows kept" in run.stderr and "skipped 1 over_length: line 2 (the row renders to" in run.stderr
        assert "not tokenized, and never truncated" in run.stderr
        print(
            f"50 MB row ({overlong}): +{cpu - cpu0:.2f} s CPU, +{rss - rss0:.0f} MB peak ({cpu:.1f} s, {rss:.0f} MB)"
        )
        assert cpu - cpu0 < 2.0 and rss - rss0 < 500, (cpu0, cpu, rss0, rss)
