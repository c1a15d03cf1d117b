"""Export a Qwen2/Qwen2.5 model to one GGUF file that llama.cpp and Ollama load, verified against its source.

`export_gguf` writes the `qwen2` metadata, every tensor under llama.cpp's names (from the `gguf` package's own
tensor map), the BPE tokenizer with its chat template, quantizes only with what `gguf.quants` provides, then loads the
file back with transformers and compares logits, greedy tokens and tokenizer ids with the source (gguf_verify.py)
before the file takes its final name. The tensor and tokenizer choices follow llama.cpp's convert_hf_to_gguf.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import QwentuneError
from ..files import atomic_write_json, atomic_write_text, public_mode
from ..model import is_vl

GGUF_TYPES = ("f16", "bf16", "q8_0")
REPORT_NAME = "export_report.json"
MODELFILE_NAME = "Modelfile"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass
class GgufReport:
    """What `export_gguf` wrote and how closely the written file matches its source."""

    path: Path
    type: str
    source: str
    size_bytes: int
    source_size_bytes: int
    seconds: float
    tensor_types: dict[str, int]
    parity: dict[str, Any]
    greedy: dict[str, Any]
    tokenizer: dict[str, Any]
    modelfile: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["modelfile"] = str(self.modelfile) if self.modelfile else None
        return data


# ------------------------------------------------------------------------------------------------ inputs


def model_dir_for_export(model: str | Path) -> tuple[Path, str]:
    """(HF model dir, what the user wrote) for a merged dir, a run dir (its merged/), or any resolver source.
    Refuses adapter dirs, run dirs without merged/, Qwen2-VL and other architectures."""
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        raise QwentuneError(
            f"'{path}' is an adapter directory, not a model",
            where="export",
            hint=f"merge it first: qwentune merge {path} -o MERGED_DIR, then export MERGED_DIR",
        )
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / "merged" / "config.json").is_file():
            path = path / "merged"
            text = str(path)
        elif (path / "adapter").is_dir():
            raise QwentuneError(
                f"run directory '{path}' has no merged/ model",
                where="export",
                hint=f"merge it first: qwentune merge {path / 'adapter'} -o {path / 'merged'}",
            )
    from ..model import resolve_model

    resolved = resolve_model(text).path
    config = _read_config(resolved)
    if is_vl(config):
        raise QwentuneError(
            f"'{model}' is a Qwen2-VL model; GGUF export covers text models only",
            where="export",
            hint="the vision tower needs a separate projector (mmproj) file, which qwentune does not write",
        )
    if config.get("model_type") != "qwen2":
        raise QwentuneError(
            f"'{model}' has model_type '{config.get('model_type')}'; GGUF export supports qwen2 (Qwen2, Qwen2.5)",
            where="export",
        )
    if not any((resolved / name).is_file() for name in _WEIGHT_FILES):
        raise QwentuneError(f"'{resolved}' has no safetensors weights", where="export", hint="export a model dir")
    return resolved, text


def _read_config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise QwentuneError(f"cannot read config.json: {e}", where=str(model_dir)) from None


def _check_output(output: Path, *, force: bool, ollama: bool) -> None:
    if output.suffix.lower() != ".gguf":
        raise QwentuneError(f"output '{output}' must end in .gguf", where="export --gguf", hint="e.g. model.gguf")
    if output.is_dir():
        raise QwentuneError(f"output '{output}' is a directory", where="export --gguf", hint="name a .gguf file")
    taken = [p for p in (output, output.parent / MODELFILE_NAME if ollama else None) if p and p.exists()]
    if taken and not force:
        raise QwentuneError(f"'{taken[0]}' already exists", where="export --gguf", hint="pass --force to replace it")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QwentuneError(f"cannot create '{output.parent}': {e.strerror}", where="export --gguf") from None
    if not os.access(output.parent, os.W_OK):
        raise QwentuneError(f"no write permission in '{output.parent}'", where="export --gguf")


# ------------------------------------------------------------------------------------------------ writing


def _file_type(gtype: str):
    import gguf

    return {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[gtype]


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise QwentuneError(f"rope scaling '{kind}' is not supported by the GGUF export", where="config.json")
    return float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _add_hparams(writer, config: dict, gtype: str, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(_file_type(gtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """As llama.cpp's convert (get_vocab_base + _set_vocab_gpt2): ids without a token become [PAD{i}] (unused),
    added special tokens are control tokens, other added tokens (<tool_call>, ...) user-defined."""
    import gguf

    from ..model import ENDOFTEXT

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise QwentuneError(f"tokenizer has ids beyond the model's vocab_size {vocab_size}", where="tokenizer")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        # a tokenizer converted from a llama.cpp GGUF (the offline model, the test asset) holds these as vocab entries
        if reverse.get(i, f"[PAD{i}]") == f"[PAD{i}]":
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    # the merges as the backend tokenizer holds them ("a b" strings in the format llama.cpp reads)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    eot = vocab.get(ENDOFTEXT)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if eot is not None:  # Qwen's published GGUFs name <|endoftext|> as bos (never added: add_bos_token is false)
        writer.add_bos_token_id(eot)
    writer.add_eos_token_id(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eot)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    if pad is not None:
        writer.add_pad_token_id(pad)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    return [model_dir / "model.safetensors"]


def _encode(name: str, data, gtype: str):
    """(array, raw ggml type) as llama.cpp's convert stores it: 1-D tensors and norms stay f32; q8_0 falls back to
    f16 where a row is not a whole number of 32-value blocks."""
    import gguf
    import numpy as np

    if data.ndim <= 1 or name.endswith("_norm.weight"):
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if gtype == "q8_0":
        try:
            return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        except gguf.QuantError:
            pass
    if gtype == "bf16":
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def write_gguf(model_dir: Path, path: Path, tokenizer, *, gtype: str, name: str) -> dict[str, int]:
    """Write the GGUF file at `path` (not atomically: the caller writes to a temp name); returns tensor type counts."""
    import gguf
    from safetensors import safe_open

    config = _read_config(model_dir)
    blocks = int(config["num_hidden_layers"])
    tied = bool(config.get("tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, blocks)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    _add_hparams(writer, config, gtype, name)
    _add_tokenizer(writer, tokenizer, int(config["vocab_size"]))
    counts: dict[str, int] = {}
    for file in _weight_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                    continue  # llama.cpp computes rotary frequencies, and reuses token_embd as the tied output
                new = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise QwentuneError(f"tensor '{key}' has no llama.cpp name", where=str(file))
                data, qtype = _encode(new, f.get_tensor(key).float().numpy(), gtype)
                writer.add_tensor(new, data, raw_dtype=qtype)
                counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


# ------------------------------------------------------------------------------------------------ entry point


def export_gguf(
    model: str | Path, output: str | Path, *, type: str = "f16", ollama: bool = False, force: bool = False
) -> GgufReport:
    """Write `output` (.gguf) from `model` (merged dir, run dir, or any model source), verify it loads back in
    transformers with matching logits, greedy tokens and tokenizer ids, run it in llama.cpp when installed (greedy
    tokens against the source), then write export_report.json (and a Modelfile with `ollama`) beside it. A k-quant
    (`q4_k_m`, `q5_k_m`, `q6_k`) is llama.cpp's quantizer applied to the verified f16 file. Raises QwentuneError
    (nothing left behind) on bad input or a failed check."""
    from transformers import AutoTokenizer

    from .gguf_llama import KQUANT_TYPES, compare_in_llama_cpp, quantize, require_quantizer
    from .gguf_verify import verify_gguf

    if importlib.util.find_spec("gguf") is None:
        raise QwentuneError("the gguf package is not installed", where="export", hint="pip install 'qwentune[gguf]'")
    if type not in GGUF_TYPES + tuple(KQUANT_TYPES):
        hint = f"one of {', '.join(GGUF_TYPES + tuple(KQUANT_TYPES))}"
        raise QwentuneError(f"unknown GGUF type '{type}'", where="export --type", hint=hint)
    kquant = type in KQUANT_TYPES
    if kquant:
        require_quantizer(type)  # before anything is written
    output = Path(output).expanduser().absolute()
    _check_output(output, force=force, ollama=ollama)
    model_dir, source = model_dir_for_export(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    start = time.monotonic()
    temps: list[Path] = []

    def temp(tag: str) -> Path:
        fd, name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.stem}.{tag}.", suffix=".tmp.gguf")
        os.close(fd)
        temps.append(Path(name))
        return temps[-1]

    try:
        written = temp("f16" if kquant else type)
        counts = write_gguf(model_dir, written, tokenizer, gtype="f16" if kquant else type,
                            name=Path(source).name or "model")  # fmt: skip
        checks = verify_gguf(model_dir, written, tokenizer, gtype="f16" if kquant else type)
        extra: dict[str, Any] = {}
        if kquant:  # llama.cpp's quantizer, from the f16 file just verified; its types as written
            extra["verified_f16"] = {"parity": checks["parity"], "greedy": checks["greedy"]}
            tmp = temp(type)
            actual = quantize(written, tmp, type)
            counts, extra["tensor_type_of"] = actual["counts"], actual["tensors"]
            checks["parity"] = {"checked": "on the f16 file it was quantized from (verified_f16)"}
        else:
            tmp = written
        stop = {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")) if i is not None}
        tol = checks["greedy"].get("tolerance", checks["parity"].get("tolerance", 0.0))
        extra["llama_cpp"] = compare_in_llama_cpp(tmp, type, checks["greedy"], stop, tol)
        if extra["llama_cpp"].get("ran"):
            print(f"[qwentune export] llama.cpp greedy agreement {extra['llama_cpp']['agreement']:.0%} "
                  f"over {len(extra['llama_cpp']['source'])} tokens")  # fmt: skip
        report = GgufReport(
            path=output,
            type=type,
            source=source,
            size_bytes=tmp.stat().st_size,
            source_size_bytes=sum(p.stat().st_size for p in _weight_files(model_dir)),
            seconds=round(time.monotonic() - start, 1),
            tensor_types=counts,
            extra=extra,
            **checks,
        )
        if ollama:
            from .modelfile import default_system_prompt, modelfile_text

            report.modelfile = output.parent / MODELFILE_NAME
            atomic_write_text(report.modelfile, modelfile_text(output.name, default_system_prompt(tokenizer)))
        public_mode(tmp)  # mkstemp makes 0600: the GGUF gets the mode an ordinary create would
        os.replace(tmp, output)
    finally:
        for path in temps:
            path.unlink(missing_ok=True)
    atomic_write_json(output.parent / REPORT_NAME, report.to_dict())
    return report
