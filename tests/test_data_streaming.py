"""data.streaming (qwentune/data/streamed.py): train rows read, rendered and counted as training reads them. The rows
are the mapped path's own (same ids and masks, the bundled data), bad rows are counted by reason at their line,
memory does not grow with the rows read, a weighted mix samples its shares and reports the drawn counts, a resumed
run trains on the same rows in the same order (and ends with the same adapter), and what a stream cannot do is
refused in one line before any row is read."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_model_dir, tiny_training

from qwentune.data.pipeline import prepare_data as prepare_sections
from qwentune.data.sources import Source, read_source
from qwentune.data.streamed import STATE_FILE, StreamCheckpoints
from qwentune.errors import QwentuneError
from qwentune.recipe.load import load_recipe

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def chat(q: str = "Hi", a: str = "Hello!") -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def recipe(train: list, **data):
    training = data.pop("training", {"max_steps": 10})
    return load_recipe({"model": {"source": "x"}, "data": {"train": train, "streaming": True, **data},
                        "training": training})  # fmt: skip


def prepare(r, tok, streaming=True, **kwargs):
    return prepare_sections(r.data, r.method, r.base_dir, tok, quiet=True, streaming=streaming, **kwargs)


def taken(prepared, n: int) -> list[dict]:
    return list(itertools.islice(iter(prepared.train), n))


def same_rows(a: list[dict], b) -> bool:
    return all(x["input_ids"] == y["input_ids"] and x["labels"] == y["labels"] for x, y in zip(a, b, strict=True))


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QWENTUNE_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- the same rows as the mapped path


def test_streamed_rows_are_the_mapped_rows_on_the_bundled_data(qwen_tokenizer):
    """Tool sessions (with data.tools), instructions and tool decisions: every id and label of the stream's first pass
    equals the mapped path's, in file order; after the last row the next pass starts at the first."""
    files = ["tool_calls.jsonl", "instructions.jsonl", "tool_calls_decisions.jsonl"]
    train = [str(ROOT / "data" / f) if f == "tool_calls.jsonl" else {"path": str(ROOT / "data" / f), "limit": 120}
             for f in files]  # fmt: skip
    r = recipe(train, tools=str(ROOT / "data/tools.json"))
    mapped = prepare(r, qwen_tokenizer, streaming=False)
    streamed = prepare(r, qwen_tokenizer)
    n = len(mapped.train)
    rows = taken(streamed, n + 2)
    assert same_rows(rows[:n], mapped.train)
    assert same_rows(rows[n:], mapped.train.select([0, 1]))  # the second pass
    for m, s in zip(mapped.reports, streamed.stream.reports, strict=True):
        assert (s.source, s.detected_format, s.total, s.kept) == (m.source, m.detected_format, m.total, m.kept)
    assert streamed.stream.reports[0].repeated == 2 and sum(x.drawn for x in streamed.stream.reports) == n + 2
    assert same_rows(list(streamed.head), mapped.train.select(range(len(streamed.head))))


def test_bad_rows_are_counted_by_reason_at_their_line(tmp_path, qwen_tokenizer):
    """The stream counts what the mapped path counts: each skipped row by reason with its line, blank lines apart."""
    path = tmp_path / "t.jsonl"
    lines = [json.dumps(chat("a")), "{oops", "", json.dumps(chat("b", "x " * 400)), json.dumps({"what": 1}),
             json.dumps(chat("c"))]  # fmt: skip
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n" + json.dumps(chat("d")).encode() + b"\n")
    r = recipe([str(path)], max_length=64)
    mapped = prepare(r, qwen_tokenizer, streaming=False)
    streamed = prepare(r, qwen_tokenizer)
    assert same_rows(taken(streamed, 3), mapped.train)
    (m,), (s,) = mapped.reports, streamed.stream.reports
    assert s.skipped == m.skipped and s.examples == m.examples and s.blank_lines == m.blank_lines == 1
    assert (s.total, s.kept) == (m.total, m.kept) == (7, 3)
    lines = {reason: [line for line, _ in ex] for reason, ex in s.examples.items()}
    assert lines == {"invalid_json": [2], "over_length": [4], "empty": [5], "bad_encoding": [7]}
    assert "streamed" in s.summary()


def test_shuffle_buffer_is_seeded_and_takes_every_row_once_per_pass(tmp_path, qwen_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [chat(f"q{i}") for i in range(40)])
    mapped = prepare(recipe([str(path)]), qwen_tokenizer, streaming=False)
    ids = [tuple(row["input_ids"]) for row in mapped.train]
    order = [[ids.index(tuple(row["input_ids"])) for row in taken(prepare(recipe([str(path)], shuffle_buffer=8,
              seed=seed), qwen_tokenizer), 80)] for seed in (1, 1, 2)]  # fmt: skip
    assert order[0] == order[1] != order[2]
    assert sorted(order[0][:40]) == sorted(order[0][40:]) == list(range(40)) and order[0][:40] != order[0][40:]


def test_a_streamed_mix_samples_its_shares_and_reports_the_drawn_rows(tmp_path, qwen_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(f"a{i}") for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(f"b{i}") for i in range(5)])
    prepared = prepare(recipe([{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}]), qwen_tokenizer)
    taken(prepared, 200)
    ra, rb = prepared.stream.reports
    assert ra.drawn + rb.drawn == 200 and 120 < ra.drawn < 180  # sampled: about 150, not exactly
    assert rb.repeated == rb.drawn - 5 and (rb.total, rb.kept) == (5, 5)
    assert "shares sampled, not exact" in rb.summary() and "weight 1" in rb.summary()


def test_a_hub_dataset_is_streamed_not_downloaded(tmp_path):
    """The hub path (`load_dataset(..., streaming=True)`) on a local folder: nothing downloads in tests."""
    folder = tmp_path / "hub"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [chat(f"q{i}") for i in range(3)])
    rows = list(read_source(Source("data.train[0]", "hub", str(folder), split="train"), streaming=True))
    assert [i for i, _ in rows] == [0, 1, 2] and json.loads(rows[2][1]) == chat("q2")


# ---------------------------------------------------------------- resume: the same rows in the same order


def test_a_resumed_stream_goes_on_with_the_same_rows_and_counters(tmp_path, qwen_tokenizer):
    """Two weighted entries, a shuffle buffer, a bad row and a second pass: the place noted at 24 rows restores the
    rows from the 25th on and the counters as they were at 24."""
    a = write_jsonl(tmp_path / "a.jsonl", [chat(f"a{i}") for i in range(13)] + ["{bad"])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(f"b{i}") for i in range(6)])
    r = recipe([{"path": str(a), "weight": 2}, {"path": str(b), "weight": 1}], shuffle_buffer=4, seed=5)
    whole = prepare(r, qwen_tokenizer)
    saver = StreamCheckpoints(whole.stream, tmp_path, [], rows_per_step=4)
    rows = taken(whole, 48)
    checkpoint = tmp_path / "checkpoint-6"
    checkpoint.mkdir()

    class Args:
        output_dir = str(tmp_path)

    class State:
        global_step, is_world_process_zero = 6, True

    saver.on_save(Args, State, None)
    note = json.loads((checkpoint / STATE_FILE).read_text())
    assert note["rows"] == 24
    resumed = prepare(r, qwen_tokenizer)
    resumed.stream.resume(checkpoint)
    assert [x.to_dict() for x in resumed.stream.reports] == note["reports"]
    assert same_rows(taken(resumed, 24), rows[24:])
    assert [x.to_dict() for x in resumed.stream.reports] == [x.to_dict() for x in whole.stream.reports]


@pytest.mark.slow
def test_sigterm_and_resume_train_on_the_same_rows_as_an_uninterrupted_run(tmp_path):
    """A tiny model, a shuffled stream of 3 good rows and a bad one, 2 rows a step: stopped by SIGTERM after step 1
    (its checkpoint), resumed into the second pass: the adapter equals an uninterrupted run's bit for bit (rows and
    dropout alike), and data_report.json counts the rows trained on. Its two data.eval entries are each evaluated
    alone too (eval_<name>_loss)."""
    import signal

    from safetensors.torch import load_file
    from transformers import TrainerCallback

    import qwentune
    from qwentune.training import stopping

    class SignalAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    model_dir = tiny_model_dir(tmp_path)
    train = write_jsonl(tmp_path / "t.jsonl", [chat("q0", "a0"), chat("q1", "a1"), "{bad", chat("q2", "a2")])
    evals = write_jsonl(tmp_path / "tool-eval.jsonl", [chat("e0", "x y z"), chat("e1", "z")])

    def config(run_dir: Path) -> dict:
        return {
            "model": {"source": str(model_dir)},
            "data": {
                "train": [str(train)],
                "streaming": True,
                "shuffle_buffer": 3,
                "max_length": 64,
                "eval": [str(evals), {"path": str(train), "limit": 1}],
            },
            "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "train_new_tokens": "off"},
            "training": tiny_training(max_steps=2, per_device_batch_size=2, save_steps=1),
            "output": {"dir": str(run_dir), "merge": False, "sample_tokens": 0},
        }

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    qwentune.train(config(whole))
    run = qwentune.setup(config(cut))
    run.trainer.add_callback(SignalAt())
    with pytest.raises(stopping.TrainingInterrupted):
        run.train()
    assert json.loads((cut / "checkpoints" / "checkpoint-1" / STATE_FILE).read_text())["rows"] == 2
    qwentune.train(config(cut), ["training.resume=true"])
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    reports = [json.loads((d / "data_report.json").read_text()) for d in (whole, cut)]
    assert reports[0] == reports[1]
    report = reports[0][0]
    assert (report["total"], report["kept"], report["drawn"], report["repeated"]) == (4, 3, 4, 1)
    assert [line for line, _ in report["examples"]["invalid_json"]] == [3]
    # two data.eval entries: eval_loss over both, and each one's own loss, before and after training
    per_source = json.loads((whole / "metrics.json").read_text())["eval_loss_per_source"]
    assert set(per_source) == {"tool_eval", "t"} and all(set(v) == {"before", "after"} for v in per_source.values())
    logged = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "eval_tool_eval_loss" in row][0] == 0


# ---------------------------------------------------------------- memory flat in the rows read

MEMORY_SCRIPT = """
import itertools, json, sys
sys.path.insert(0, {tests!r})
from tiny_models import shared_tokenizer
from qwentune.data.pipeline import prepare_data
from qwentune.recipe.load import load_recipe

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

r = load_recipe({{"model": {{"source": "x"}}, "data": {{"train": [{path!r}], "streaming": True, "max_length": 64}},
                 "training": {{"max_steps": 1}}}})
prepared = prepare_data(r.data, r.method, r.base_dir, shared_tokenizer("qwen2.5-instruct"), quiet=True,
                        streaming=True)
stream = iter(prepared.train)
out = []
for n in {sizes!r}:
    kept = sum(1 for _ in itertools.islice(stream, n))
    out.append(anon_kb())
report, = prepared.stream.reports
print(json.dumps({{"anon_kb": out, "total": report.total, "kept": report.kept}}))
"""


def test_memory_stays_flat_in_the_rows_read(tmp_path):
    """RssAnon after streaming N rows and after 10N: it does not grow with the rows (nine of ten rows carry 16 KB and
    are counted as unknown_format, so holding their text would add ~60 MB)."""
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(4400):
            f.write(json.dumps({"blob": f"{i}" + "x" * 16000} if i % 10 else chat(f"q{i}")) + "\n")
    kept = [44, 440]  # kept rows taken: N = 440 rows read, then 10N = 4400
    script = MEMORY_SCRIPT.format(tests=str(ROOT / "tests"), path=str(path), sizes=[kept[0], kept[1] - kept[0]])
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    small, large = out["anon_kb"]
    print(f"RssAnon after {kept[0] * 10} rows: {small / 1024:.0f} MB, after {kept[1] * 10}: {large / 1024:.0f} MB")
    assert out["kept"] == 440 and out["total"] >= 4391
    assert large - small < 15 * 1024, out  # the 3,960 more rows read hold ~60 MB of text


# ---------------------------------------------------------------- refused in one line, before any row is read


WEIGHTED = [{"path": "missing.jsonl", "weight": 1}, {"path": "missing.jsonl", "weight": 2}]


@pytest.mark.parametrize(
    ("data", "training", "key"),
    [
        ({}, {"max_steps": -1}, "training.max_steps"),
        ({"eval_fraction": 0.1}, {"max_steps": 5}, "data.eval_fraction"),
        ({"dedupe": True}, {"max_steps": 5}, "data.dedupe"),
        ({"streaming": False, "shuffle_buffer": 10}, {"max_steps": 5}, "data.shuffle_buffer"),
        ({"train": WEIGHTED, "mix_rows": 10}, {"max_steps": 5}, "data.mix_rows"),
    ],
)
def test_what_a_stream_cannot_do_is_refused_at_load(data, training, key):
    data = dict(data)
    with pytest.raises(QwentuneError) as info:
        recipe(data.pop("train", ["missing.jsonl"]), **data, training=training)  # the file is never looked at
    assert f"'{key}'" in str(info.value)


@pytest.mark.parametrize(
    ("section", "key"),
    [({"method": "dpo"}, "method"), ({"sft": {"packing": True}}, "sft.packing"),
     ({"training": {"max_steps": 5, "dataloader_num_workers": 2}}, "training.dataloader_num_workers")],
)  # fmt: skip
def test_other_methods_packing_and_workers_are_refused(section, key):
    config = {"model": {"source": "x"}, "data": {"train": ["x.jsonl"], "streaming": True},
              "training": {"max_steps": 5}} | section  # fmt: skip
    with pytest.raises(QwentuneError) as info:
        load_recipe(config)
    assert f"'{key}'" in str(info.value)


def test_the_cli_refuses_streaming_without_max_steps_in_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"model": {"source": "x"}, "data": {"train": ["nothing.jsonl"], "streaming": True}}))
    done = subprocess.run([sys.executable, "-m", "qwentune", "train", str(path)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "training.max_steps" in lines[0], done.stderr


def test_whole_file_sources_are_refused(tmp_path, qwen_tokenizer):
    path = tmp_path / "t.csv"
    path.write_text("instruction,output\nhi,hello\n")
    with pytest.raises(QwentuneError) as info:
        prepare(recipe([str(path)]), qwen_tokenizer)
    assert "cannot be streamed" in str(info.value) and info.value.where == "data.train[0]"


# ---------------------------------------------------------------- eval loss per data.eval entry


def test_each_data_eval_entry_is_a_part_of_its_own(tmp_path, qwen_tokenizer):
    """Two data.eval entries: every eval row once in `eval`, and each entry's rows (in order) in its named part."""
    a = write_jsonl(tmp_path / "tools-eval.jsonl", [chat(f"a{i}") for i in range(3)])
    b = write_jsonl(tmp_path / "chat.jsonl", [chat(f"b{i}") for i in range(2)])
    r = recipe([str(b)], eval=[str(a), {"path": str(b), "limit": 1}])
    prepared = prepare(r, qwen_tokenizer, streaming=False)
    parts = prepared.eval_parts
    assert {name: len(part) for name, part in parts.items()} == {"tools_eval": 3, "chat": 1}
    assert "_src" not in prepared.eval.column_names and "_src" not in parts["chat"].column_names
    assert same_rows(list(parts["tools_eval"]) + list(parts["chat"]), prepared.eval)
    assert prepare(recipe([str(b)], eval=[str(a)]), qwen_tokenizer, streaming=False).eval_parts is None
