"""The parity check after every merge: logits of the saved model versus base + adapter, both computed in fp32.

A 16-bit model is held in 16 bits and each module upcast only while it runs (`logits_of`). Tolerance:
`default_tolerance` (fp32: 1e-3; bf16/fp16: ``max(0.05, 0.02 * max|reference logit|)``)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import QwentuneError
from ..model import is_vl
from ..patches import release_host_memory
from .checkpoint import load_model, text_config
from .job import MODE_QLORA_DEQUANTIZED, MergeJob
from .shards import BaseCheckpoint, ShardReader

FP32_TOLERANCE = 1e-3
HALF_TOLERANCE_ABS = 0.05
HALF_TOLERANCE_REL = 0.02


def default_tolerance(save_dtype: torch.dtype, reference_scale: float) -> float:
    """The parity tolerance used when none is given (see the module docstring)."""
    if save_dtype == torch.float32:
        return FP32_TOLERANCE
    return max(HALF_TOLERANCE_ABS, HALF_TOLERANCE_REL * float(reference_scale))


HALF = (torch.bfloat16, torch.float16)


def choose_parity_rows(job: MergeJob, vocab_size: int, special_ids: list[int]) -> list[list[int]]:
    if job.parity_rows is not None:
        rows = job.parity_rows
        if not rows or not all(isinstance(r, (list, tuple)) and r for r in rows):
            raise QwentuneError("parity_input_ids must be a non-empty list of non-empty id lists")
        for row in rows:
            for i in row:
                if not isinstance(i, int) or not 0 <= i < vocab_size:
                    raise QwentuneError(
                        f"token id {i!r} outside the vocabulary (0..{vocab_size - 1})", where="parity_input_ids"
                    )
        return [list(r) for r in rows]
    gen = torch.Generator().manual_seed(1234)
    high = min(vocab_size, 151643)
    rows = [torch.randint(0, high, (8,), generator=gen).tolist() for _ in range(3)]
    specials = [i for i in (151644, 151645, 151643) if i < vocab_size]
    extra = [i for i in special_ids if 0 <= i < vocab_size][:12]
    last = (specials + extra + rows[0])[: max(8, len(specials) + len(extra))]
    rows.append(last)
    return rows


@torch.no_grad()
def logits_of(model: Any, rows: list[list[int]], image: dict | None = None) -> list[torch.Tensor]:
    """Logits for each row (then for the image row, if any), computed in fp32 even when the model is held in 16-bit
    (see `_fp32_compute`)."""
    if not rows:
        return []
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    # one batch, right-padded: a causal model's logits at the real positions do not see the padding after them
    ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    with _fp32_compute(model):
        logits = model(input_ids=ids).logits.float().cpu()
        out = [logits[i, : len(row)] for i, row in enumerate(rows)]
        if image is not None:
            out.append(model(**{k: v.to(device) for k, v in image.items()}).logits[0].float().cpu())
    return out


def parity_image_row(cfg: dict) -> dict | None:
    """Qwen2-VL: forward inputs of one row holding a synthetic image (fixed random patches on a 4x4 patch grid), so
    the parity check runs the vision tower and merger too (and any LoRA on them). None for text models, and for toy
    vocabularies that do not reach the image token ids."""
    if not is_vl(cfg):
        return None
    vision = cfg.get("vision_config") or {}
    text = text_config(cfg)
    vocab = int(text.get("vocab_size") or cfg.get("vocab_size") or 0)
    image_id = cfg.get("image_token_id", text.get("image_token_id", 151655))
    start = cfg.get("vision_start_token_id", text.get("vision_start_token_id", 151652))
    end = cfg.get("vision_end_token_id", text.get("vision_end_token_id", 151653))
    if max(image_id, start, end) >= vocab:
        return None
    merge = int(vision.get("spatial_merge_size", 2))
    channels = vision.get("in_channels", vision.get("in_chans", 3))  # in_chans: the published config.json's name
    patch_dim = channels * vision.get("temporal_patch_size", 2) * vision.get("patch_size", 14) ** 2
    grid = [1, 2 * merge, 2 * merge]
    patches = math.prod(grid)
    gen = torch.Generator().manual_seed(4321)
    pixel_values = torch.randn(patches, patch_dim, generator=gen)
    ids = torch.tensor([[11, 22, start] + [image_id] * (patches // merge**2) + [end, 33, 44, 55]])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor([grid]),
        "mm_token_type_ids": (ids == image_id).long(),  # 1 marks image tokens; drives the 3-D rotary positions
    }


def _upcast_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def up(v):
        return v.float() if torch.is_tensor(v) and v.dtype in HALF else v

    return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}


@contextlib.contextmanager
def _fp32_compute(model: Any) -> Iterator[None]:
    """Run a model held in bf16/fp16 exactly as its fp32 copy would, holding one module in fp32 at a time.

    Every module that owns half-precision parameters gets them swapped for fp32 copies for the duration of its
    forward (and its half inputs upcast); PEFT layers (which read their base weights directly) are swapped as a
    whole. Memory: the 16-bit model plus the largest module in fp32, instead of a full fp32 copy."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        peft_layers: tuple = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    except ImportError:  # pragma: no cover - peft is a dependency
        peft_layers = ()
    if not any(p.dtype in HALF for p in model.parameters()):
        yield
        return

    def pre(module, args, kwargs):
        saved = []
        params = module.parameters(recurse=isinstance(module, peft_layers))
        for p in dict.fromkeys(params):
            if p.dtype in HALF:
                saved.append((p, p.data))
                p.data = p.data.float()
        module._qwentune_fp32_saved = saved
        return _upcast_inputs(args, kwargs)

    def post(module, args, kwargs, output):
        for p, data in module._qwentune_fp32_saved:
            p.data = data
        module._qwentune_fp32_saved = []

    handles = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        whole = isinstance(module, peft_layers)
        if whole:
            inside.append(name)
        if any(p.dtype in HALF for p in module.parameters(recurse=whole)):
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def compare_logits(job: MergeJob, ref: list[torch.Tensor], got: list[torch.Tensor], save_dtype: torch.dtype) -> tuple:
    diff = _max_abs_diff(ref, got)
    scale = max(float(r.abs().max()) for r in ref)
    tol = job.tolerance if job.tolerance is not None else default_tolerance(save_dtype, scale)
    held = str(job.parity_dtype).removeprefix("torch.")
    print(
        f"[qwentune merge] parity ({job.mode}): max |logit diff| = {diff:.3g} over {len(ref)} rows "
        f"(tolerance {tol:.3g}, reference max |logit| {scale:.3g})"
    )
    job.report["parity"] = {
        "max_abs_diff": diff,
        "tolerance": tol,
        "reference_max_abs_logit": scale,
        "rows": len(ref),
        "image_rows": int(job.parity_image is not None),
        "compute_dtype": "float32",
        "weights_held_in": held,
    }
    if not math.isfinite(diff) or diff > tol:
        raise QwentuneError(
            f"merged model does not match base+adapter: max |logit diff| {diff:.4g} > tolerance {tol:.4g}",
            where="merge parity check",
            hint="nothing was written to the output directory; pass tolerance= only if the difference is expected",
        )
    return diff, tol


def parity_on_dir(job: MergeJob, tmp: Path, ref: list, rows: list, save_dtype: torch.dtype) -> tuple[float, float]:
    if not job.parity:
        print("[qwentune merge] parity check skipped (check_parity=False)")
        job.report["parity"] = "skipped"
        return float("nan"), float(job.tolerance if job.tolerance is not None else float("nan"))
    model = load_model(tmp, job.parity_dtype)
    got = logits_of(model, rows, job.parity_image)
    del model
    release_host_memory()  # glibc keeps freed pages: the next model would load beside them
    return compare_logits(job, ref, got, save_dtype)


def available_memory() -> int | None:
    """MemAvailable in bytes (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def parity_hold_dtype(job: MergeJob, save_dtype: torch.dtype) -> torch.dtype:
    """The dtype the parity check holds the models in. Their forward always computes in fp32 (`_fp32_compute`), so
    holding a bf16 model in bf16 gives the fp32 result at half the memory. Dequantized weights that a 16-bit dtype
    cannot hold exactly (quantized from fp32) need fp32."""
    if save_dtype not in HALF:
        return torch.float32
    if job.mode == MODE_QLORA_DEQUANTIZED and job.spec.weights_dtype != save_dtype:
        return torch.float32
    return save_dtype


def check_parity_memory(ckpt: BaseCheckpoint, hold: torch.dtype) -> None:
    """Refuse before merging when the parity check cannot load the model (it loads one model at a time)."""
    available = available_memory()
    if available is None:
        return
    params = 0
    for shard in ckpt.shards:
        with ShardReader(ckpt.root / shard) as reader:
            params += sum(math.prod(reader.shape(k)) for k in reader.keys())
    need = params * torch.empty((), dtype=hold).element_size() * 1.15 + (1 << 30)
    if need > available:
        raise QwentuneError(
            f"the parity check loads the model (~{need / 2**30:.1f} GiB) and only {available / 2**30:.1f} GiB are "
            "available",
            where="merge parity check",
            hint="pass check_parity=False (qwentune merge --no-parity) to merge without it, or free memory",
        )
