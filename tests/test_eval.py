"""`qwentune eval` end to end: the reference replies score 1, a random tiny model scores 0, outputs and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import shared_tokenizer, tiny_model_dir

from qwentune.eval.evaluation import _score_generation, collect, evaluate

ROOT = Path(__file__).resolve().parents[1]
TOOLS_EVAL = ROOT / "data" / "tool_calls_eval.jsonl"
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


def _reference_reply(item, tokenizer) -> str:
    """The text the official template renders for the reference assistant turn (what a perfect model generates)."""
    prompt = tokenizer.apply_chat_template(item.prompt, tools=item.tools, add_generation_prompt=True, tokenize=False)
    calls = [{"type": "function", "function": c} for c in item.expected]
    reply = {
        "role": "assistant",
        "content": "" if calls else "It is sunny.",
        **({"tool_calls": calls} if calls else {}),
    }
    full = tokenizer.apply_chat_template([*item.prompt, reply], tools=item.tools, tokenize=False)
    assert full.startswith(prompt)
    return full[len(prompt) :].split("<|im_end|>")[0]


def test_perfect_scripted_replies_score_one(tmp_path):
    no_call = {
        "tools": [WEATHER],
        "messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello"}],
    }
    items, skipped = collect([TOOLS_EVAL, _write(tmp_path / "nocall.jsonl", [no_call])])
    assert skipped == [] and len(items) == 41
    calls = sum(it.kind == "tool_call" for it in items)
    assert calls > 0 and sum(it.kind == "no_call" for it in items) == 41 - calls and items[-1].kind == "no_call"
    tok = shared_tokenizer()
    verdicts = [_score_generation(it, _reference_reply(it, tok)) for it in items]
    assert [v["why"] for v in verdicts if not v["ok"]] == []


def test_random_tiny_model_scores_zero_and_outputs_are_written(tmp_path):
    model = str(tiny_model_dir(tmp_path))
    rows = [
        {"tools": [WEATHER], "messages": [{"role": "user", "content": "Weather in Oslo?"}]},  # no expected turn
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]},
    ]
    extra = _write(tmp_path / "mixed.jsonl", rows)
    out = tmp_path / "out"
    result = evaluate([model, model], [TOOLS_EVAL, extra], limit=3, max_new_tokens=8, output=out, progress=False,
                      labels=["a", "b"])  # fmt: skip
    metrics = result.metrics["a"]
    calls, nocalls = metrics["tool calls: exact"], metrics["no call: refrained"]  # the first 3 rows: both kinds
    assert calls["correct"] == 0 and calls["total"] + nocalls["total"] == 3
    assert metrics["sft: loss"]["total"] == 1 and metrics["sft: loss"]["value"] > 5  # random model: ~ln(vocab)
    assert result.metrics["a"] == result.metrics["b"]
    assert result.skipped == [{"file": str(extra), "row": 1, "reason": "no_expected_turn"}]
    table = result.table()
    assert (
        "Δ b vs a" in table
        and "+0.0 pt" in table
        and "mixed.jsonl: 1 row(s) skipped (no_expected_turn: rows 1)" in table
    )
    saved = json.loads((out / "eval.json").read_text())
    row = saved["rows"]["a"][0]
    assert {"prompt", "expected", "got", "verdict", "why"} <= set(row) and row["verdict"] is False and row["why"]
    assert (out / "eval.md").read_text().startswith("## Evaluation")
    sft = next(r for r in saved["rows"]["a"] if r["kind"] == "sft")
    from qwentune.rows.render import render_conversation
    from qwentune.rows.template import load_template

    tok = shared_tokenizer()
    rendered = render_conversation(rows[1]["messages"], None, tok, load_template("model", tok))
    assert sft["tokens"] == rendered.num_trained  # exactly the trained tokens are scored


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "qwentune", "eval", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)  # fmt: skip


@pytest.mark.parametrize("case", ["nothing_scoreable", "bad_model", "bfcl_ids", "no_data"])
def test_cli_refuses_bad_input_with_one_line(tmp_path, case):
    out = tmp_path / "out"
    if case == "nothing_scoreable":
        data = _write(tmp_path / "empty.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
        args, expect = [str(tmp_path / "no-model"), "--data", str(data)], f"{data} row 1"
    elif case == "bad_model":
        args, expect = [str(tmp_path / "no-model"), "--data", str(TOOLS_EVAL)], "no-model"
    elif case == "bfcl_ids":
        q = [{"id": "simple_0", "question": [[{"role": "user", "content": "x"}]], "function": []}]
        questions = _write(tmp_path / "q.json", q)
        answers = _write(tmp_path / "a.json", [{"id": "simple_9", "ground_truth": []}])
        args = [str(tmp_path / "no-model"), "--data", str(questions), "--bfcl-answers", str(answers)]
        expect = f"{questions} row 1"
    else:
        args, expect = [str(tmp_path / "no-model")], "no eval data"
    proc = _cli(*args, "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_adapter_dir_loads_base_plus_adapter_unmerged(tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwentune.serve.inference import load_for_inference, resolve_trained

    base = tiny_model_dir(tmp_path)
    torch.manual_seed(0)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    sidecar = adapter / "qwentune_train.json"
    # a sidecar with only model_card.base (written by hand or another tool): that is the base
    sidecar.write_text(json.dumps({"format": "qwentune-train", "model_card": {"base": str(base)}}))
    assert resolve_trained(adapter).model_path == base
    # training's own key, base_model, wins over model_card.base
    sidecar.write_text(json.dumps({"base_model": str(base), "model_card": {"base": str(tmp_path / "gone")}}))
    trained = resolve_trained(adapter)
    assert trained.kind == "adapter" and trained.model_path == base and trained.adapter_path == adapter
    model, _ = load_for_inference(trained)
    assert isinstance(model, PeftModel)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = peft.eval()(ids).logits
        got = model(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(ids).logits
    assert torch.equal(got, want) and not torch.allclose(got, plain)


def test_after_training_and_recipe_run_dir(tmp_path):
    import shutil

    from qwentune.eval.evaluation import evaluate_after_training
    from qwentune.recipe.sections import EvalSection

    base = tiny_model_dir(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(f"model:\n  source: {base}\ndata:\n  train: [{TOOLS_EVAL}]\n")
    proc = _cli(str(run_dir), cwd=tmp_path)  # no merged model yet
    assert proc.returncode == 2 and "no merged/ model or adapter/" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    shutil.copytree(base, run_dir / "merged")
    out = evaluate_after_training(
        run_dir, EvalSection(limit=2, max_new_tokens=4), str(base), [TOOLS_EVAL], progress=False
    )
    assert set(out["metrics"]) == {"base", "tuned"} and out["metrics"]["base"] == out["metrics"]["tuned"]
    refrained = out["metrics"]["base"]["no call: refrained"]["correct"]  # rows 1-2: a call, then a no-call prompt
    assert out["summary"] == (
        f"tool calls on 1 held-out prompt: base 0/1 → tuned 0/1; no call on 1 held-out prompt: "
        f"base {refrained}/1 → tuned {refrained}/1"
    )
    assert "| tool calls: exact | 0/1 (0.0%) | 0/1 (0.0%) | +0.0 pt |" in out["markdown"]
    assert json.loads((run_dir / "eval" / "eval.json").read_text())["models"] == ["base", "tuned"]
    assert (run_dir / "eval.md").read_text() == out["markdown"]  # the table the model card includes


def test_notebook_api_name_is_the_function_and_the_module_still_imports():
    code = (
        "import types, qwentune\n"
        "from qwentune.eval.evaluation import parse_tool_calls, evaluate\n"
        "import qwentune.eval.toolscore\n"
        "fn = qwentune.evaluate\n"
        "assert fn.__module__ == 'qwentune.api' and not isinstance(fn, types.ModuleType)\n"
        'text = \'<tool_call>{"name": "f", "arguments": {}}</tool_call>\'\n'
        "assert parse_tool_calls(text) == [{'name': 'f', 'arguments': {}}]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
