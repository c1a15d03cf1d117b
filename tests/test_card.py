"""The model card: front matter the Hub accepts, the base named as the user wrote it (never a machine path), and a
page that reads as one (data, results, special tokens in words, merge check, how to reproduce)."""

from __future__ import annotations

from pathlib import Path

import yaml
from fake_runs import TOKEN_REPORT, make_run_dir

from qwentune.export.card import CardInputs, base_name, build_card, card_for_run


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, body = card[4:].partition("\n---\n")
    meta = yaml.safe_load(head)
    assert isinstance(meta, dict) and body.strip()
    return meta


def test_run_card_names_no_machine_path_and_reads_as_a_page(tmp_path):
    run = make_run_dir(tmp_path)  # recipe names the base and a data file by absolute paths
    card = card_for_run(run)
    assert str(tmp_path) not in card and str(Path.home()) not in card and "/.cache/" not in card
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["license"] == "apache-2.0"
    assert "base_model" not in meta  # a local base is not a Hub repo: named in the text only
    assert {"qwentune", "lora", "sft", "merged"} <= set(meta["tags"])
    assert "local model `tiny-qwen2.5-0.5b-instruct`" in card
    assert (
        "`tools.jsonl` (train, format messages): 8 of 10 rows kept; skipped 1 over_length, 1 invalid_tool_json" in card
    )
    assert "| eval loss after | 2.2 |" in card
    assert (
        "- Made trainable (their rows of `embed_tokens` and `lm_head`, merged into this model): `<tool_call>`." in card
    )
    assert "'trained_special_tokens'" not in card and "{" not in card.split("## Special tokens")[1].split("##")[0]
    assert "max |difference| 3e-07 (tolerance 0.001)" in card
    assert "qwentune train recipe.yaml" in card and "push_to_hub" not in card
    recipe = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert recipe["data"]["train"] == ["tools.jsonl"] and recipe["output"]["dir"] == "tiny-sft-lora"


def test_base_named_as_written_offline_by_its_real_name():
    offline = base_name("offline:qwen2.5-coder-0.5b-instruct")
    assert offline.hub_id == "Qwen/Qwen2.5-Coder-0.5B-Instruct" and "Qwen2.5-Coder-0.5B-Instruct" in offline.text
    assert base_name("Qwen/Qwen2.5-0.5B-Instruct").hub_id == "Qwen/Qwen2.5-0.5B-Instruct"
    gguf = base_name("/home/someone/models/q.gguf")
    assert gguf.hub_id is None and "/home" not in gguf.text and "q.gguf" in gguf.text


def test_cache_dir_base_is_named_by_its_recorded_source(tmp_path):
    cached = tmp_path / ".cache" / "qwentune" / "models" / ("ab" * 32)
    cached.mkdir(parents=True)
    (cached / "qwentune-source.json").write_text('{"source": "offline:qwen2.5-coder-0.5b-instruct"}')
    card = build_card(CardInputs(title="t", base=str(cached), peft="qlora", trainable_tokens=TOKEN_REPORT))
    meta = front_matter(card)
    assert meta["base_model"] == "Qwen/Qwen2.5-Coder-0.5B-Instruct" and str(tmp_path) not in card
    assert "QLoRA supervised fine-tuning" in card


def test_eval_table_adapter_card_and_other_licence():
    table = "| metric | before | after |\n|---|---|---|\n| tool-call accuracy | 0.10 | 0.92 |"
    card = build_card(CardInputs(title="t", base="Qwen/Qwen2.5-3B-Instruct", eval_table=table, adapter_only=True))
    meta = front_matter(card)
    assert meta["license"] == "other" and meta["license_name"] == "qwen-research"
    assert meta["library_name"] == "peft" and "adapter" in meta["tags"]
    assert table in card and "AutoPeftModelForCausalLM" in card
