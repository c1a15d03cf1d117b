"""Speed levers that leave the loss and its gradients unchanged (each one tested for that in tests/test_speed*.py).

Both SFT and DPO in TRL 1.16 already compute per-token log-probabilities through a fused LM head
(`trl.trainer.utils.add_fused_lm_head`): the `(tokens, 151,936)` logits are never materialized, the head is projected
in `[TOKEN_CHUNK_SIZE, chunk_size]` tiles folded into an online log-sum-exp, and the backward recomputes each tile.
On CUDA the fold is a Triton kernel. On CPU it is torch code (`_forward_tile`/`_backward_tile`) that makes about a
dozen full-tile temporaries per tile, and the tiles are `4096 × 32768` fp32 (512 MiB each): every temporary is a fresh
mmap that the kernel zero-fills, so the head spends more time in page faults and elementwise passes than in its matrix
products, and its peak memory is several such tiles. The levers below fix that on CPU only.
"""

from __future__ import annotations

import math

_PATCHED = False
_LEAN_PATCHED = False

# Vocabulary columns per tile on CPU: a 4096-token tile is then 32 MiB in fp32, inside the range glibc serves from its
# heap instead of a fresh mmap per allocation (measured in benchmarks/train_throughput.py; see README "Performance").
CPU_VOCAB_CHUNK = 2048


def score_only_trained_positions() -> None:
    """TRL's fused LM head projects only the positions whose label is trained — but only on CUDA/XPU ("compact");
    on CPU it projects every position through the 151,936-row head, although masked positions contribute exactly zero.
    Chat data trains ~25% of its tokens (prompts, tools blocks and tool results are masked), so on CPU this does 4× the
    head work for nothing. We let the compact path run on CPU too; the Triton kernel choice is untouched.

    Also applies `lean_cpu_head` (narrow tiles and in-place tile math on CPU)."""
    global _PATCHED
    lean_cpu_head()
    if _PATCHED:
        return
    import trl.trainer.utils as trl_utils

    on_gpu = trl_utils._use_triton

    def compact(device) -> bool:
        return True if device.type == "cpu" else on_gpu(device)

    trl_utils._use_triton = compact
    _PATCHED = True


def lean_cpu_head() -> None:
    """On CPU, TRL's fused LM head with narrow vocabulary tiles (`CPU_VOCAB_CHUNK` columns) and a fold that works in
    place: the same online log-sum-exp, the same gradient formula, the tile still rounded to the compute dtype before
    the gradient matrix products. The CUDA/Triton path is untouched (the torch fold only runs where Triton does not,
    and the tile width changes only for CPU tensors)."""
    global _LEAN_PATCHED
    if _LEAN_PATCHED:
        return
    try:  # TRL internals: where a TRL release renames them, its own (slower) CPU path runs unchanged
        import trl.kernels.chunked_logprob as chunked
        import trl.trainer.utils as trl_utils

        original_forward, original_backward = chunked._forward_tile, chunked._backward_tile
        function = trl_utils._ChunkedLogProbFunction
    except (ImportError, AttributeError):
        _LEAN_PATCHED = True
        return

    def unscaled(flags: dict) -> bool:
        return not flags["HAS_SOFTCAP"] and flags["logit_scale"] == 1.0 and flags["inv_t"] == 1.0

    # TRL calls the folds with the tensors and column range positionally and the flags as keywords.
    def forward_tile(*args, **flags):
        if not unscaled(flags):  # softcapped or scaled logits (not Qwen): TRL's own fold
            return original_forward(*args, **flags)
        tile, _, targets, *stats, vocab_start, n_cols = args
        _lean_forward_fold(tile, targets, *stats, vocab_start, n_cols, flags)

    def backward_tile(*args, **flags):
        if not unscaled(flags):
            return original_backward(*args, **flags)
        tile, _, targets, log_z, entropy, grad_logprobs, grad_entropy, vocab_start, n_cols = args
        _lean_backward_fold(tile, targets, log_z, entropy, grad_logprobs, grad_entropy, vocab_start, n_cols, flags)

    class NarrowTilesOnCPU:
        """TRL's ChunkedLogProbFunction, called with `CPU_VOCAB_CHUNK` vocabulary columns for CPU tensors."""

        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, *args):
            if hidden.device.type == "cpu":
                chunk_size = min(chunk_size, CPU_VOCAB_CHUNK)
            return function.apply(hidden, weight, bias, targets, temperature, chunk_size, *args)

    chunked._forward_tile, chunked._backward_tile = forward_tile, backward_tile
    trl_utils._ChunkedLogProbFunction = NarrowTilesOnCPU
    _LEAN_PATCHED = True


def _lean_forward_fold(
    tile, targets, running_max, sum_exp, x_sum_exp, sq_sum_exp, z_sum, max_before_target, target_logit, vocab_start,
    n_cols, flags,
) -> None:  # fmt: skip
    """TRL's `_forward_tile` for unscaled logits (no softcap, temperature 1): fold one `[n, n_cols]` tile of logits
    into the running statistics. The tile is scratch (TRL overwrites it with the next product), so it is shifted in
    place; one fp32 temporary (the exponentials) instead of TRL's dozen."""
    import torch

    has_entropy, has_log_sum_sq = flags["HAS_ENTROPY"], flags["HAS_LOG_SUM_SQ_PROBS"]
    has_mean, has_top1 = flags["HAS_MEAN_LOGITS"], flags["HAS_IS_TOP1"]
    z = tile if tile.dtype == torch.float32 else tile.float()
    local = targets - vocab_start
    in_tile = (local >= 0) & (local < n_cols)
    target_z = z.gather(-1, local.clamp(0, n_cols - 1).unsqueeze(-1)).squeeze(-1)
    chunk_max = z.amax(-1)
    if has_mean:
        z_sum += z.sum(-1)
    if has_top1:
        # The largest logit before the target's column: the whole tile when the target comes later, nothing when it
        # came earlier, the row's prefix when it lies in this tile (first maximum wins, as with argmax).
        before = torch.where(local >= n_cols, chunk_max, torch.full_like(chunk_max, -math.inf))
        rows = in_tile.nonzero().squeeze(-1)
        if rows.numel():
            prefix = z[rows]
            prefix.masked_fill_(torch.arange(n_cols, device=z.device) >= local[rows].unsqueeze(-1), -math.inf)
            before[rows] = prefix.amax(-1)
        torch.maximum(max_before_target, before, out=max_before_target)
    new_m = torch.maximum(running_max, chunk_max)
    rescale = torch.exp(running_max - new_m)
    shifted = z.sub_(new_m.unsqueeze(-1))  # z - m, in place
    e = torch.exp(shifted)
    e_sum = e.sum(-1)
    if has_entropy:  # Σ e·z = Σ e·(z - m) + m·Σ e
        x_sum_exp.mul_(rescale).add_(torch.einsum("ij,ij->i", e, shifted) + new_m * e_sum)
    if has_log_sum_sq:
        sq_sum_exp.mul_(rescale * rescale).add_(torch.einsum("ij,ij->i", e, e))
    sum_exp.mul_(rescale).add_(e_sum)
    running_max.copy_(new_m)
    target_logit.copy_(torch.where(in_tile, target_z, target_logit))


def _lean_backward_fold(
    tile, targets, log_z, entropy, grad_logprobs, grad_entropy, vocab_start, n_cols, flags
) -> None:
    """TRL's `_backward_tile` for unscaled logits: overwrite the tile with d(loss)/d(logits),
    g_lp·(1[target] − p) − g_ent·p·(log p + H), computed in fp32 in place and rounded into the tile once."""
    import torch

    has_logprob_grad, has_entropy_grad = flags["HAS_LOGPROB_GRAD"], flags["HAS_ENTROPY_GRAD"]
    work = tile if tile.dtype == torch.float32 else tile.float()
    work.sub_(log_z.unsqueeze(-1))  # log p
    if has_entropy_grad:
        p = torch.exp(work)
        work.add_(entropy.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1))
        if has_logprob_grad:
            work.add_(grad_logprobs.unsqueeze(-1))
        work.mul_(p).neg_()
    elif has_logprob_grad:
        work.exp_().mul_(-grad_logprobs.unsqueeze(-1))
    else:
        work.zero_()
    if has_logprob_grad:
        local = targets - vocab_start
        rows = ((local >= 0) & (local < n_cols)).nonzero().squeeze(-1)
        work[rows, local[rows]] += grad_logprobs[rows]
    if work is not tile:
        tile.copy_(work)
