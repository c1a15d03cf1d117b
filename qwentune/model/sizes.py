"""The numbers of a Qwen model that memory depends on, read without loading weights (for `qwentune estimate`):
seed shapes from qwentune.shapes, config.json of a local or cached model, or a GGUF header."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import QwentuneError, read_json_file
from .shapes import is_vl


@dataclass
class Shape:
    """The numbers of a Qwen2 / Qwen2.5 / Qwen2-VL text model that memory depends on."""

    origin: str  # where they came from
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int = 0
    vision: dict | None = None
    checkpoint_bytes: int = 2  # bytes per parameter as stored: bf16 on the hub, fp32 for a converted GGUF

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden // self.heads

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def _from_facts(facts: dict, origin: str, tied: bool | None = None) -> Shape:
    return Shape(
        origin=origin,
        hidden=facts["hidden"],
        intermediate=facts["intermediate"],
        layers=facts["layers"],
        heads=facts["heads"],
        kv_heads=facts["kv_heads"],
        vocab=facts["vocab"],
        tied=facts["tied"] if tied is None else tied,
        vision=facts.get("vision"),
    )


def _from_config(cfg: dict, origin: str) -> Shape:
    text = cfg.get("text_config") or cfg
    get = lambda key, default=None: text.get(key, cfg.get(key, default))  # noqa: E731
    vision = cfg.get("vision_config") if is_vl(cfg) else None
    heads = get("num_attention_heads")
    return Shape(
        origin=origin,
        hidden=get("hidden_size"),
        intermediate=get("intermediate_size"),
        layers=get("num_hidden_layers"),
        heads=heads,
        kv_heads=get("num_key_value_heads", heads),
        vocab=get("vocab_size"),
        tied=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        head_dim=get("head_dim") or 0,
        vision=vision,
        checkpoint_bytes=4 if str(cfg.get("dtype") or cfg.get("torch_dtype")) == "float32" else 2,
    )


def _from_gguf(path: Path) -> Shape:
    from gguf import GGUFReader  # memory-maps the file; only the header is read

    reader = GGUFReader(str(path))

    def value(key: str):
        f = reader.fields[key]
        return f.parts[f.data[0]][0].item()

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    names = {t.name: t for t in reader.tensors}
    return Shape(
        origin=f"GGUF header of {path.name}",
        hidden=value(f"{arch}.embedding_length"),
        intermediate=value(f"{arch}.feed_forward_length"),
        layers=value(f"{arch}.block_count"),
        heads=value(f"{arch}.attention.head_count"),
        kv_heads=value(f"{arch}.attention.head_count_kv"),
        vocab=int(max(names["token_embd.weight"].shape)),
        tied="output.weight" not in names,
        checkpoint_bytes=4,  # a GGUF source is converted to a float32 model dir
    )


def model_shape(source: str) -> Shape:
    """The shape of `source` without loading weights: seed models from qwentune.shapes, local dirs and cached Hub
    models from config.json, GGUF files from their header."""
    from .offline import OFFLINE_MODEL
    from .shapes import SHAPES, shape
    from .sources import classify_source

    if source.strip() == OFFLINE_MODEL:
        # Qwen2.5-Coder-0.5B-Instruct has the Qwen2.5-0.5B shape; its GGUF stores output.weight: untied.
        facts = _from_facts(shape("qwen2.5-0.5b-instruct"), "Qwen2.5-0.5B shape, untied (offline GGUF)", tied=False)
        facts.checkpoint_bytes = 4  # converted once from the GGUF to a float32 model dir (model.gguf_source)
        return facts
    kind, payload = classify_source(source)
    if kind == "local":
        config = read_json_file(Path(payload) / "config.json", hint="the model dir is damaged: download it again")
        return _from_config(config, f"{payload}/config.json")
    if kind == "gguf":
        return _from_gguf(Path(payload))
    for name, facts in SHAPES.items():
        if facts["hf_id"].lower() == str(payload).lower():
            return _from_facts(shape(name), f"qwentune.shapes['{name}']")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(payload), "config.json")
    except Exception:  # noqa: BLE001 — any failure means "not cached"
        cached = None
    if isinstance(cached, str):
        return _from_config(json.loads(Path(cached).read_text()), f"cached config.json of {payload}")
    raise QwentuneError(
        f"no config for '{payload}': not a seed model in qwentune.shapes and not in the Hugging Face cache",
        where="model.source",
        hint="download it once, or point model.source at a local model directory",
    )


def vision_params(v: dict, text_hidden: int) -> tuple[int, int]:
    """(linear weight params, other params) of the Qwen2-VL vision tower."""
    e, d, ratio = v["embed_dim"], v["depth"], v.get("mlp_ratio", 4)
    merged = e * v.get("spatial_merge_size", 2) ** 2
    linear = d * (e * 3 * e + e * e + 2 * e * ratio * e) + merged * merged + merged * text_hidden
    patch = v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * v.get("patch_size", 14) ** 2 * e
    other = d * (3 * e + e + ratio * e + e + 4 * e) + 2 * e + merged + text_hidden + patch
    return linear, other


def vision_lora_params(v: dict, text_hidden: int, r: int, train_vision: str) -> int:
    """LoRA parameters `peft.train_vision` adds: the merger MLP (merger), and each block's qkv/proj/fc1/fc2 (all)."""
    if train_vision not in ("merger", "all"):
        return 0
    e, d, ratio = v["embed_dim"], v["depth"], v.get("mlp_ratio", 4)
    merged = e * v.get("spatial_merge_size", 2) ** 2
    params = r * (merged + merged) + r * (merged + text_hidden)
    if train_vision == "all":
        params += d * r * ((e + 3 * e) + (e + e) + (e + ratio * e) + (ratio * e + e))
    return params
