"""`qwentune eval` on Qwen2-VL rows: the loss is training's loss on those rows, the greedy reply is what
`qwentune chat` and a plain `generate` give with the same pixels, short answers are matched exactly, and a text model
skips the rows.
A tiny random Qwen2-VL (tests/tiny_models.py) on the bundled image rows (data/vl/shapes_eval.jsonl)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from tiny_models import shared_tokenizer, tiny_model_dir

from qwentune.errors import QwentuneError
from qwentune.eval.evaluation import _prompt_ids, collect, evaluate
from qwentune.eval.vision import NEEDS_VISION, normalize_answer, score_answer

torch = pytest.importorskip("torch")
pytest.importorskip("PIL.Image")

ROOT = Path(__file__).resolve().parents[1]
SHAPES_EVAL = ROOT / "data" / "vl" / "shapes_eval.jsonl"
TEXT_ROW = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("vl"), "qwen2-vl-2b-instruct")


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_vl_loss_is_the_training_loss_of_the_same_rows(vl_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    from qwentune.model.vision import vision_collator
    from qwentune.recipe.load import load_recipe
    from qwentune.training.inputs import prepare_inputs  # what qwentune.prepare and training run

    text = _write(tmp_path / "text.jsonl", [TEXT_ROW])
    result = evaluate([str(vl_dir)], [SHAPES_EVAL, text], limit=2, max_new_tokens=3, progress=False)
    metrics, records = result.metrics[str(vl_dir)], result.rows[str(vl_dir)]
    assert metrics["vl: loss"]["total"] == 2 and metrics["vl: exact"]["total"] == 2
    assert metrics["sft: loss"]["total"] == 1  # a vision model keeps scoring text rows (no pixels)
    assert result.skipped == [] and result.summary(held_out=True).startswith("short answers on 2 held-out image rows")

    recipe = load_recipe({"model": {"source": str(vl_dir)}, "data": {"train": [str(SHAPES_EVAL)]}})
    _, tokenizer, settings, data = prepare_inputs(recipe, limit=2)
    rows = [data.train[i] for i in range(2)]
    assert [r["image_files"] for r in rows] == [[str(ROOT / f"data/vl/images/{n}.png")] for n in ("0121", "0122")]
    vl = [r for r in records if r["kind"] == "vl"]
    assert [r["tokens"] for r in vl] == [sum(lab != -100 for lab in r["labels"]) for r in rows]  # the trained tokens

    collator = vision_collator(vl_dir, recipe.model, tokenizer, settings)  # training's own collator
    batch = collator([{k: r[k] for k in ("input_ids", "labels", "image_files", "image_sizes")} for r in rows])
    model = AutoModelForImageTextToText.from_pretrained(vl_dir, dtype=torch.float32).eval()
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    hand = nll.item() / int((targets != -100).sum())
    assert metrics["vl: loss"]["value"] == pytest.approx(hand, rel=1e-5)
    assert metrics["vl: loss"]["value"] > 5  # a random model: about ln(vocab); the pixels went in (not a text path)


def _reference_reply(item, tokenizer) -> str:
    """What a perfect model generates: the reference turn as the official template renders it."""
    prompt = tokenizer.apply_chat_template(item.prompt, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*item.prompt, {"role": "assistant", "content": item.expected}], tokenize=False
    )
    assert full.startswith(prompt)
    return full[len(prompt) :].split("<|im_end|>")[0]


def test_short_answers_match_exactly_after_normalizing():
    assert normalize_answer("  One.\n") == normalize_answer("one") == "one"
    assert normalize_answer("A Triangle.") == "a triangle" and normalize_answer("3.5") == "3.5"
    assert score_answer("One.", "one")["ok"] is True and score_answer("One.", "ONE.  ")["ok"] is True
    assert score_answer("One.", "Two.") == {"ok": False, "why": "a different answer"}
    assert score_answer("One.", "One, I think.")["ok"] is False and score_answer("One.", "")["ok"] is False
    long = "A yellow diamond, a pink diamond and a purple cross."
    assert score_answer(long, long)["ok"] is None and "loss only" in score_answer(long, long)["why"]

    items, skipped = collect([SHAPES_EVAL], limit=3)
    assert skipped == [] and [it.kind for it in items] == ["vl"] * 3
    assert items[0].images[0].ref == str(ROOT / "data/vl/images/0121.png") and items[0].images[0].width > 0
    tok = shared_tokenizer("qwen2-vl-instruct")
    perfect = [score_answer(it.expected, _reference_reply(it, tok))["ok"] for it in items]
    assert perfect == [True, True, None]  # the third reference is a 10-word caption: loss only
    assert [score_answer(it.expected, "A square.")["ok"] for it in items[:2]] == [False, False]


def test_missing_image_is_a_skipped_row(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "gone.png"},
                                                    {"type": "text", "text": "What?"}]},
                      {"role": "assistant", "content": "A star."}]},
        {"conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "A star."}],
         "images": [str(ROOT / "data/vl/images/0001.png")]},
    ]  # fmt: skip
    items, skipped = collect([_write(tmp_path / "rows.jsonl", rows)])
    assert [(s.row, s.reason) for s in skipped] == [(1, "image_missing")]
    assert [it.kind for it in items] == ["vl"] and items[0].expected == "A star."  # LLaVA/ShareGPT form


def test_greedy_reply_equals_chat_generator_and_plain_generate(vl_dir):
    from qwentune.eval.generate import cut_at_stop, stop_token_ids
    from qwentune.eval.vision import greedy_reply, vision_inputs
    from qwentune.model.vision import pixel_inputs
    from qwentune.rows.images import expand_prompt
    from qwentune.serve.chat import Conversation, Generator
    from qwentune.serve.inference import load_for_inference

    model, tok = load_for_inference(str(vl_dir))
    items, _ = collect([SHAPES_EVAL], limit=1)
    item, ref = items[0], items[0].images[0].ref
    inputs = vision_inputs(vl_dir, None, tok)
    prompt = _prompt_ids(item, tok, tok.chat_template)
    reply = greedy_reply(model, tok, prompt, [ref], inputs, max_new_tokens=6)
    assert reply

    conversation = Conversation(images=[ref])
    conversation.add_user(item.prompt[0]["content"][1]["text"])
    assert conversation.messages[0]["content"][1:] == item.prompt[0]["content"][1:]
    generator = Generator(model, tok, model_dir=vl_dir, max_new_tokens=6)
    ids = expand_prompt(prompt, [ref], inputs.settings)
    assert generator.prompt_ids(conversation) == ids
    assert generator(conversation, lambda _: None) == tok.decode(reply, skip_special_tokens=True)

    input_ids = torch.tensor([ids])
    plain = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                           max_new_tokens=6, **pixel_inputs(vl_dir, input_ids, [ref]))  # fmt: skip
    assert cut_at_stop(plain[0, len(ids) :].tolist(), stop_token_ids(tok)) == reply


def test_adapter_pixel_limits_apply(vl_dir, tmp_path):
    from qwentune.eval.vision import vision_inputs
    from qwentune.export.sidecar import write_train_sidecar

    tok = shared_tokenizer("qwen2-vl-instruct")
    saved = json.loads((vl_dir / "preprocessor_config.json").read_text())
    assert vision_inputs(vl_dir, None, tok).settings.max_pixels == saved["max_pixels"]
    write_train_sidecar(tmp_path, image_processor={"min_pixels": 28 * 28, "max_pixels": 56 * 56})
    settings = vision_inputs(vl_dir, tmp_path, tok).settings  # a run's adapter on its base: the recipe's limits
    assert (settings.min_pixels, settings.max_pixels) == (28 * 28, 56 * 56) and settings.tokens(224, 224) == 4


def test_text_model_skips_image_rows_with_the_reason(tmp_path):
    text_model = str(tiny_model_dir(tmp_path))
    text = _write(tmp_path / "text.jsonl", [TEXT_ROW])
    result = evaluate([text_model], [SHAPES_EVAL, text], limit=2, max_new_tokens=3, progress=False)
    assert result.skipped == [{"file": str(SHAPES_EVAL), "row": n, "reason": NEEDS_VISION} for n in (1, 2)]
    assert set(result.metrics[text_model]) == {"sft: loss", "sft: perplexity"}
    assert f"shapes_eval.jsonl: 2 row(s) skipped ({NEEDS_VISION}: rows 1, 2)" in result.table()
    with pytest.raises(QwentuneError, match=f"nothing scoreable \\(first row: {NEEDS_VISION}\\)"):
        evaluate([text_model], [SHAPES_EVAL], limit=2, max_new_tokens=3, progress=False)


def test_cli_prints_the_vl_rows(vl_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    args = [str(vl_dir), "--data", "data/vl/shapes_eval.jsonl", "--limit", "2", "--max-new-tokens", "3"]
    proc = subprocess.run([sys.executable, "-m", "qwentune", "eval", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = {line.split("  ")[0]: line for line in proc.stdout.splitlines()}
    assert "0/2 (0.0%)" in lines["vl: exact"]  # a random model answers nothing right
    assert float(lines["vl: loss"].split()[-1]) > 5 and "vl: perplexity" in lines
    assert "skipped" not in proc.stdout
