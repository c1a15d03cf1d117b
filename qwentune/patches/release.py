"""Letting go of memory between the phases of a run (issue 26.6): once the adapter is saved, the trainer's model,
optimizer and their states are dropped, so the merge, the sample and the eval that follow start from what a fresh
process would hold instead of keeping training's ~6 GB (the 0.5B Quickstart on CPU) alive under them.

`release_trainer` reaches into a Trainer's attributes (transformers 5.25: `model`, `model_wrapped`, `optimizer`,
`lr_scheduler`, `deepspeed`, the `callback_handler`'s copies of them; TRL 1.16: `ref_model`; accelerate 1.16:
`Accelerator.free_memory` for its own lists and the DeepSpeed engine): tests/test_release.py fails when a release
leaves the model reachable. `release_host_memory` is glibc's `malloc_trim`: freed heap pages below the mmap threshold
stay in the process otherwise (CPython and torch's CPU allocator both allocate through malloc)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from typing import Any

WRITTEN_FOR = {"transformers": "5.25", "trl": "1.16", "accelerate": "1.16"}
TRAINER_HOLDS = ("model", "model_wrapped", "optimizer", "lr_scheduler", "deepspeed", "ref_model")
HANDLER_HOLDS = ("model", "optimizer", "lr_scheduler", "train_dataloader", "eval_dataloader")


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_host_memory() -> None:
    """Collect garbage, empty torch's CUDA cache when there is one, and give freed heap pages back to the OS."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def heap_trimmer():
    """A TrainerCallback that gives freed heap pages back after every optimizer step and evaluation. On CPU a step's
    activations (GBs, in tensors of many sizes) are malloc'd and freed each step; glibc keeps what was freed, so RSS
    climbed step after step (the 0.5B Quickstart: 4.9 GB at its first step, 8.4 GB at step 19) though each step
    holds the same. `malloc_trim` costs milliseconds."""
    from transformers import TrainerCallback

    class HeapTrim(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            trim = _malloc_trim()
            if trim is not None:
                trim(0)

        on_evaluate = on_step_end

    return HeapTrim()


def release_trainer(trainer: Any) -> None:
    """Drop everything training needed and nothing after it does: the model (and its wrapped form), the optimizer
    and scheduler with their states, the reference model, the accelerator's references and DeepSpeed's engine. The
    trainer object stays (its accelerator still synchronises the processes and its args still describe the run);
    `trainer.model` is None afterwards."""
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None:
        accelerator.free_memory()
    for name in TRAINER_HOLDS:
        if getattr(trainer, name, None) is not None:
            setattr(trainer, name, None)
    handler = getattr(trainer, "callback_handler", None)
    for name in HANDLER_HOLDS:
        if getattr(handler, name, None) is not None:
            setattr(handler, name, None)
    release_host_memory()
