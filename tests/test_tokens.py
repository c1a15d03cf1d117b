"""Special tokens the model never learned (qwentune.model.tokens): the check, the fix (trainable token rows), the merge
of those rows, and the TRL/PEFT workaround — on tiny models whose `<tool_call>` rows are broken the way the real
Qwen2.5-Coder-0.5B-Instruct's are.

The broken model: `<tool_call>`/`</tool_call>` (and 50 unused rows, like the real model's ~3,000) share one row, a
0.3× copy of `<|im_start|>`'s; and `<|im_start|>`'s output row points where the base model's hidden state points at
the call position (right after `<|im_start|>assistant\\n`), so the base writes `<|im_start|>` there, as the real one
does. Frozen, `<tool_call>`'s logit is 0.3× `<|im_start|>`'s whatever LoRA does to the hidden state, so it can only
win where that logit is negative, and training pushes it up (that raises `<tool_call>`'s logit too): without the fix
`<|im_start|>` stays ahead. With the fix the row itself trains and `<tool_call>` overtakes it within a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model_dir, tiny_training
from transformers import AutoModelForCausalLM

import qwentune
from qwentune.api import load_model_tokenizer
from qwentune.model.loading import lora_config
from qwentune.model.tokens import NEAR_COUNT, check_model_files, check_tokens, flagged_in_model_files, text_token_ids

ROOT = Path(__file__).resolve().parents[1]
TC, ETC, IMS, IM_END = 151657, 151658, 151644, 151645  # <tool_call> </tool_call> <|im_start|> <|im_end|>
UNUSED = list(range(151665, 151715))  # 50 ids past the tokenizer's 151,665 real tokens
SCALE = 0.3
UNTIED = "qwen2.5-7b-instruct"  # the tiny 7B structure does not tie embed_tokens and lm_head


def short_tool_rows(path: Path, n: int = 4) -> Path:
    """The n shortest tool-call conversations of data/tool_calls.jsonl, cut after the first assistant turn that calls
    a tool and without the tools block (~65 tokens a row: the 151,936-row head is the cost on a tiny model)."""
    rows = []
    for line in (ROOT / "data/tool_calls.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        call = next((i for i, m in enumerate(messages) if m.get("tool_calls")), None)
        if call is not None:
            rows.append({"messages": messages[: call + 1]})
    rows.sort(key=lambda r: len(json.dumps(r)))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return path


def token_recipe(model_dir: Path, rows: Path, out: Path, **sections) -> dict:
    recipe = {
        "model": {"source": str(model_dir)},
        "data": {"train": [str(rows)], "limit": 4, "max_length": 768},
        "method": "sft",
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": tiny_training(learning_rate=1e-2, max_steps=6, per_device_batch_size=4),
        "output": {"dir": str(out), "sample_tokens": 0},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def bare_recipe(**peft):
    return qwentune.load_recipe(
        {"model": {"source": "x"}, "data": {"train": [str(ROOT / "data/tool_calls.jsonl")]}, "peft": peft}
    )


def call_prompts(recipe: dict) -> list[list[int]]:
    """Each train row up to its first trained `<tool_call>`: the model's next token should be `<tool_call>`."""
    prompts = []
    for row in qwentune.prepare(recipe).train:
        ids, labels = row["input_ids"], row["labels"]
        at = next(i for i, (t, lab) in enumerate(zip(ids, labels)) if t == TC and lab == TC)
        assert ids[at - 3 : at] == [IMS, 77091, 198]  # <|im_start|> assistant \n
        prompts.append(ids[:at])
    return prompts


@torch.no_grad()
def call_probs(model, prompts: list[list[int]]) -> list[tuple[float, float]]:
    """(p(<tool_call>), p(<|im_start|>)) at each call position."""
    out = []
    for ids in prompts:
        p = model(torch.tensor([ids])).logits[0, -1].float().softmax(-1)
        out.append((p[TC].item(), p[IMS].item()))
    return out


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def break_tool_call_rows(model_dir: Path, prompts: list[list[int]]) -> None:
    """Collapse `<tool_call>`/`</tool_call>` and UNUSED onto SCALE × `<|im_start|>`'s row (in every matrix), after
    pointing `<|im_start|>`'s output row at the base's mean hidden state at the call positions."""
    with torch.no_grad():
        base = load(model_dir)
        hidden = torch.stack([base.model(torch.tensor([ids])).last_hidden_state[0, -1] for ids in prompts]).mean(0)
    state = load_file(str(model_dir / "model.safetensors"))
    keys = [k for k in state if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    for key in keys:
        weight = state[key]
        if key.endswith("lm_head.weight") or len(keys) == 1:  # the output matrix (tied: the only one)
            weight[IMS] = hidden / hidden.norm() * weight.norm(dim=1).median() * 2
        weight[[TC, ETC, *UNUSED]] = weight[IMS] * SCALE
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """name -> (model dir with broken tool-call rows, short tool-call data, call prompts); built once per module."""
    made: dict[str, tuple[Path, Path, list[list[int]]]] = {}

    def get(name: str = "qwen2.5-0.5b-instruct"):
        if name not in made:
            root = tmp_path_factory.mktemp(f"broken-{name}")
            model_dir = tiny_model_dir(root, name)
            data = short_tool_rows(root / "tool_rows.jsonl")
            prompts = call_prompts(token_recipe(model_dir, data, root / "unused"))
            break_tool_call_rows(model_dir, prompts)
            made[name] = (model_dir, data, prompts)
        return made[name]

    return get


def special_tokens_report(run_dir: Path) -> dict:
    return json.loads((run_dir / "special_tokens.json").read_text())


# --- the check ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2.5-0.5b-instruct", UNTIED])
def test_check_flags_collapsed_rows_and_nothing_on_a_normal_model(tmp_path, broken, name):
    model_dir, data, _ = broken(name)
    recipe = token_recipe(model_dir, data, tmp_path / "run")
    prepared = qwentune.prepare(recipe)
    tok = load_model_tokenizer(qwentune.load_recipe(recipe))

    result = check_tokens(load(model_dir), tok, prepared.train)
    assert result.trained_special == [IM_END, TC, ETC]
    assert result.flagged == [TC, ETC]
    matrices = ["tied"] if name != UNTIED else ["input", "output"]
    assert sorted({r.matrix for r in result.rows}) == sorted(matrices)
    for row in result.rows:
        if row.token_id == IM_END:
            assert not row.flagged and row.near_rows == 0
        else:  # its twin and the 50 unused rows are identical to it
            assert row.flagged and row.near_rows >= len(UNUSED) + 1 > NEAR_COUNT
    assert "UNTRAINED" in result.summary() and "near-identical rows" in result.summary()
    # the file-based check (preview) finds the same, without loading the model
    assert check_model_files(model_dir, tok, result.trained_special) == result.rows
    assert {TC, ETC} <= flagged_in_model_files(model_dir, tok)  # (all special tokens: <|im_start|> shares the
    # direction of the collapsed rows, so it is flagged too; it is never trained)

    clean = tiny_model_dir(tmp_path / "clean", name)
    clean_result = check_tokens(load(clean), tok, prepared.train)
    assert clean_result.trained_special == [IM_END, TC, ETC] and clean_result.flagged == []
    assert flagged_in_model_files(clean, tok) == set()


def test_preview_lists_trained_special_tokens_and_flags_the_untrained_rows(tmp_path, broken):
    model_dir, data, _ = broken()
    shown = qwentune.preview(token_recipe(model_dir, data, tmp_path / "run"), rows=1, color=False)
    assert "[[!<tool_call>!]]" in shown
    lines = shown.splitlines()
    at = lines.index("special tokens in trained labels:")
    listed = {line.split()[0]: line for line in lines[at + 1 :]}
    assert "flagged" in listed["<tool_call>"] and "flagged" in listed["</tool_call>"]
    assert "flagged" not in listed["<|im_end|>"]


@pytest.mark.real_model
def test_real_model_flags_tool_call_rows_and_not_im_end(offline_model_dir):
    """Qwen2.5-Coder-0.5B-Instruct (offline): `<tool_call>`/`</tool_call>` sit in a cluster of ~3,000 rows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(offline_model_dir)
    rows = check_model_files(offline_model_dir, tok, [IM_END, TC, ETC])
    assert {r.matrix for r in rows} == {"input", "output"}  # the GGUF stores output.weight: untied
    for r in rows:
        assert r.flagged == (r.token_id != IM_END), r
        assert (r.near_rows > 2000) == (r.token_id != IM_END), r


def test_text_token_ids_split_the_special_token_text(qwen_tokenizer):
    tok = qwen_tokenizer
    assert tok.convert_ids_to_tokens(text_token_ids(tok, TC)) == ["<", "tool", "_call", ">"]
    assert tok.convert_ids_to_tokens(text_token_ids(tok, ETC)) == ["</", "tool", "_call", ">"]


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_auto_starts_flagged_rows_from_their_text_in_sft_only(tmp_path, broken, qwen_tokenizer, method):
    """SFT: the flagged rows start from the mean of their text's rows. DPO: untouched (its reference is the
    adapter-disabled base, which the policy must equal at step 0; dpo.py asks for no text start)."""
    from datasets import Dataset

    from qwentune.model.tokens import prepare_new_token_rows

    model_dir, _, _ = broken(UNTIED)
    model = load(model_dir)
    before = [m.weight.detach().clone() for m in (model.get_input_embeddings(), model.get_output_embeddings())]
    trained = [IMS, 77091, 198, TC, 4913, ETC, IM_END]
    if method == "sft":
        rows = Dataset.from_dict({"input_ids": [trained], "labels": [[-100] * 3 + trained[3:]]})
    else:
        rows = Dataset.from_dict(
            {"prompt_input_ids": [trained[:3]], "chosen_input_ids": [trained[3:]], "rejected_input_ids": [[IM_END]]}
        )
    result = prepare_new_token_rows(
        model, qwen_tokenizer, rows, train_new_tokens="auto", init_from_text=method == "sft"
    )
    assert result.ids == [TC, ETC]
    after = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    if method == "dpo":
        assert result.initialised == {}
        assert all(torch.equal(a, b) for a, b in zip(after, before))
        return
    assert result.initialised == {TC: [27, 14172, 13429, 29], ETC: [522, 14172, 13429, 29]}
    for old, new in zip(before, after):  # input and output matrix, each from its own rows
        for tid, source in result.initialised.items():
            torch.testing.assert_close(new[tid], old[source].mean(0))
        others = torch.ones(len(old), dtype=torch.bool)
        others[[TC, ETC]] = False
        assert torch.equal(new[others], old[others])


def test_lora_config_trains_the_rows_of_both_layers_unless_trained_whole(tmp_path):
    tied = load(tiny_model_dir(tmp_path))
    recipe = bare_recipe()
    assert lora_config(recipe.peft, tied, [TC]).trainable_token_indices == {"embed_tokens": [TC], "lm_head": [TC]}
    assert lora_config(recipe.peft, tied, []).trainable_token_indices is None
    whole = bare_recipe(modules_to_save=["lm_head"])
    assert lora_config(whole.peft, tied, [TC]).trainable_token_indices is None  # one shared matrix, trained in full
    untied = load(tiny_model_dir(tmp_path / "untied", UNTIED))
    assert lora_config(whole.peft, untied, [TC]).trainable_token_indices == {"embed_tokens": [TC]}


# --- the fix, end to end ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trainable_tokens_teach_tool_call_and_the_merged_model_keeps_it(tmp_path, broken):
    from peft import PeftModel

    model_dir, data, prompts = broken()
    base_probs = call_probs(load(model_dir), prompts)
    assert all(tc < ims for tc, ims in base_probs), base_probs  # the base writes <|im_start|> where the call goes

    result = qwentune.train(token_recipe(model_dir, data, tmp_path / "run"))  # train_new_tokens: auto (default)
    report = special_tokens_report(result.run_dir)
    assert report["flagged"] == report["made_trainable"] == [TC, ETC]
    assert report["initialised_from_text"] == {str(TC): [27, 14172, 13429, 29], str(ETC): [522, 14172, 13429, 29]}
    assert result.metrics["trainable_tokens"]["made_trainable"] == [TC, ETC]

    merged = load(result.merged_dir)  # plain transformers
    probs = call_probs(merged, prompts)
    print("with the fix: p(<tool_call>), p(<|im_start|>) at the call positions:", probs)
    assert all(tc > ims for tc, ims in probs), probs

    # tied base + trained rows → untied deliberately, and the merge equals base + adapter
    config = json.loads((result.merged_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and result.metrics["merge"]["untied"] is True
    state = {}
    for path in result.merged_dir.glob("*.safetensors"):
        state.update(load_file(str(path)))
    embed, head = state["model.embed_tokens.weight"], state["lm_head.weight"]
    original = load_file(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    changed = (embed != original).any(dim=1).nonzero().flatten().tolist()
    assert changed == [TC, ETC]  # exactly the flagged rows, nothing else
    torch.testing.assert_close(head, embed)  # PEFT tied one token adapter to both: same rows in both matrices
    reference = PeftModel.from_pretrained(load(model_dir), result.adapter_dir)
    for ids in prompts[:2]:
        x = torch.tensor([ids])
        with torch.no_grad():
            assert (merged(x).logits - reference(x).logits).abs().max().item() < 1e-4
    merge_report = json.loads((result.merged_dir / "merge_report.json").read_text())
    assert merge_report["max_abs_diff"] < 1e-3


@pytest.mark.slow
def test_without_the_fix_the_model_keeps_writing_im_start(tmp_path, broken):
    model_dir, data, prompts = broken()
    recipe = token_recipe(model_dir, data, tmp_path / "run", peft={"train_new_tokens": "off"})
    result = qwentune.train(recipe)
    report = special_tokens_report(result.run_dir)
    assert report["flagged"] == [TC, ETC] and report["made_trainable"] == []
    assert not any("token_adapter" in k for k in load_file(str(result.adapter_dir / "adapter_model.safetensors")))

    probs = call_probs(load(result.merged_dir), prompts)
    print("without the fix: p(<tool_call>), p(<|im_start|>) at the call positions:", probs)
    assert all(tc < ims for tc, ims in probs), probs


@pytest.mark.slow
def test_qlora_with_trainable_tokens_on_an_untied_model_trains_and_merges(tmp_path, broken):
    model_dir, data, prompts = broken(UNTIED)
    recipe = token_recipe(
        model_dir,
        data,
        tmp_path / "run",
        peft={"method": "qlora", "quant": {"compute_dtype": "float32"}},
        data={"limit": 2},
        training={"per_device_batch_size": 2},
    )
    result = qwentune.train(recipe)
    assert special_tokens_report(result.run_dir)["made_trainable"] == [TC, ETC]
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    token_layers = sorted(k.split(".token_adapter")[0].rsplit(".", 1)[-1] for k in adapter if "token_adapter" in k)
    assert token_layers == ["embed_tokens", "lm_head"]  # untied: each matrix has its own trained rows

    merge = result.metrics["merge"]
    assert merge["mode"] == "qlora-dequantized" and merge["max_abs_diff"] <= merge["tolerance"]
    merged_dir = result.merged_dir
    assert json.loads((merged_dir / "config.json").read_text())["tie_word_embeddings"] is False
    probs = call_probs(load(merged_dir), prompts)
    print("QLoRA, untied, with the fix:", probs)
    assert all(tc > ims for tc, ims in probs), probs


@pytest.mark.slow
def test_qlora_with_trainable_tokens_on_a_tied_model_unties_and_merges(tmp_path, broken):
    model_dir, data, prompts = broken()
    recipe = token_recipe(
        model_dir,
        data,
        tmp_path / "run",
        peft={"method": "qlora", "quant": {"compute_dtype": "float32"}},
        data={"limit": 2},
        training={"per_device_batch_size": 2},
    )
    result = qwentune.train(recipe)
    merge = result.metrics["merge"]
    assert merge["mode"] == "qlora-dequantized" and merge["untied"] is True
    assert merge["max_abs_diff"] <= merge["tolerance"]
    assert json.loads((result.merged_dir / "config.json").read_text())["tie_word_embeddings"] is False
    probs = call_probs(load(result.merged_dir), prompts)
    print("QLoRA, tied, with the fix:", probs)
    assert all(tc > ims for tc, ims in probs), probs
