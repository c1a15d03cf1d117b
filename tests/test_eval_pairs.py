"""`qwentune eval --turns all` (one prompt per assistant turn) and `--pairs` (a model's misses as DPO pairs that
train as is), on the bundled session rows and tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_in_process import run_main
from safetensors.torch import load_file, save_file
from tiny_models import shared_tokenizer, tiny_model_dir, tiny_training

import qwentune
from qwentune.eval.evaluation import _prompt_ids, _score_generation, collect, evaluate
from qwentune.rows import convert, load_template, render_preference_batch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "data" / "tool_calls.jsonl"
IM_END = 151645
THE = 279  # " the"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train_rows(n: int) -> list[dict]:
    return [convert(json.loads(line), "messages") for line in TRAIN.read_text().splitlines()[:n]]


def _turn_indices(messages: list[dict]) -> list[int]:
    """The assistant turns a row is scored at: each one that answers a user message or tool results."""
    return [
        i for i, m in enumerate(messages) if m["role"] == "assistant" and messages[i - 1]["role"] in ("user", "tool")
    ]


def the_model(tmp_path: Path) -> Path:
    """A tiny model (tied embeddings: it repeats its last token) whose "\\n" embedding points at " the": after the
    generation prompt's "assistant\\n" it says " the the the ...": never a call (a miss on every tool-call turn, right
    on every no-call turn), in tokens that are the tokenizer's own split of the text."""
    model_dir = tiny_model_dir(tmp_path)
    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    embed = state["model.embed_tokens.weight"]
    embed[198] = 0.9 * embed[THE]
    save_file(state, str(path), metadata={"format": "pt"})
    return model_dir


def test_turns_all_yields_one_prompt_per_assistant_turn_with_its_history():
    rows = _train_rows(3)
    first, _ = collect([TRAIN], limit=3)
    items, skipped = collect([TRAIN], limit=3, turns="all")
    assert skipped == [] and [(it.row, it.turn) for it in first] == [(1, 1), (2, 1), (3, 1)]
    want = [(n, i) for n, row in enumerate(rows, 1) for i in _turn_indices(row["messages"])]
    assert len(items) == len(want) > 3 + 3  # sessions: several scored turns a row
    tok, kinds = shared_tokenizer(), set()
    for item, (n, i) in zip(items, want, strict=True):
        messages = rows[n - 1]["messages"]
        assert item.row == n and item.prompt == messages[:i] and item.reply == messages[i]
        assert item.turn == sum(m["role"] == "assistant" for m in messages[: i + 1])
        assert item.tools == rows[n - 1]["tools"]  # tools, system and history: the row up to the turn
        kinds.add(item.kind)
        # the reference turn as the official template renders it scores right; the turn before it (if any) wrong
        prompt = tok.apply_chat_template(item.prompt, tools=item.tools, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template([*item.prompt, item.reply], tools=item.tools, tokenize=False)
        assert _score_generation(item, full[len(prompt) :].split("<|im_end|>")[0])["ok"] is True, (n, i)
    assert kinds == {"tool_call", "no_call"} and any(it.prompt[0]["role"] == "system" for it in items)
    with pytest.raises(qwentune.QwentuneError, match="turns must be one of first, all"):
        collect([TRAIN], turns="every")


def test_pairs_from_misses_train_as_dpo_with_exact_masks(tmp_path):
    model = the_model(tmp_path)
    out, pairs_file = tmp_path / "out", tmp_path / "pairs.jsonl"
    result = evaluate(str(model), [TRAIN], limit=2, turns="all", pairs=pairs_file, max_new_tokens=4, output=out,
                      progress=False)  # fmt: skip
    items, _ = collect([TRAIN], limit=2, turns="all")
    calls = [it for it in items if it.kind == "tool_call"]
    nocalls = len(items) - len(calls)
    metrics = result.metrics[str(model)]
    assert metrics["tool calls: exact"] == {"correct": 0, "total": len(calls)}
    assert metrics["no call: refrained"] == {"correct": nocalls, "total": nocalls}  # " the the ..." calls nothing
    assert f"{TRAIN}: 2 rows, {len(items)} turns scored (every assistant turn)" in result.table()
    saved = json.loads((out / "eval.json").read_text())
    assert [r["turn"] for r in saved["rows"][str(model)]] == [it.turn for it in items]
    assert "_ids" not in saved["rows"][str(model)][0]
    assert saved["pairs"] == {"path": str(pairs_file), "written": len(calls), "turns": len(items),
                              "misses": len(calls), "dropped": {}}  # fmt: skip

    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert len(pairs) == len(calls) >= 2  # every wrong turn, and only those
    for pair, item in zip(pairs, calls, strict=True):
        assert pair["prompt"] == item.prompt and pair["tools"] == item.tools and pair["chosen"] == [item.reply]
        assert pair["rejected"] == [{"role": "assistant", "content": " the the the the"}]
        assert pair["meta"] == {"model": str(model), "data": str(TRAIN), "row": item.row, "turn": item.turn,
                                "kind": "tool_call", "why": "no <tool_call> block", "reply": "greedy", "cut": True,
                                "exact": True}  # fmt: skip

    recipe = {
        "model": {"source": str(model)},
        "data": {"train": [str(pairs_file)], "max_length": 2048},
        "method": "dpo",
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": tiny_training(max_steps=1),
        "output": {"dir": str(tmp_path / "run"), "merge": False},
    }
    data = qwentune.prepare(recipe)
    (report,) = data.reports
    assert (report.detected_format, report.kept, report.skipped) == ("preference", len(pairs), {})
    tok = shared_tokenizer()
    chat = load_template("model", tok)
    chosen = render_preference_batch([convert(p, "preference") for p in pairs], tok, chat)
    for row, item, want in zip(data.train, calls, chosen, strict=True):
        assert row["prompt_input_ids"] == _prompt_ids(item, tok, chat.text)  # the very prompt eval generated from
        assert row["rejected_input_ids"] == [THE] * 4 + [IM_END]  # the model's reply tokens, then <|im_end|>
        assert row["chosen_input_ids"] == want.chosen_input_ids and row["chosen_input_ids"][-1] == IM_END


def test_sampled_misses_are_distinct_seeded_and_trainable(tmp_path):
    import torch

    from qwentune.eval.generate import sample_generate
    from qwentune.serve import load_for_inference, resolve_trained

    model_dir = the_model(tmp_path)
    oslo = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    call = {"role": "assistant", "content": "", "tool_calls": [oslo]}
    rows = [{"tools": [WEATHER], "messages": [{"role": "user", "content": "Weather in Oslo?"}, call]}]
    data_file = _write(tmp_path / "train.jsonl", rows)
    pairs_file = tmp_path / "pairs.jsonl"
    result = evaluate(str(model_dir), data_file, pairs=pairs_file, samples=4, temperature=2.0, seed=7,
                      max_new_tokens=3, progress=False)  # fmt: skip
    assert f"{data_file}: 1 row scored (the first assistant turn of each)" in result.table()
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    rejected = [p["rejected"][0]["content"] for p in pairs]
    assert len(set(rejected)) == len(pairs) == result.pairs.misses == 1 + 4  # greedy + 4 distinct samples
    assert pairs[0]["meta"]["reply"] == "greedy" and rejected[0] == " the the the"
    assert [p["meta"].get("sample") for p in pairs[1:]] == [0, 1, 2, 3]
    assert all(p["meta"]["temperature"] == 2.0 and p["meta"]["seed"] == 7 for p in pairs[1:])
    # each pair renders as training renders it (training drops none)
    rendered = render_preference_batch([convert(p, "preference") for p in pairs], shared_tokenizer(),
                                       load_template("model", shared_tokenizer()))  # fmt: skip
    assert all(not isinstance(r, Exception) for r in rendered)
    # the same seed samples the same tokens, whatever else is sampled; the global RNG is untouched
    model, tok = load_for_inference(resolve_trained(str(model_dir)))
    (item,), _ = collect([data_file])
    prompt = _prompt_ids(item, tok, load_template("model", tok).text)
    state = torch.random.get_rng_state()
    again = sample_generate(model, tok, [[1, 2, 3], prompt], samples=4, temperature=2.0, seed=6, max_new_tokens=3,
                            progress=False)[1]  # fmt: skip
    assert [tok.decode(ids, skip_special_tokens=False) for ids in again] == rejected[1:]
    assert torch.equal(torch.random.get_rng_state(), state)


def _run_dir(tmp_path: Path, eval_file: Path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(
        f"model:\n  source: {tmp_path / 'base'}\ndata:\n  train: [{TRAIN}]\n  eval: [{eval_file}]\n"
    )
    return run_dir


@pytest.mark.parametrize(
    "case", ["recipe_mode", "eval_split", "no_expected_turn", "no_tools", "two_models", "samples_alone", "overwrite",
             "bfcl"],
)  # fmt: skip
def test_pairs_refusals_are_one_line_before_any_model_loads(tmp_path, case):
    model, out = str(tmp_path / "no-model"), tmp_path / "pairs.jsonl"
    held_out = _write(tmp_path / "held_out.jsonl", [json.loads(TRAIN.read_text().splitlines()[0])])
    if case == "recipe_mode":
        args, expect = [str(_run_dir(tmp_path, held_out))], "pairs are never mined from the eval split"
    elif case == "eval_split":  # the run dir is the model; its recipe's eval split is the --data file
        run_dir = _run_dir(tmp_path, held_out)
        args, expect = [str(run_dir), "--data", str(held_out)], f"{held_out}: is the eval split of {run_dir}"
    elif case == "no_expected_turn":
        data = _write(tmp_path / "q.jsonl", [{"tools": [WEATHER], "messages": [{"role": "user", "content": "Oslo?"}]}])
        args, expect = [model, "--data", str(data)], "nothing scoreable (first row: no_expected_turn)"
    elif case == "no_tools":
        rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]}]
        args, expect = [model, "--data", str(_write(tmp_path / "sft.jsonl", rows))], "no turn to mine pairs from"
    elif case == "two_models":
        args, expect = [model, model, "--data", str(held_out)], "mines one model's misses, got 2 models"
    elif case == "samples_alone":
        args, expect = [model, "--data", str(held_out), "--samples", "2"], "sampled replies serve --pairs only"
    elif case == "overwrite":
        args, expect = [model, "--data", str(out)], "is one of the --data files"
        _write(out, [json.loads(TRAIN.read_text().splitlines()[0])])
    else:
        q = _write(tmp_path / "BFCL_v3_simple.json", [{"id": "simple_0", "question": [[{"role": "user",
                   "content": "x"}]], "function": []}])  # fmt: skip
        args, expect = [model, "--data", str(q)], "BFCL is an evaluation set"
    before = out.read_text() if out.exists() else None
    code, err = run_main(["eval", *args, *([] if case == "samples_alone" else ["--pairs", str(out)])])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert (out.read_text() if out.exists() else None) == before  # nothing written
