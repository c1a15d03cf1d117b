"""Weighted mixing of data.train entries: exact quotas, not sampled shares.

After each entry's bad rows are dropped and its own limit applied (and an eval_fraction split off per entry), entry
i contributes exactly round(w_i / Σw × N) rows, rounded by largest remainder so the quotas sum to N; N is
data.mix_rows, else the largest N whose quotas repeat no row. Each entry's rows are drawn without replacement with
the data seed (its own stream, so one entry's draw does not move when another entry changes); a quota above an
entry's rows takes every row as often as it fits, then draws the rest, and the report counts the repeats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import QwentuneError


def quotas(weights: Sequence[float], total: int) -> list[int]:
    """`total` rows shared by weight, largest remainder (ties to the earlier entry): the quotas sum to `total`."""
    shares = np.asarray(weights, dtype=np.float64) / float(np.sum(weights)) * total
    base = np.floor(shares).astype(np.int64)
    left = total - int(base.sum())
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - base[i]), i))
    for i in order[:left]:
        base[i] += 1
    return [int(q) for q in base]


def largest_total(weights: Sequence[float], sizes: Sequence[int]) -> int:
    """The largest N whose quotas take no entry past its rows (no row repeated). Rounding makes "fits" not monotonic
    in N, so the search runs down from the first N at which some entry's share, rounded down, is past its rows (no
    larger N can fit)."""
    total_weight = float(np.sum(weights))
    n = min(math.ceil((size + 1) * total_weight / w) for w, size in zip(weights, sizes))
    while n > 0 and any(q > size for q, size in zip(quotas(weights, n), sizes)):
        n -= 1
    return n


def draw(size: int, quota: int, seed: int, entry: int) -> np.ndarray:
    """Which of an entry's `size` rows (0-based, in file order) fill its `quota`: every row as often as the quota
    holds it whole, the rest drawn without replacement; seeded by (seed, entry). Returned in draw order."""
    rng = np.random.default_rng([seed, entry])
    whole, rest = divmod(quota, size)
    picks = [rng.permutation(size) for _ in range(whole)]
    picks.append(rng.choice(size, size=rest, replace=False))
    return np.concatenate(picks).astype(np.int64) if picks else np.zeros(0, dtype=np.int64)


def mix(
    kept_by_entry: Sequence[np.ndarray],
    weights: Sequence[float],
    mix_rows: int | None,
    seed: int,
    labels: Sequence[str],
) -> tuple[list[np.ndarray], int]:
    """For each entry, the kept rows (positions, in file order) drawn into the mix, and the mix's size."""
    sizes = [len(k) for k in kept_by_entry]
    for label, size in zip(labels, sizes):
        if size == 0:
            raise QwentuneError(
                f"{label} has no rows left to mix (every row was skipped)",
                where=label,
                hint="fix its rows (see the data report above), or remove the entry",
            )
    total = mix_rows if mix_rows is not None else largest_total(weights, sizes)
    if total < len(sizes):
        raise QwentuneError(
            f"the weights leave {total} rows for {len(sizes)} entries",
            where="data.mix_rows",
            hint="set data.mix_rows to at least the number of entries, or make the weights less uneven",
        )
    drawn = [
        kept[draw(len(kept), q, seed, i)] for i, (kept, q) in enumerate(zip(kept_by_entry, quotas(weights, total)))
    ]
    return drawn, total


__all__ = ["draw", "largest_total", "mix", "quotas"]
