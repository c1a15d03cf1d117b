"""Which process this is (accelerate's view) and the one-line log every module writes to stderr, main process only.
A bottom-floor module: anything may import it."""

from __future__ import annotations

import sys


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def process_state():
    """accelerate's view of the processes. On a machine without CUDA it must be asked for CPU ranks (as Trainer asks
    later): the first call fixes it for the whole process, and without `cpu=True` ranks started by torchrun would
    each think they run alone."""
    from accelerate import PartialState

    return PartialState(cpu=not _cuda())


def is_main_process() -> bool:
    return process_state().is_main_process


def log(message: str) -> None:
    if is_main_process():
        print(f"[qwentune] {message}", file=sys.stderr, flush=True)
