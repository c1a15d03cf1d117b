"""Peak memory of one training process, from the model's config alone (no weights load) — `qwentune estimate`.
Per process (under DDP every rank holds all of it); the activation constants are what the code paths keep for
backward, checked against saved-tensor hooks and measured peaks (tests/test_estimate.py); tokens are counted at the
worst case, data.max_length × per_device_batch_size, all of them trained."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..patches import CPU_VOCAB_CHUNK
from ..recipe import Recipe
from .quantspec import QuantSpec
from .sizes import Shape, model_shape, vision_lora_params, vision_params

__all__ = ["Estimate", "Line", "Shape", "estimate", "estimate_for_launch", "model_shape", "sharded"]

GiB = 1024**3
CARDS_GB = (4, 6, 8, 12, 16, 24, 40, 48, 80)  # GPU memory sizes (GiB) the verdict picks from
CUDA_CONTEXT = 0.5 * GiB  # CUDA context + kernels, outside torch's allocator
ALLOCATOR_HEADROOM = 1.10  # fragmentation in torch's caching allocator
TILE_TOKENS, TILE_VOCAB = 4096, 32768  # TRL's chunked log-prob kernel: [tokens, vocab] projection tile
CPU_TILE_TEMPS = 3  # fp32 tile-sized temporaries of patches.lean_cpu_fold's fold (a copy, exp, p in backward)
NF4_BLOCK, DQ_BLOCK = 64, 256  # bitsandbytes 4-bit block size; double-quant block size over the absmax
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------- the estimate


@dataclass
class Line:
    name: str
    bytes: float
    formula: str
    counted: bool = True  # False: shown for comparison, not in the total


@dataclass
class Estimate:
    title: str
    setting: str
    lines: list[Line] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    device: str = "cuda"
    parts: dict[str, float] = field(default_factory=dict)  # the named terms the lines are made of (tests, --json)

    @property
    def total(self) -> float:
        return sum(line.bytes for line in self.lines if line.counted)

    @property
    def needed(self) -> float:
        """What a GPU must have: the total with allocator headroom, plus the CUDA context."""
        return self.total * ALLOCATOR_HEADROOM + CUDA_CONTEXT

    @property
    def fits_in_gb(self) -> int | None:
        return next((card for card in CARDS_GB if self.needed <= card * GiB), None)

    def verdict(self) -> str:
        if self.device == "cpu":
            return f"CPU: about {gib(self.total)} of RAM for tensors on top of the Python process"
        how = f"{gib(self.total)} × {ALLOCATOR_HEADROOM} allocator headroom + {gib(CUDA_CONTEXT)} CUDA context"
        card = self.fits_in_gb
        if card is None:
            return f"does not fit in {CARDS_GB[-1]} GB ({how} = {gib(self.needed)}): shard (FSDP/ZeRO) or shrink"
        return f"fits in {card} GB ({how} = {gib(self.needed)})"

    def render(self) -> str:
        """A table: '+' lines add up to the total; the others are the alternatives, shown for comparison."""
        width = max(len(line.name) for line in self.lines) + 2
        out = [self.title, self.setting, ""]
        for line in self.lines:
            mark = "+" if line.counted else " "
            out.append(f"{mark} {line.name:<{width}}{gib(line.bytes):>10}{'' if line.counted else '  (alternative)'}")
            out.append(f"      {line.formula}")
        out.append(f"= {'total':<{width}}{gib(self.total):>10}")
        out.append(f"verdict: {self.verdict()}")
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {
            "title": self.title,
            "setting": self.setting,
            "device": self.device,
            "lines": [line.__dict__ for line in self.lines],
            "total_bytes": self.total,
            "needed_bytes": self.needed if self.device != "cpu" else self.total,
            "fits_in_gb": self.fits_in_gb if self.device != "cpu" else None,
            "notes": self.notes,
            "parts": self.parts,
        }


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.1f} MiB"


def _m(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,.0f}"


def nf4_bytes(n: int, double_quant: bool, blocksize: int = NF4_BLOCK) -> float:
    """Bytes of one 4-bit weight of n params: packed nibbles + one absmax per block of 64 (fp32, or uint8 + fp32
    per 256 blocks + the 256-entry code with double quantization)."""
    blocks = n / blocksize
    if double_quant:
        return n / 2 + blocks + 4 * blocks / DQ_BLOCK + 4 * 256
    return n / 2 + 4 * blocks


OPTIMIZER_BYTES = (  # (substring of training.optim, bytes per trainable param, description)
    ("8bit", 2 + 2 * 4 / 256, "2 states × 1 B + blockwise absmax"),
    ("sgd", 0.0, "no state (momentum 0)"),
    ("adafactor", 0.5, "factored second moment, ≤ 0.5 B"),
    ("lion", 4.0, "1 state × fp32"),
    ("adagrad", 4.0, "1 state × fp32"),
    ("rmsprop", 4.0, "1 state × fp32"),
    ("adam", 8.0, "2 states × fp32"),
)


def _head_tokens(recipe: Recipe, seq_len: int | None, trained_tokens: int | None) -> int:
    """Positions per micro-batch the LM head scores (TRL projects only the trained ones)."""
    rows = recipe.training.per_device_batch_size * (2 if recipe.method == "dpo" else 1)
    n = rows * (seq_len or recipe.data.max_length)
    return min(trained_tokens, n) if trained_tokens is not None else n


def estimate(
    recipe: Recipe,
    *,
    device: str = "cuda",
    trainable_token_rows: int | None = None,
    seq_len: int | None = None,
    trained_tokens: int | None = None,
    shape: Shape | None = None,
) -> Estimate:
    """The peak-memory estimate of training `recipe` on one `device` ("cuda" or "cpu") per process.

    `trainable_token_rows`: rows made trainable by `peft.train_new_tokens` (known only once weights load); None
    counts 2 for `auto` (e.g. <tool_call>, </tool_call>) as the worst case, 0 for `off`.
    `seq_len` (default data.max_length): padded tokens per row; `trained_tokens` (default all of them): positions per
    micro-batch whose label is trained (TRL's head projects only those)."""
    s = shape or model_shape(recipe.model.source)
    t, p, q = recipe.training, recipe.peft, QuantSpec.from_section(recipe.peft.quant)  # q: the 4-bit facts
    qlora = p.method == "qlora"
    precision = t.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    autocast = {"bf16": 2, "fp16": 2}.get(precision)  # bytes of the autocast dtype; None: no autocast
    if qlora and q.compute_dtype == "float32" and precision == "fp32":
        autocast = None
    weight_bytes = 4 if (precision == "fp32" or (precision == "fp16" and recipe.model.dtype == "auto")) else 2
    if recipe.model.dtype != "auto":
        weight_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[recipe.model.dtype]

    # ---- parameters
    dims = s.linear_dims()
    per_layer_linear = sum(i * o for i, o in dims.values())
    text_linear = s.layers * per_layer_linear
    q_out, kv_out = dims["q_proj"][1], dims["k_proj"][1]
    heads_other = s.vocab * s.hidden * (1 if s.tied else 2)
    norms_biases = s.layers * (2 * s.hidden + q_out + 2 * kv_out) + s.hidden
    v_linear, v_other = vision_params(s.vision, s.hidden) if s.vision else (0, 0)
    linear, other = text_linear + v_linear, heads_other + norms_biases + v_other
    total_params = linear + other
    w4 = sum(nf4_bytes(i * o, q.double_quant, q.blocksize) for i, o in dims.values()) * s.layers
    # Everything not 4-bit (embedding, norms, untied head, the Qwen2-VL vision tower) stays in the compute dtype
    # (model._prepare_for_adapter does not upcast it).
    compute_bytes = 4 if q.compute_dtype == "float32" else 2
    vision_bytes = compute_bytes * (v_linear + v_other)
    w4_total = w4 + compute_bytes * (heads_other + norms_biases) + vision_bytes
    embed_desc = f"{_m(heads_other)} embedding{'' if s.tied else ' + lm_head'} + {_m(norms_biases)} other"
    dq = " + double-quant absmax" if q.double_quant else " + fp32 absmax/64"
    vision_desc = f" + vision tower {_m(v_linear + v_other)} × {compute_bytes} B (unquantized)" if s.vision else ""
    weights = [
        Line(
            "weights 4-bit (QLoRA)",
            w4_total,
            f"{_m(text_linear)} linear params × {w4 / text_linear:.3f} B (nf4{dq}) + ({embed_desc}) × "
            f"{compute_bytes} B (unquantized, frozen in the compute dtype){vision_desc}",
            counted=qlora,
        ),
        Line("weights bf16 (LoRA)", 2 * total_params, f"{_m(total_params)} params × 2 B", counted=False),
        Line("weights fp32 (LoRA)", 4 * total_params, f"{_m(total_params)} params × 4 B", counted=False),
    ]
    if not qlora:
        weights[1 if weight_bytes == 2 else 2].counted = True

    targets = [m for m in LINEARS if p.target_modules == ["all-linear"] or m in p.target_modules]
    lora_layer = sum(p.r * (dims[m][0] + dims[m][1]) + (dims[m][1] if p.use_dora else 0) for m in targets)
    lora = lora_layer * s.layers
    if s.vision:
        lora += vision_lora_params(s.vision, s.hidden, p.r, p.train_vision)
    rows = trainable_token_rows if trainable_token_rows is not None else (2 if p.train_new_tokens == "auto" else 0)
    saved_matrices = [m for m in p.modules_to_save if m in ("embed_tokens", "lm_head")]
    full_copies = len(saved_matrices) * s.vocab * s.hidden
    trainable = lora + full_copies
    opt_bytes, opt_desc = next(((b, d) for key, b, d in OPTIMIZER_BYTES if key in t.optim), (8.0, "assumed AdamW"))
    head_w = compute_bytes if qlora else weight_bytes  # the output layer's dtype during training
    head_grad = s.vocab * s.hidden * (4 + (head_w if head_w != 4 else 0))  # the fused head's fp32 weight grad (+ cast)

    lines = [*weights]
    lines.append(
        Line(
            "LoRA parameters (fp32)",
            4 * lora,
            f"{_m(lora)} = r {p.r} × (in + out) over {len(targets)} modules × {s.layers} layers × 4 B"
            + (f" + vision ({p.train_vision})" if s.vision and p.train_vision != "off" else ""),
        )
    )
    if full_copies:
        extra = head_grad if "lm_head" in saved_matrices or (s.tied and "embed_tokens" in saved_matrices) else 0
        lines.append(
            Line(
                f"modules_to_save {saved_matrices}",
                head_w * full_copies + extra,
                f"{_m(full_copies)} × {head_w} B"
                + (" + the head's fp32 weight grad in its backward" if extra else ""),
            )
        )
    n_head = _head_tokens(recipe, seq_len, trained_tokens)
    if rows:
        matrices = 1 if s.tied else 2
        small = rows * s.hidden * matrices * (4 + head_w + 4 + opt_bytes)
        gathered = n_head * s.hidden * head_w  # patches.lean_token_rows: each trained position's base head row
        lines.append(
            Line(
                "trainable token rows",
                small + gathered,
                f"{rows} rows{' (assumed for train_new_tokens: auto)' if trainable_token_rows is None else ''} × "
                f"{s.hidden} × {matrices} matrices × (fp32 rows + original + grad + optimizer) + the base head row of "
                f"each of {n_head:,} trained positions × {head_w} B (the rows' log-normaliser shift); no "
                f"vocabulary-sized copy or gradient (PEFT's own path: {gib(s.vocab * s.hidden * head_w + head_grad)})",
            )
        )
    lines.append(Line("gradients (fp32)", 4 * trainable, f"{_m(trainable)} trainable × 4 B"))
    paged = " (paged: may spill to CPU)" if "paged" in t.optim else ""
    lines.append(
        Line(f"optimizer ({t.optim})", opt_bytes * trainable, f"{_m(trainable)} × {opt_bytes:g} B: {opt_desc}{paged}")
    )

    # ---- activations, per token of data.max_length × per_device_batch_size (DPO: chosen + rejected rows)
    rows_per_step = t.per_device_batch_size * (2 if recipe.method == "dpo" else 1)
    L = seq_len or recipe.data.max_length
    N = rows_per_step * L
    h, i, kv = s.hidden, s.intermediate, kv_out
    padded = rows_per_step > 1 and not recipe.sft.packing  # padding → an attention mask → SDPA gets k/v repeated
    kvx = q_out if padded else kv
    a = autocast or 4
    dropout_mask = 0 if p.dropout == 0 else (1 if device == "cuda" else 4)  # fused bool mask | CPU float noise
    in_dims = {m: dims[m][0] for m in targets}
    resid = compute_bytes if qlora else weight_bytes  # residual stream dtype (the embedding's)
    mlp_out = compute_bytes if qlora else a  # gate/up outputs (bitsandbytes returns its input's dtype)
    base = 8 * h + 8 + a * (2 * q_out + 2 * kvx) + 4 * s.heads + 3 * i * mlp_out
    act = a if autocast else 4  # the adapters' activations: autocast's dtype, else fp32
    lora_out = act * p.r * len(targets)
    if autocast and resid != a:  # fp32 activations under autocast: its copy of each adapter input (+ dropout mask)
        adapters = sum(d * (a + dropout_mask) for d in in_dims.values())
    elif p.dropout:  # dropout output + mask, per module (under autocast the mask is in autocast's dtype too)
        adapters = sum(d * (act + (a if autocast else dropout_mask)) for d in in_dims.values())
    else:  # the adapters read the shared norm outputs (and the MLP product); o_proj reads SDPA's saved output
        # (training turns PEFT's input cast off under autocast: patches.lora_input_cast_off)
        shared = {"norm1": any(m in targets for m in ("q_proj", "k_proj", "v_proj"))}
        shared["norm2"] = any(m in targets for m in ("gate_proj", "up_proj"))
        adapters = act * (h * (shared["norm1"] + shared["norm2"]) + i * ("down_proj" in targets))
    per_token_layer = base + adapters + lora_out
    cast_weights = (autocast or 0) * lora_layer  # autocast keeps a low-precision copy of each adapter weight
    mask = rows_per_step * L * L * a if padded else 0  # SDPA turns the padding mask into a float bias, per layer
    layer_full = per_token_layer * N + cast_weights + mask
    full_all = s.layers * layer_full
    ckpt_all = s.layers * resid * h * N
    backward_transients = (4 * i * mlp_out + 4 * h * resid) * N  # grads of one layer's MLP/hidden tensors in flight
    final_norm = (4 * h + 4) * N  # the final norm's fp32 input and 1/rms
    outside = final_norm + 2 * L * s.head_dim * resid  # + RoPE's cos and sin, shared by the layers
    if rows == 0 and "embed_tokens" not in saved_matrices:
        # The embeddings are frozen, so the first layer's input needs no gradient: its first norm keeps nothing, the
        # q/k/v adapters keep no dropout mask and (under autocast) no copy of their weights.
        qkv = [m for m in targets if m in ("q_proj", "k_proj", "v_proj")]
        outside -= (4 * h + 4 + len(qkv) * h * dropout_mask) * N + (autocast or 0) * p.r * h * len(qkv)
    formula = (
        f"per token per layer: 8h + {a}·(2h + 2·{'h' if padded else 'kv'}) + 4·heads + 3i·{mlp_out} "
        f"+ adapter inputs {adapters // 1:,.0f} B + LoRA-A outputs {lora_out:,} B = {per_token_layer:,.0f} B; "
        f"× {N:,} tokens ({rows_per_step} × {L}) × {s.layers} layers"
        + (f"; + the padding mask as a float bias, {rows_per_step}·{L}²·{a} B per layer" if padded else "")
    )
    gc = t.gradient_checkpointing
    ckpt_line = Line(
        "activations, gradient checkpointing",
        ckpt_all + final_norm,
        f"{resid}·h B × {N:,} tokens × {s.layers} layers (checkpointed layer inputs) + final norm input 4·h B/token",
        counted=gc,
    )
    full_line = Line("activations, no checkpointing", full_all + outside, formula, counted=not gc)
    lines += [ckpt_line, full_line]

    # ---- logits and loss over the vocabulary
    hidden_bytes = resid if qlora or weight_bytes == 4 else a  # the final norm's output dtype
    compute = autocast or hidden_bytes
    T = min(n_head, TILE_TOKENS)
    vocab_tile = CPU_VOCAB_CHUNK if device == "cpu" else TILE_VOCAB  # patches.lean_cpu_fold narrows CPU tiles
    tile = T * vocab_tile * compute
    fused = n_head * h * (hidden_bytes + 4 + (hidden_bytes if hidden_bytes != 4 else 0)) + tile
    fused_desc = (
        f"tile {T:,} tokens × {vocab_tile:,} vocab × {compute} B + saved hidden {n_head:,}×{h}×{hidden_bytes} B "
        f"+ its fp32 grad"
    )
    if device == "cpu":
        fused += CPU_TILE_TEMPS * T * vocab_tile * 4
        fused_desc += f" + {CPU_TILE_TEMPS} fp32 tiles of qwentune's in-place CPU fold"
    lines.append(Line("logits/loss: TRL fused chunked head", fused, fused_desc))
    naive = n_head * s.vocab * (4 + 4 + (compute if compute != 4 else 0))
    lines.append(
        Line(
            "logits/loss: naive full logits",
            naive,
            f"{n_head:,} tokens × {s.vocab:,} vocab × (4 B fp32 logits + 4 B grad"
            + (f" + {compute} B {precision} logits)" if compute != 4 else ")"),
            counted=False,
        )
    )
    # Backward runs the head first (every saved activation still alive), then one layer at a time: with
    # checkpointing a layer is recomputed in full; the peak is the larger of the two working sets.
    recompute = layer_full + backward_transients
    ckpt_line.formula += f"; + one layer recomputed in backward with its gradients ({gib(recompute)})"
    if recompute > fused:
        ckpt_line.bytes += recompute - fused
        ckpt_line.formula += f", minus the head's smaller working set that comes first ({gib(fused)})"
    else:
        ckpt_line.formula += ", not counted: the head's working set before it is larger"

    peft_desc = f"QLoRA {q.quant_type}{' double-quant' if q.double_quant else ''}" if qlora else "LoRA"
    setting = (
        f"per process on {device}: {peft_desc}, precision {precision}, r {p.r} on {len(targets)} modules × "
        f"{s.layers} layers, {rows_per_step} × {L} tokens per micro-batch, gradient checkpointing "
        f"{'on' if gc else 'off'}, {t.optim}"
    )
    title = (
        f"{recipe.model.source}: {s.origin}; hidden {h}, intermediate {i}, {s.layers} layers, "
        f"{s.heads}/{s.kv_heads} heads, vocab {s.vocab:,}, {'tied' if s.tied else 'untied'}; {_m(total_params)} params"
    )
    parts = {
        "saved_per_token_layer": per_token_layer,
        "saved_layer": layer_full,
        "saved_all_layers": full_all,
        "saved_checkpoints": ckpt_all,
        "saved_outside_layers": final_norm if gc else outside,
        "layer_recompute": recompute,
        "head": fused,
        "tokens": N,
        "head_tokens": n_head,
        "params": total_params,
        "weights": next(line.bytes for line in weights if line.counted),
        # what FSDP / ZeRO-3 hold whole while in use (`sharded`): the root unit and one decoder layer's weights
        "root_bytes": (compute_bytes if qlora else weight_bytes) * (heads_other + s.hidden),
        "layer_bytes": (w4 / s.layers + compute_bytes * (norms_biases - s.hidden) / s.layers)
        if qlora
        else weight_bytes * (per_layer_linear + (norms_biases - s.hidden) / s.layers),
    }
    est = Estimate(title=title, setting=setting, lines=lines, device=device, parts=parts)
    if seq_len is None and trained_tokens is None:
        est.notes.append("worst case: every row max_length tokens long and every position trained")
    if s.vision:
        est.notes.append("vision tower weights counted; its activations (they depend on the image pixels) are not")
    if p.use_dora:
        est.notes.append("DoRA's magnitude vectors counted; its extra activations (weight norms) are not")
    est.notes.append("DDP adds one fp32 copy of the gradients for its buckets; FSDP/ZeRO shard weights and states")
    return est


def sharded(est: Estimate, kind: str, processes: int, offload: tuple[str, ...] = ()) -> Estimate:
    """`est` per process of `processes` under `kind`: ddp (+ its fp32 gradient buckets), zero2 (gradients and
    optimizer state split N ways), fsdp / zero3 (weights and LoRA parameters split too, plus what is whole while in
    use: the root unit — embedding, head, final norm — and two decoder layers, the one running and the one
    prefetched); `offload` ("optimizer", "param"): held in CPU RAM instead (shown, not counted)."""
    n = processes
    split = {"ddp": (), "zero2": ("gradients", "optimizer")}.get(kind, ("weights", "LoRA", "gradients", "optimizer"))
    moved = tuple({"optimizer": "optimizer", "param": "weights"}[o] for o in offload)
    for line in (line for line in est.lines if line.counted):
        if line.name.startswith(split):
            line.bytes /= n
            line.formula += f"; / {n} processes ({kind})"
        if line.name.startswith(moved):
            line.formula += f"; offloaded: {gib(line.bytes)} of CPU RAM, not counted"
            line.bytes = 0
    if kind in ("fsdp", "zero3"):
        whole = (est.parts["root_bytes"] + 2 * est.parts["layer_bytes"]) * (n - 1) / n
        est.lines.append(Line("gathered while in use", whole, f"the other {n - 1}/{n} of the root unit (embedding, "
                              "head, final norm) and of 2 decoder layers"))  # fmt: skip
    if kind == "ddp" and n > 1:
        grads = next(line for line in est.lines if line.name.startswith("gradients"))
        est.lines.append(Line("DDP gradient buckets", grads.bytes, "one fp32 copy of the gradients"))
    est.setting += f"; {kind} over {n} processes" + (f", {' and '.join(offload)} offloaded" if offload else "")
    return est


def estimate_for_launch(est: Estimate, path, processes: int | None = None) -> Estimate:
    """`est` per process under an accelerate launch config (launch/*.yaml); `processes` replaces its num_processes."""
    import yaml

    from ..errors import QwentuneError

    try:
        config = yaml.safe_load(open(path)) or {}
    except (OSError, yaml.YAMLError) as e:
        raise QwentuneError(f"cannot read the launch config: {e}", where=str(path), hint="see launch/*.yaml") from None
    ds = config.get("deepspeed_config") or {}
    kind = {"FSDP": "fsdp", "DEEPSPEED": f"zero{ds.get('zero_stage', 2)}"}.get(config.get("distributed_type"), "ddp")
    offload = tuple(o for o in ("optimizer", "param") if ds.get(f"offload_{o}_device", "none") != "none")
    return sharded(est, kind, processes or int(config.get("num_processes", 1)), offload)
