"""qwentune.export (merge) on tiny random Qwen2 / Qwen2-VL models (CPU, a few seconds each)."""

from __future__ import annotations

import importlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from merge_oracle import merge_model_in_memory
from safetensors import safe_open

from qwentune.errors import QwentuneError
from qwentune.export.adapter import KeyIndex
from qwentune.export.checkpoint import meta_skeleton
from qwentune.export.merge import merge_adapter
from qwentune.export.parity import HALF_TOLERANCE_ABS, logits_of
from qwentune.export.quant import quant_roundtrip, quantized_module_names
from qwentune.export.shards import ShardWriter
from qwentune.export.sidecar import SIDECAR_NAME, read_train_sidecar, write_train_sidecar
from qwentune.model.quantspec import QuantSpec

parity_mod = importlib.import_module("qwentune.export.parity")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "assets" / "qwen2.5-tokenizer"
TEMPLATE = (ROOT / "qwentune" / "templates" / "qwen2.5-instruct.jinja").read_text()
ROWS = [[1, 5, 7, 9, 11, 300, 17, 2], [3, 4, 5, 6], [900, 7, 5, 1000, 42]]
BASE_GEN = {
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------------------ helpers


def _config(*, vocab=1024, tied=True, **kw):
    return transformers.Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        initializer_range=0.1,
        max_position_embeddings=128,
        **kw,
    )


def make_base(path: Path, *, vocab=1024, tied=True, dtype=torch.float32, shard=None, tokenizer=False, seed=0) -> Path:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(vocab=vocab, tied=tied)).to(dtype)
    model.generation_config = transformers.GenerationConfig(**BASE_GEN)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    if tokenizer:
        for item in TOKENIZER.iterdir():
            shutil.copy(item, path / item.name)
    return path


def load(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def randomize(pm, seed=1, scale=0.1):
    """Random, non-zero values for every trainable adapter tensor (LoRA A and B, token rows, saved modules)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)
    return pm


def make_adapter(path: Path, base: Path, *, seed=1, model=None, **lora) -> Path:
    lora.setdefault("target_modules", "all-linear")
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    model = model if model is not None else load(base)
    pm = randomize(peft.get_peft_model(model, peft.LoraConfig(**lora)), seed)
    pm.save_pretrained(path)
    return path


def peft_model(base: Path, adapter: Path, dtype=torch.float32):
    pm = peft.PeftModel.from_pretrained(load(base, dtype), str(adapter))
    return pm.eval()


@torch.no_grad()
def logits(model, rows=ROWS):
    return [model(input_ids=torch.tensor([r])).logits[0].float() for r in rows]


def maxdiff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def keys_of(path: Path) -> dict[str, torch.dtype]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k).dtype
    return out


def state(path: Path):
    return {k: v.float() for k, v in load(path, None).state_dict().items()}


# ------------------------------------------------------------------------------------------------ LoRA basics


def test_lora_fp32_merge_matches_base_plus_adapter(tmp_path):
    base = make_base(tmp_path / "base", tokenizer=True)
    adapter = make_adapter(tmp_path / "adapter", base)
    ref = logits(peft_model(base, adapter))
    assert maxdiff(ref, logits(load(base))) > 0.1  # the adapter really changes the model

    result = merge_adapter(adapter, tmp_path / "out", parity_input_ids=ROWS)
    out = tmp_path / "out"
    assert result.output_dir == out and result.mode == "lora" and not result.untied
    assert result.max_abs_diff < 1e-5 and result.tolerance == pytest.approx(1e-3)
    merged = load(out)  # plain transformers, no peft
    assert maxdiff(ref, logits(merged)) < 1e-5
    keys = keys_of(out)
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    # tied base, LoRA on linear layers only: still tied, no duplicate lm_head tensor
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in keys
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    report = json.loads((out / "merge_report.json").read_text())
    assert report["mode"] == "lora" and report["max_abs_diff"] == pytest.approx(result.max_abs_diff)
    card = (out / "README.md").read_text()
    assert "local model `base`" in card and "lora" in card  # the base by name, never a machine path
    assert str(tmp_path) not in card
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_bf16_base_stays_bf16(tmp_path):
    base = make_base(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(tmp_path / "adapter", base, model=load(base, torch.float32))
    result = merge_adapter(adapter, tmp_path / "out", parity_input_ids=ROWS)
    assert set(keys_of(tmp_path / "out").values()) == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert result.tolerance >= HALF_TOLERANCE_ABS
    assert result.max_abs_diff < result.tolerance


def test_chat_template_generation_config_and_card(tmp_path):
    base = make_base(tmp_path / "base", vocab=151936, tokenizer=True)
    adapter = make_adapter(tmp_path / "adapter", base, target_modules=["q_proj", "v_proj"])
    card = {"data": "tool_calls.jsonl (1,200 rows)", "recipe": {"r": 4, "alpha": 8}, "metrics": {"eval_loss": 0.42}}
    merge_adapter(adapter, tmp_path / "out", chat_template=TEMPLATE, model_card=card)
    out = tmp_path / "out"
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]
    for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
        assert gen[key] == BASE_GEN[key]
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [151645, 151643]
    text = (out / "README.md").read_text()
    assert "tool_calls.jsonl" in text and "eval_loss" in text and "0.42" in text

    merge_adapter(adapter, tmp_path / "out2", generation_eos_ids=[151643], tokenizer_source=TOKENIZER)
    assert json.loads((tmp_path / "out2" / "generation_config.json").read_text())["eos_token_id"] == [151643]


def test_rslora_scaling(tmp_path):
    base = make_base(tmp_path / "base")
    adapter = make_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])
    result = merge_adapter(adapter, tmp_path / "out", parity_input_ids=ROWS)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        A = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        B = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    w0 = load(base).model.layers[0].self_attn.q_proj.weight.detach()
    w1 = load(tmp_path / "out").model.layers[0].self_attn.q_proj.weight.detach()
    assert torch.allclose(w1, w0 + (B @ A) * (8 / 4**0.5), atol=1e-6)  # alpha / sqrt(r) = 4
    assert not torch.allclose(w1, w0 + (B @ A) * (8 / 4), atol=1e-3)  # not alpha / r = 2
    assert result.max_abs_diff < 1e-5


def test_rank_and_alpha_patterns(tmp_path):
    base = make_base(tmp_path / "base")
    adapter = make_adapter(
        tmp_path / "adapter",
        base,
        r=4,
        lora_alpha=8,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"o_proj": 32},
        target_modules=["q_proj", "v_proj", "o_proj"],
    )
    result = merge_adapter(adapter, tmp_path / "out", parity_input_ids=ROWS)
    assert result.max_abs_diff < 1e-5
    assert maxdiff(logits(peft_model(base, adapter)), logits(load(tmp_path / "out"))) < 1e-5


# ------------------------------------------------------------------------------------------------ tied embeddings


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"trainable_token_indices": [5, 7]}, id="trainable-tokens"),
        pytest.param({"modules_to_save": ["embed_tokens"]}, id="modules-to-save-embed"),
        pytest.param({"modules_to_save": ["lm_head"]}, id="modules-to-save-head"),
        pytest.param({"target_modules": ["q_proj", "lm_head"]}, id="lora-on-lm-head"),
        pytest.param({"target_modules": ["q_proj", "embed_tokens"]}, id="lora-on-embed"),
        pytest.param({"trainable_token_indices": {"embed_tokens": [5], "lm_head": [9]}}, id="tokens-different-rows"),
        pytest.param({"trainable_token_indices": {"lm_head": [5, 7]}}, id="tokens-on-lm-head"),
    ],
)
def test_tied_base_touched_embeddings_are_untied(tmp_path, extra):
    base = make_base(tmp_path / "base")
    adapter = make_adapter(tmp_path / "adapter", base, **{"target_modules": ["q_proj", "v_proj"], **extra})
    ref = logits(peft_model(base, adapter))
    result = merge_adapter(adapter, tmp_path / "out", parity_input_ids=ROWS)
    assert result.untied and result.max_abs_diff < 1e-5
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert "lm_head.weight" in keys_of(tmp_path / "out")
    merged = load(tmp_path / "out")
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert maxdiff(ref, logits(merged)) < 1e-5


def test_tied_trainable_tokens_rows_land_in_both_matrices(tmp_path):
    """A list of trainable_token_indices on a tied model: PEFT ties a token adapter to lm_head, so both change."""
    base = make_base(tmp_path / "base")
    adapter = make_adapter(tmp_path / "adapter", base, target_modules=["q_proj"], trainable_token_indices=[5, 7])
    merge_adapter(adapter, tmp_path / "out", parity_input_ids=ROWS)
    e0 = load(base).model.embed_tokens.weight.detach()
    merged = load(tmp_path / "out")
    emb, head = merged.model.embed_tokens.weight.detach(), merged.lm_head.weight.detach()
    assert torch.equal(emb, head)
    changed = (emb != e0).any(dim=1).nonzero().flatten().tolist()
    assert changed == [5, 7]


def test_modules_to_save_embed_keeps_original_lm_head(tmp_path):
    base = make_base(tmp_path / "base")
    adapter = make_adapter(tmp_path / "adapter", base, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    merge_adapter(adapter, tmp_path / "out", parity_input_ids=ROWS)
    e0 = load(base).model.embed_tokens.weight.detach()
    merged = load(tmp_path / "out")
    assert torch.equal(merged.lm_head.weight.detach(), e0)
    assert not torch.equal(merged.model.embed_tokens.weight.detach(), e0)


def test_untied_base_trainable_tokens(tmp_path):
    base = make_base(tmp_path / "base", tied=False)
    adapter = make_adapter(tmp_path / "adapter", base, target_modules=["q_proj"], trainable_token_indices=[5, 7])
    ref = logits(peft_model(base, adapter))
    result = merge_adapter(adapter, tmp_path / "out", parity_input_ids=ROWS)
    assert not result.untied and result.max_abs_diff < 1e-5
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert maxdiff(ref, logits(load(tmp_path / "out"))) < 1e-5


# ---------------------------------------------------------------------------------------------- streaming == in memory


@pytest.mark.parametrize(
    "lora",
    [
        pytest.param({}, id="all-linear"),
        pytest.param({"use_rslora": True, "r": 8, "lora_alpha": 16}, id="rslora"),
        pytest.param({"use_dora": True}, id="dora"),
        pytest.param({"trainable_token_indices": [5, 7, 900]}, id="trainable-tokens"),
        pytest.param({"modules_to_save": ["embed_tokens"]}, id="modules-to-save"),
        pytest.param({"target_modules": ["q_proj", "lm_head"]}, id="lora-lm-head"),
    ],
)
def test_streaming_equals_in_memory(tmp_path, lora):
    base = make_base(tmp_path / "base", shard="300KB")
    assert len(list(base.glob("*.safetensors"))) >= 2
    adapter = make_adapter(tmp_path / "adapter", base, **lora)
    streamed = merge_adapter(adapter, tmp_path / "streamed", parity_input_ids=ROWS)
    in_memory = merge_model_in_memory(peft_model(base, adapter), tmp_path / "in_memory", parity_input_ids=ROWS)
    assert streamed.untied == in_memory.untied
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert set(index["weight_map"]) == set(keys_of(tmp_path / "streamed"))
    a, b = state(tmp_path / "streamed"), state(tmp_path / "in_memory")
    assert set(a) == set(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_bf16_in_memory_equals_streaming(tmp_path):
    """A bf16 PeftModel (as trained in bf16) merges layer by layer in fp32: the same bf16 tensors as streaming."""
    base = make_base(tmp_path / "base", dtype=torch.bfloat16, shard="300KB")
    adapter = make_adapter(
        tmp_path / "adapter", base, model=load(base, torch.bfloat16), trainable_token_indices=[5, 7]
    )
    streamed = merge_adapter(adapter, tmp_path / "streamed", parity_input_ids=ROWS)
    in_memory = merge_model_in_memory(
        peft_model(base, adapter, torch.bfloat16), tmp_path / "in_memory", parity_input_ids=ROWS
    )
    assert streamed.untied and in_memory.untied
    assert streamed.max_abs_diff == pytest.approx(in_memory.max_abs_diff)
    a, b = keys_of(tmp_path / "streamed"), keys_of(tmp_path / "in_memory")
    assert set(a.values()) == set(b.values()) == {torch.bfloat16}
    sa, sb = state(tmp_path / "streamed"), state(tmp_path / "in_memory")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fp32_compute_of_a_bf16_model_equals_its_fp32_copy(tmp_path):
    base = make_base(tmp_path / "base", dtype=torch.bfloat16)
    adapter = make_adapter(
        tmp_path / "adapter", base, model=load(base, torch.float32), use_dora=True, trainable_token_indices=[5]
    )
    held = logits_of(peft_model(base, adapter, torch.bfloat16), ROWS)
    full = logits_of(peft_model(base, adapter, torch.float32), ROWS)
    assert maxdiff(held, full) < 1e-5
    assert maxdiff(full, logits(peft_model(base, adapter, torch.float32))) < 1e-5  # batching rows changes nothing


def test_parity_memory_check_refuses_before_writing(tmp_path, monkeypatch):
    base = make_base(tmp_path / "base")
    adapter = make_adapter(tmp_path / "adapter", base)
    monkeypatch.setattr(parity_mod, "available_memory", lambda: 10 << 20)
    with pytest.raises(QwentuneError, match="check_parity=False"):
        merge_adapter(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    result = merge_adapter(adapter, tmp_path / "out", check_parity=False)
    assert result.max_abs_diff != result.max_abs_diff  # nan: not checked
    assert json.loads((tmp_path / "out" / "merge_report.json").read_text())["parity"] == "skipped"


def test_streaming_false_uses_peft_merge(tmp_path):
    base = make_base(tmp_path / "base")
    adapter = make_adapter(tmp_path / "adapter", base, trainable_token_indices=[5])
    result = merge_adapter(adapter, tmp_path / "out", streaming=False, parity_input_ids=ROWS)
    assert result.untied and result.max_abs_diff < 1e-5
    assert json.loads((tmp_path / "out" / "merge_report.json").read_text())["streaming"] is False


# ------------------------------------------------------------------------------------------------ QLoRA


def _qlora_adapter(tmp_path, base, compute_dtype=torch.float32):
    cfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model4 = transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg)
    pm = randomize(peft.get_peft_model(model4, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")))
    pm.save_pretrained(tmp_path / "qadapter")
    name = str(compute_dtype).removeprefix("torch.")
    write_train_sidecar(
        tmp_path / "qadapter",
        quantization={"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": name},
    )
    import bitsandbytes as bnb

    for module in pm.modules():  # the exact (training-time) 4-bit path, not bnb's bf16 CPU inference repack
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return pm.eval(), tmp_path / "qadapter"


def test_quant_roundtrip_is_what_bitsandbytes_loads(tmp_path):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    base = make_base(tmp_path / "base", dtype=torch.bfloat16)
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model4 = transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg)
    full = load(base, torch.bfloat16)
    spec = QuantSpec()
    for name, module in model4.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            expected = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            got = quant_roundtrip(full.get_submodule(name).weight.data, spec, torch.bfloat16)
            assert torch.equal(got, expected), name
    names = quantized_module_names(meta_skeleton(base), spec)
    assert set(names) == {n for n, m in model4.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_qlora_fp32_base_loaded_in_compute_dtype(tmp_path):
    """qwentune's trainer loads the base in the compute dtype (bf16) before quantizing, even when the checkpoint is
    fp32: without a load_dtype in the sidecar the merge quantizes from the compute dtype, reproducing the 4-bit
    weights exactly; the result is saved in the base's dtype (fp32)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    base = make_base(tmp_path / "base")
    cfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model4 = transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg, dtype=torch.bfloat16)
    pm = randomize(peft.get_peft_model(model4, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])))
    pm.save_pretrained(tmp_path / "adapter")
    write_train_sidecar(tmp_path / "adapter", quantization={"compute_dtype": "bfloat16"})
    merge_adapter(tmp_path / "adapter", tmp_path / "out", parity_input_ids=ROWS)
    merged = load(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    for name, module in model4.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and "q_proj" not in name:
            expected = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            assert torch.equal(merged.get_submodule(name).weight.detach(), expected), name


def test_qlora_dequantized_matches_4bit_model_and_original_does_not(tmp_path):
    base = make_base(tmp_path / "base")
    pm4, adapter = _qlora_adapter(tmp_path, base)
    ref4 = logits(pm4)
    assert read_train_sidecar(adapter)["quantization"] == QuantSpec(compute_dtype="float32")

    deq = merge_adapter(adapter, tmp_path / "deq", parity_input_ids=ROWS)
    orig = merge_adapter(adapter, tmp_path / "orig", qlora_merge="original", parity_input_ids=ROWS)
    assert deq.mode == "qlora-dequantized" and orig.mode == "qlora-original-base"
    assert deq.max_abs_diff < 1e-5 and orig.max_abs_diff < 1e-5  # each against its own reference
    # documented: vs the real 4-bit model with fp32 compute the dequantized merge agrees to ~1e-5
    d_deq = maxdiff(ref4, logits(load(tmp_path / "deq")))
    d_orig = maxdiff(ref4, logits(load(tmp_path / "orig")))
    assert d_deq < 1e-4
    # "original" differs from the trained model by the base's quantization error
    quant_error = maxdiff(
        logits(load(base)),
        logits(
            transformers.AutoModelForCausalLM.from_pretrained(
                base,
                quantization_config=transformers.BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.float32,
                ),
            )
        ),
    )
    assert d_orig > 100 * d_deq and d_orig > 0.1 * quant_error
    assert "ORIGINAL" in (tmp_path / "orig" / "README.md").read_text()
    assert json.loads((tmp_path / "deq" / "merge_report.json").read_text())["quantization"]["quant_type"] == "nf4"


def test_qlora_bf16_compute_tolerance(tmp_path):
    """bf16 base, bf16 compute (the usual QLoRA setup): parity vs the dequantized base passes the bf16 rule; the
    real 4-bit model's bf16 matmuls add their own rounding on top (documented, ~1e-2 relative)."""
    base = make_base(tmp_path / "base", dtype=torch.bfloat16)
    pm4, adapter = _qlora_adapter(tmp_path, base, torch.bfloat16)
    ref4 = logits(pm4)
    result = merge_adapter(adapter, tmp_path / "deq", parity_input_ids=ROWS)
    assert result.max_abs_diff < result.tolerance
    scale = max(float(r.abs().max()) for r in ref4)
    assert maxdiff(ref4, logits(load(tmp_path / "deq"))) < 0.05 * scale


def test_qlora_in_memory_4bit_model(tmp_path):
    base = make_base(tmp_path / "base", shard="300KB")
    pm4, adapter = _qlora_adapter(tmp_path, base)
    streamed = merge_adapter(adapter, tmp_path / "streamed", parity_input_ids=ROWS)
    in_memory = merge_model_in_memory(pm4, tmp_path / "in_memory", parity_input_ids=ROWS)
    assert in_memory.mode == streamed.mode == "qlora-dequantized"
    a, b = state(tmp_path / "streamed"), state(tmp_path / "in_memory")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    assert "quantization_config" not in json.loads((tmp_path / "in_memory" / "config.json").read_text())
    assert not list(tmp_path.glob(".in_memory.*"))


# ------------------------------------------------------------------------------------------------ atomic output


def test_crash_mid_save_leaves_previous_target_intact(tmp_path, monkeypatch):
    base = make_base(tmp_path / "base", shard="300KB")
    adapter = make_adapter(tmp_path / "adapter", base)
    out = tmp_path / "out"
    merge_adapter(adapter, out, parity_input_ids=ROWS)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    adapter2 = make_adapter(tmp_path / "adapter2", base, seed=7)
    calls = {"n": 0}
    real = ShardWriter.write

    def flaky(self, key, tensor):
        calls["n"] += 1
        if calls["n"] == 12:  # in the middle of a shard, after whole shards were written
            raise OSError("disk full (simulated)")
        real(self, key, tensor)

    monkeypatch.setattr(ShardWriter, "write", flaky)
    with pytest.raises(OSError, match="simulated"):
        merge_adapter(adapter2, out, parity_input_ids=ROWS)
    assert calls["n"] == 12
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    monkeypatch.setattr(ShardWriter, "write", real)  # and a successful run replaces it
    merge_adapter(adapter2, out, parity_input_ids=ROWS)
    assert {p.name: p.read_bytes() for p in out.iterdir()} != before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_parity_failure_leaves_nothing(tmp_path):
    base = make_base(tmp_path / "base")
    adapter = make_adapter(tmp_path / "adapter", base)
    with pytest.raises(QwentuneError, match="does not match"):
        merge_adapter(adapter, tmp_path / "out", tolerance=-1.0, parity_input_ids=ROWS)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_wrong_base_is_refused(tmp_path):
    base = make_base(tmp_path / "base")
    adapter = make_adapter(tmp_path / "adapter", base)
    torch.manual_seed(0)
    other = tmp_path / "other"
    cfg = _config()
    cfg.intermediate_size = 96
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    with pytest.raises(QwentuneError, match="LoRA delta of shape"):
        merge_adapter(adapter, tmp_path / "out", base=other)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ Qwen2-VL layout


def test_qwen2_vl_nested_layout(tmp_path):
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
            rope_scaling={"type": "mrope", "mrope_section": [4, 2, 2]},
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=1,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    cls = transformers.Qwen2VLForConditionalGeneration
    cls(cfg).save_pretrained(tmp_path / "base", max_shard_size="200KB")
    with safe_open(str(next((tmp_path / "base").glob("*.safetensors"))), "pt") as f:
        assert not any("language_model" in k for k in f.keys())  # checkpoint layout differs from module names
    pm = peft.get_peft_model(
        cls.from_pretrained(tmp_path / "base"),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj)",
            trainable_token_indices=[5, 9],
        ),
    )
    randomize(pm).save_pretrained(tmp_path / "adapter")
    result = merge_adapter(tmp_path / "adapter", tmp_path / "out", parity_input_ids=[[1, 2, 3, 5, 9]])
    assert result.untied and result.max_abs_diff < 1e-5
    cfg_out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg_out["tie_word_embeddings"] is False and cfg_out["text_config"]["tie_word_embeddings"] is False
    ref = peft.PeftModel.from_pretrained(cls.from_pretrained(tmp_path / "base"), str(tmp_path / "adapter")).eval()
    assert (
        maxdiff(logits(ref, [[1, 2, 3, 5, 9]]), logits(cls.from_pretrained(tmp_path / "out"), [[1, 2, 3, 5, 9]]))
        < 1e-5
    )


def test_key_index_suffix_matching():
    index = KeyIndex(
        [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.self_attn.q_proj.weight",
            "visual.blocks.0.attn.qkv.weight",
            "model.embed_tokens.weight",
        ]
    )
    assert (
        index.find("model.language_model.layers.1.self_attn.q_proj.weight") == "model.layers.1.self_attn.q_proj.weight"
    )
    assert index.find("model.visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"
    assert index.find("model.language_model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert index.find("lm_head.weight") is None
    with pytest.raises(QwentuneError, match="several"):
        index.find("other.q_proj.weight")


# ------------------------------------------------------------------------------------------------ sidecar and refusals


def test_sidecar_format(tmp_path):
    path = write_train_sidecar(
        tmp_path,
        quantization={"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
        chat_template="{{ x }}",
        model_card={"data": "d"},
    )
    assert path.name == SIDECAR_NAME
    data = json.loads(path.read_text())
    assert data["format"] == "qwentune-train" and data["quantization"]["blocksize"] == 64
    back = read_train_sidecar(tmp_path)
    assert back["quantization"] == QuantSpec() and back["chat_template"] == "{{ x }}"
    path.write_text(json.dumps({"quantization": {"bits": 4, "quant_typ": "nf4"}}))
    with pytest.raises(QwentuneError, match="did you mean 'quant_type'"):
        read_train_sidecar(tmp_path)
    path.write_text(json.dumps({"quantization": {"bits": 8}}))
    with pytest.raises(QwentuneError, match="bits=8"):
        read_train_sidecar(tmp_path)
    assert read_train_sidecar(tmp_path / "nowhere") == {}


def test_refusals(tmp_path):
    base = make_base(tmp_path / "base")
    adapter = make_adapter(tmp_path / "adapter", base, target_modules=["q_proj"])
    with pytest.raises(QwentuneError, match="qlora_merge"):
        merge_adapter(adapter, tmp_path / "out", qlora_merge="fp16")
    with pytest.raises(QwentuneError, match="adapter_config.json"):
        merge_adapter(tmp_path / "base", tmp_path / "out")
    with pytest.raises(QwentuneError, match="adapter or base directory"):
        merge_adapter(adapter, base)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(QwentuneError, match="rewrites the base weights"):
        merge_adapter(adapter, tmp_path / "out")
    cfg["init_lora_weights"] = True
    cfg["base_model_name_or_path"] = str(tmp_path / "missing")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(QwentuneError, match="missing.*does not exist"):
        merge_adapter(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
