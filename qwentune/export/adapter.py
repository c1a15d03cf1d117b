"""Reading a PEFT LoRA adapter for the streaming merge: its config checks, its tensors parsed into per-module
deltas (``B @ A * scaling``, rsLoRA, rank/alpha patterns, DoRA, lora bias, embeddings, trainable-token rows,
``modules_to_save``), and the map from PEFT module names to checkpoint keys (by unique suffix)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import QwentuneError

_PEFT_PREFIX = "base_model.model."
# LoraConfig fields that change what the adapter computes in ways the streaming merge does not implement.
_UNSUPPORTED_STREAMING = {
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
}
# init_lora_weights values that rewrite the base weights at init: the adapter only makes sense on that residual base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


@dataclass
class LoraDelta:
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    embedding: bool = False
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None  # DoRA

    def delta(self) -> torch.Tensor:
        if self.embedding:
            return (self.B.float() @ self.A.float()).T * self.scaling
        d = (self.B.float() @ self.A.float()) * self.scaling
        return d.T if self.fan_in_fan_out else d


@dataclass
class KeyOps:
    """What happens to one checkpoint tensor."""

    replace: torch.Tensor | None = None
    lora: LoraDelta | None = None
    add: torch.Tensor | None = None  # lora_B.bias * scaling
    rows: list[tuple[list[int], torch.Tensor]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return self.replace is None and self.lora is None and self.add is None and not self.rows


_LORA_KEY = re.compile(
    r"^(?P<mod>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
    r"lora_embedding_B|lora_magnitude_vector(?:\.weight)?)$"
)
_TT_KEY = re.compile(r"^(?P<mod>.+)\.token_adapter\.trainable_tokens_delta$")
_BASE_LAYER_KEY = re.compile(r"^(?P<mod>.+)\.base_layer\.(?P<param>weight|bias)$")
_FULL_KEY = re.compile(r"^(?P<mod>.+)\.(?P<param>weight|bias)$")


def check_adapter_config(cfg: dict, *, streaming: bool) -> None:
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise QwentuneError(
            f"peft_type {peft_type!r} is not a LoRA adapter",
            where="adapter_config.json",
            hint="train trainable tokens through LoraConfig(trainable_token_indices=...)",
        )
    if not streaming:
        return
    for key, what in _UNSUPPORTED_STREAMING.items():
        if cfg.get(key):
            raise QwentuneError(
                f"{what} ({key}) is not supported by the streaming merge",
                where="adapter_config.json",
                hint="use streaming=False (PEFT's merge_and_unload)"
                if key != "alora_invocation_tokens"
                else "activated LoRA only applies after its invocation tokens and cannot be merged",
            )
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise QwentuneError(
            f"init_lora_weights={init!r} rewrites the base weights at init, so the adapter does not apply to the "
            "original base",
            where="adapter_config.json",
            hint="save the adapter with path_initial_model_for_weight_conversion=... (a plain LoRA)",
        )


def _pattern_key(patterns: dict, name: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _scaling(cfg: dict, module: str, rank: int) -> float:
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rk, ak = _pattern_key(rank_pattern, module), _pattern_key(alpha_pattern, module)
    r = rank_pattern[rk] if rk is not None else cfg.get("r", 8)
    alpha = alpha_pattern[ak] if ak is not None else cfg.get("lora_alpha", 8)
    if r != rank:
        raise QwentuneError(f"{module}: lora_A has rank {rank} but the config says r={r}", where="adapter_config.json")
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def load_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    st = adapter_dir / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    bin_ = adapter_dir / "adapter_model.bin"
    if bin_.is_file():
        return torch.load(bin_, map_location="cpu", weights_only=True)
    raise QwentuneError("no adapter_model.safetensors (or .bin)", where=str(adapter_dir))


@dataclass
class ParsedAdapter:
    lora: dict[str, LoraDelta]  # module path -> delta
    lora_bias: dict[str, torch.Tensor]  # module path -> bias delta (already scaled)
    replace: dict[str, torch.Tensor]  # "<module>.<param>" -> full tensor
    rows: dict[str, tuple[list[int], torch.Tensor]]  # module path -> (indices, values)
    token_ids: list[int]


def parse_adapter(cfg: dict, tensors: dict[str, torch.Tensor]) -> ParsedAdapter:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    replace: dict[str, torch.Tensor] = {}
    tt: dict[str, torch.Tensor] = {}
    unknown = []
    for key, t in tensors.items():
        if not key.startswith(_PEFT_PREFIX):
            unknown.append(key)
            continue
        rest = key[len(_PEFT_PREFIX) :]
        if m := _LORA_KEY.match(rest):
            part = m["part"].removesuffix(".weight") if "magnitude" in m["part"] else m["part"]
            parts.setdefault(m["mod"], {})[part] = t
        elif m := _TT_KEY.match(rest):
            tt[m["mod"]] = t
        elif m := _BASE_LAYER_KEY.match(rest):
            replace[f"{m['mod']}.{m['param']}"] = t
        elif "lora_" in rest or "trainable_tokens" in rest or "modules_to_save" in rest or "token_adapter" in rest:
            unknown.append(key)
        elif m := _FULL_KEY.match(rest):
            replace[f"{m['mod']}.{m['param']}"] = t  # modules_to_save / bias="all"|"lora_only"
        else:
            unknown.append(key)
    if unknown:
        raise QwentuneError(
            f"adapter tensors the streaming merge does not understand: {unknown[:4]}",
            where="adapter_model.safetensors",
            hint="use streaming=False (PEFT's merge_and_unload)",
        )
    lora: dict[str, LoraDelta] = {}
    lora_bias: dict[str, torch.Tensor] = {}
    for mod, p in parts.items():
        emb = "lora_embedding_A" in p or "lora_embedding_B" in p
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A.weight", "lora_B.weight")
        if a_key not in p or b_key not in p:
            raise QwentuneError(f"{mod}: incomplete LoRA pair (have {sorted(p)})", where="adapter_model.safetensors")
        A, B = p[a_key], p[b_key]
        scaling = _scaling(cfg, mod, A.shape[0])
        magnitude = p.get("lora_magnitude_vector")
        if magnitude is not None and emb:
            raise QwentuneError(
                f"{mod}: DoRA on an embedding is not supported by the streaming merge",
                hint="use streaming=False (PEFT's merge_and_unload)",
            )
        if magnitude is None and cfg.get("use_dora") and not emb:
            raise QwentuneError(f"{mod}: use_dora is set but no magnitude vector was saved")
        lora[mod] = LoraDelta(A, B, scaling, emb, bool(cfg.get("fan_in_fan_out")) and not emb, magnitude)
        if "lora_B.bias" in p:
            lora_bias[mod] = p["lora_B.bias"].float() * scaling
    rows: dict[str, tuple[list[int], torch.Tensor]] = {}
    token_ids: list[int] = []
    if tt:
        spec = cfg.get("trainable_token_indices")
        for mod, values in tt.items():
            if isinstance(spec, dict):
                matches = [k for k in spec if mod == k or mod.endswith("." + k)]
                if len(matches) != 1:
                    raise QwentuneError(f"{mod}: cannot tell which trainable_token_indices entry it is ({spec})")
                idx = list(spec[matches[0]])
            elif isinstance(spec, list) and len(tt) == 1:
                idx = list(spec)
            else:
                raise QwentuneError(f"{mod}: trainable token deltas without matching trainable_token_indices")
            if values.shape[0] != len(idx):
                raise QwentuneError(f"{mod}: {values.shape[0]} trained rows for {len(idx)} token indices")
            rows[mod] = (idx, values)
            token_ids += idx
    return ParsedAdapter(lora, lora_bias, replace, rows, sorted(set(token_ids)))


class KeyIndex:
    """Map model-side names (PEFT module paths, transformers-5 layout) to the checkpoint's keys by suffix."""

    def __init__(self, keys):
        self.keys = set(keys)
        self.by_suffix: dict[str, list[str]] = {}
        for key in self.keys:
            comps = key.split(".")
            for i in range(len(comps)):
                self.by_suffix.setdefault(".".join(comps[i:]), []).append(key)

    def find(self, name: str) -> str | None:
        if name in self.keys:
            return name
        comps = name.split(".")
        for i in range(1, len(comps) - 1):  # a suffix keeps at least "<module>.<param>"
            hits = self.by_suffix.get(".".join(comps[i:]))
            if not hits:
                continue
            if len(hits) == 1:
                return hits[0]
            raise QwentuneError(
                f"'{name}' matches several checkpoint tensors by suffix: {sorted(hits)[:4]}",
                where="merge key mapping",
            )
        return None
