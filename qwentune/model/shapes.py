"""The structure of the real Qwen models (no weights), and shrunk copies of it for tests.

`real_config` feeds memory estimates and benchmarks; `tiny_config` keeps everything that matters for correctness
(tied or untied output layer, q/k/v bias, the GQA ratio, the full vocabulary, the VL nesting) at toy widths.
"""

from __future__ import annotations

import copy
from typing import Any

ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_TOKEN_IDS = {
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "image_token_id": 151655,
    "video_token_id": 151656,
}
VL_MODEL_TYPES = frozenset({"qwen2_vl"})
# Modules QLoRA keeps unquantized on a VL model: a list given to transformers replaces its default (the output layer),
# so the output layer is named again; its default would quantize Qwen2-VL's vision tower and merger.
VL_QUANT_SKIP_MODULES = ("lm_head", "model.visual")


def model_type_of(config: Any) -> str:
    """The model_type of a config dict, a transformers config, a model, or the string itself."""
    if isinstance(config, str):
        return config
    if isinstance(config, dict):
        return str(config.get("model_type", ""))
    config = getattr(config, "config", config)
    return str(getattr(config, "model_type", ""))


def is_vl(config: Any) -> bool:
    """The one test for "this is a vision-language model" (config dict, transformers config, model or model_type)."""
    return model_type_of(config) in VL_MODEL_TYPES


def quant_skip_modules(config: Any) -> list[str] | None:
    """Modules QLoRA keeps unquantized, as `llm_int8_skip_modules` (None: transformers' default, the output layer).
    Training and the merge read the same list."""
    return list(VL_QUANT_SKIP_MODULES) if is_vl(config) else None


# Sampling settings of the published Qwen2.5-Instruct generation_config.json.
QWEN25_INSTRUCT_SAMPLING = {
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
}

_COMMON: dict[str, Any] = {
    "model_type": "qwen2",
    "architecture": "Qwen2ForCausalLM",
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "bos_token_id": ENDOFTEXT_ID,
    "pad_token_id": ENDOFTEXT_ID,
    "qkv_bias": True,
}
_INSTRUCT = {"instruct": True, "eos_token_id": IM_END_ID, "generation_eos_token_ids": [IM_END_ID, ENDOFTEXT_ID]}
_BASE = {"instruct": False, "eos_token_id": ENDOFTEXT_ID, "generation_eos_token_ids": [ENDOFTEXT_ID]}
_W05 = {"hidden": 896, "intermediate": 4864, "layers": 24, "heads": 14, "kv_heads": 2}
_W15 = {"hidden": 1536, "intermediate": 8960, "layers": 28, "heads": 12, "kv_heads": 2}


def _entry(hf_id: str, template: str, widths: dict, kind: dict, vocab: int = 151936, tied: bool = True, **extra):
    facts = {**_COMMON, "hf_id": hf_id, "template": template, **widths, **kind, "vocab": vocab, "tied": tied, **extra}
    facts["head_dim"] = facts["hidden"] // facts["heads"]
    return facts


SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": _entry("Qwen/Qwen2.5-0.5B", "qwen2.5-base", _W05, _BASE),
    "qwen2.5-0.5b-instruct": _entry("Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-instruct", _W05, _INSTRUCT),
    "qwen2.5-1.5b": _entry("Qwen/Qwen2.5-1.5B", "qwen2.5-base", _W15, _BASE),
    "qwen2.5-3b-instruct": _entry(
        "Qwen/Qwen2.5-3B-Instruct",
        "qwen2.5-instruct",
        {"hidden": 2048, "intermediate": 11008, "layers": 36, "heads": 16, "kv_heads": 2},
        _INSTRUCT,
    ),
    "qwen2.5-7b-instruct": _entry(
        "Qwen/Qwen2.5-7B-Instruct",
        "qwen2.5-instruct",
        {"hidden": 3584, "intermediate": 18944, "layers": 28, "heads": 28, "kv_heads": 4},
        _INSTRUCT,
        vocab=152064,
        tied=False,
    ),
    "qwen2-0.5b-instruct": _entry("Qwen/Qwen2-0.5B-Instruct", "qwen2-instruct", _W05, _INSTRUCT),
    "qwen2-vl-2b-instruct": _entry(
        "Qwen/Qwen2-VL-2B-Instruct",
        "qwen2-vl-instruct",
        _W15,
        _INSTRUCT,
        model_type="qwen2_vl",
        architecture="Qwen2VLForConditionalGeneration",
        mrope_section=[16, 24, 24],
        vision={
            "depth": 32,
            "embed_dim": 1280,
            "num_heads": 16,
            "mlp_ratio": 4,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "in_channels": 3,
        },
        **VISION_TOKEN_IDS,
    ),
}


def shape(name: str) -> dict[str, Any]:
    """A copy of the facts for `name`; KeyError with the known names otherwise."""
    if name not in SHAPES:
        raise KeyError(f"unknown model shape '{name}'; known: {', '.join(SHAPES)}")
    return copy.deepcopy(SHAPES[name])


def _make_config(
    facts: dict[str, Any],
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    vision: dict[str, Any] | None = None,
    mrope_section: list[int] | None = None,
):
    """A transformers config with the real model's fixed facts and the given widths."""
    text = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": facts["max_position_embeddings"],
        "rms_norm_eps": facts["rms_norm_eps"],
        "use_sliding_window": False,
        "bos_token_id": facts["bos_token_id"],
        "eos_token_id": facts["eos_token_id"],
    }
    if is_vl(facts):
        from transformers import Qwen2VLConfig

        rope = {"rope_type": "default", "rope_theta": facts["rope_theta"], "mrope_section": list(mrope_section or [])}
        # The vision merger projects into the language model, so its hidden_size is the text width.
        vision_config = {**(vision or facts["vision"]), "hidden_size": hidden}
        return Qwen2VLConfig(
            text_config={**text, "rope_parameters": rope},
            vision_config=vision_config,
            tie_word_embeddings=facts["tied"],
            architectures=[facts["architecture"]],
            **{key: facts[key] for key in VISION_TOKEN_IDS},
        )
    from transformers import Qwen2Config

    return Qwen2Config(
        **text,
        rope_parameters={"rope_type": "default", "rope_theta": facts["rope_theta"]},
        tie_word_embeddings=facts["tied"],
        architectures=[facts["architecture"]],
    )


def real_config(name: str):
    """The transformers config of the real model `name` (exact shapes; no weights)."""
    facts = shape(name)
    return _make_config(
        facts,
        hidden=facts["hidden"],
        intermediate=facts["intermediate"],
        layers=facts["layers"],
        heads=facts["heads"],
        kv_heads=facts["kv_heads"],
        vocab=facts["vocab"],
        mrope_section=facts.get("mrope_section"),
    )


def tiny_config(
    name: str,
    *,
    layers: int = 2,
    hidden: int | None = None,
    heads: int | None = None,
    kv_heads: int = 1,
    intermediate: int | None = None,
    vocab_size: int | None = None,
    vision_layers: int | None = None,
    vision_width: int = 32,
):
    """The structure of `name` at toy widths. By default: `heads` = real GQA ratio × `kv_heads`, head_dim 8
    (16 for Qwen2-VL, whose 3-D rotary needs room for three sections), hidden = heads × head_dim, the real
    intermediate/hidden ratio, the real (full) vocabulary, tied exactly where the real model ties."""
    facts = shape(name)
    vl = is_vl(facts)
    ratio = facts["heads"] // facts["kv_heads"]
    heads = heads or ratio * kv_heads
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    hidden = hidden or heads * (16 if vl else 8)
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"hidden ({hidden}) must be heads ({heads}) × an even head_dim; try hidden={heads * 8}")
    head_dim = hidden // heads
    if intermediate is None:
        intermediate = max(8, round(hidden * facts["intermediate"] / facts["hidden"] / 8) * 8)
    vision = mrope = None
    if vl:
        half = head_dim // 2  # the real split [16, 24, 24] of 64 rotary pairs, scaled to this head_dim
        mrope = [half * 16 // 64, half * 24 // 64]
        mrope.append(half - sum(mrope))
        vision = {**facts["vision"], "depth": vision_layers or layers, "embed_dim": vision_width, "num_heads": 2}
    return _make_config(
        facts,
        hidden=hidden,
        intermediate=intermediate,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab_size or facts["vocab"],
        vision=vision,
        mrope_section=mrope,
    )


def model_class(config):
    """The transformers class that builds a model for `config`."""
    if is_vl(config):
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def build_model(config, *, seed: int = 0, dtype=None):
    """A random-weight model for `config`, reproducible for a given seed (the global RNG is left untouched)."""
    import torch

    dtype = dtype or torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cls = model_class(config)
        if cls.__name__ == "AutoModelForCausalLM":
            return cls.from_config(config, dtype=dtype)
        return cls._from_config(config, dtype=dtype)


def generation_config(name: str):
    """The GenerationConfig a download of `name` comes with: eos ids (and the published sampling for Qwen2.5
    instruct models)."""
    from transformers import GenerationConfig

    facts = shape(name)
    eos = facts["generation_eos_token_ids"]
    values: dict[str, Any] = {
        "bos_token_id": facts["bos_token_id"],
        "eos_token_id": eos if len(eos) > 1 else eos[0],
        "pad_token_id": facts["pad_token_id"],
    }
    if facts["template"] == "qwen2.5-instruct":
        values.update(QWEN25_INSTRUCT_SAMPLING)
    return GenerationConfig(**values)


def param_count(name: str) -> int:
    """Exact parameter count of the real model (built on the meta device, so nothing is allocated)."""
    import torch

    with torch.device("meta"):
        model = build_model(real_config(name), dtype=torch.bfloat16)
    return sum(p.numel() for p in model.parameters())
