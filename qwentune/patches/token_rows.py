"""Trainable token rows that cost what they hold: the math.

PEFT's trainable tokens (`trainable_token_indices`) keep the trained rows as a small (rows × hidden) parameter holding
whole values, but run every forward through a full copy of the matrix with those rows written in
(`index_copy` of 151,936 × hidden, kept for backward), and TRL's fused LM head, reading that copy as
`lm_head.weight`, computes a full-vocabulary weight gradient for it. The same outputs and gradients come from the
frozen base matrix plus the rows, touched only where they matter:

* `embed_with_rows`: the base lookup, with the positions holding a trained id given its trained row;
* `logits_with_rows`: the base logits, with the trained ids' columns scored by the trained rows;
* `logprobs_with_rows`: TRL's fused head run on the frozen base matrix gives each position's target log-prob under
  the base rows; the trained rows change only k logits, so with `lse = base target logit − base log-prob` the new
  log-normaliser is `logsumexp(lse + log(1 − Σ_j exp(base_j − lse)), new_1, …, new_k)`. Exact (fp32 math),
  differentiable in the hidden states and the rows; nothing vocabulary-sized is built or kept. (Where the base rows
  hold all but ~1e-7 of a position's mass, the rest is rounded: not the case for the untrained rows this is for.)

patches.lean_token_rows installs these under PEFT's wrapper and TRL's fused head. The saved adapter is PEFT's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embed_with_rows(
    base_out: torch.Tensor, input_ids: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, scale=None
) -> torch.Tensor:
    """`base_out` (the base embedding of `input_ids`) with each position holding `indices[j]` set to `values[j]`
    (times the embedding's `scale`, for layers that scale their lookup)."""
    match = input_ids.unsqueeze(-1) == indices  # (..., k)
    flat = base_out.reshape(-1, base_out.shape[-1])
    hit = match.reshape(-1, indices.numel())
    positions = hit.any(-1).nonzero().squeeze(1)
    rows = values[hit[positions].to(torch.uint8).argmax(-1)]
    if scale is not None:
        rows = rows * scale
    return flat.index_copy(0, positions, rows.to(flat.dtype)).view_as(base_out)


def logits_with_rows(
    base_logits: torch.Tensor, hidden: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, bias=None
) -> torch.Tensor:
    """`base_logits` (the base head on `hidden`) with the columns `indices` scored by the rows `values`."""
    columns = F.linear(hidden, values.to(hidden.dtype), None if bias is None else bias[indices])
    return base_logits.index_copy(-1, indices, columns.to(base_logits.dtype))


def logprobs_with_rows(
    base_logprobs: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """Target log-probs under `weight` with rows `indices` replaced by `values`, from `base_logprobs` (the same
    under `weight`, e.g. TRL's fused head) with (N, k) and (N,) extra work. `scale` multiplies the logits
    (logit_scale / temperature)."""
    h = hidden.float()
    base = h @ weight[indices].detach().float().T  # (N, k)
    new = h @ values.float().T
    target = torch.linalg.vecdot(hidden, weight[targets].detach().to(hidden.dtype)).float()  # (N,)
    if bias is not None:
        extra = bias[indices].detach().float()
        base, new, target = base + extra, new + extra, target + bias[targets].detach().float()
    base, new, target = base * scale, new * scale, target * scale
    lse = (target - base_logprobs.float()).unsqueeze(1)  # the base log-normaliser of each position
    own = ((new - base) * (targets.unsqueeze(1) == indices)).sum(1)  # the target's own logit, where it is a row
    # the base mass outside the rows (≥ 0 exactly; clamp the rounding), then the rows' new logits, without overflow
    rest = torch.log1p(-torch.exp(base - lse).sum(1).clamp(max=1 - 1e-7)).unsqueeze(1)
    new_lse = torch.logsumexp(torch.cat([lse + rest, new], 1), 1)
    return (target + own - new_lse).to(base_logprobs.dtype)
