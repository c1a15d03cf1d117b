"""Speed levers that leave the loss and its gradients unchanged (each one tested for that in tests/test_speed.py)."""

from __future__ import annotations

_PATCHED = False


def score_only_trained_positions() -> None:
    """TRL's fused LM head projects only the positions whose label is trained — but only on CUDA/XPU ("compact");
    on CPU it projects every position through the 151,936-row head, although masked positions contribute exactly zero.
    Chat data trains ~25% of its tokens (prompts, tools blocks and tool results are masked), so on CPU this does 4× the
    head work for nothing. We let the compact path run on CPU too; the Triton kernel choice is untouched."""
    global _PATCHED
    if _PATCHED:
        return
    import trl.trainer.utils as trl_utils

    on_gpu = trl_utils._use_triton

    def compact(device) -> bool:
        return True if device.type == "cpu" else on_gpu(device)

    trl_utils._use_triton = compact
    _PATCHED = True
