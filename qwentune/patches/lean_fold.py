"""The lean CPU fold of TRL's fused LM head: the same math as TRL's torch fold, with less memory traffic.

TRL (1.16) computes SFT and DPO per-token log-probabilities through a fused LM head (`add_fused_lm_head`): the
`(tokens, vocabulary)` logits are never materialized; the head is projected in tiles folded into an online
log-sum-exp, and the backward recomputes each tile. On CUDA the fold is a Triton kernel. On CPU it is torch code that
makes about a dozen full-tile temporaries per tile; with TRL's `4096 × 32768` fp32 tiles (512 MiB each) every
temporary is a fresh zero-filled mmap. The two folds below work in place on narrower tiles (`CPU_VOCAB_CHUNK`
columns). `qwentune.patches.lean_cpu_fold` installs them around a training run; tests/test_speed_head.py holds them
equal to TRL's fold and to full logits.
"""

from __future__ import annotations

import math

# Vocabulary columns per tile on CPU: a 4096-token tile is then 32 MiB in fp32, inside the range glibc serves from its
# heap instead of a fresh mmap per allocation (measured in benchmarks/train_throughput.py; see README "Performance").
CPU_VOCAB_CHUNK = 2048


def lean_forward_fold(
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


def lean_backward_fold(tile, targets, log_z, entropy, grad_logprobs, grad_entropy, vocab_start, n_cols, flags) -> None:
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
