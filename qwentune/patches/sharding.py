"""FSDP on CPU processes: accelerate 1.16 picks FSDP only for accelerator process groups, so `accelerate launch` with
an FSDP config on CPU ranks (gloo) silently trained plain DDP. Written for accelerate 1.16, checked on entry like every
patch in `internals.py`."""

from __future__ import annotations

import contextlib
import os

from .machinery import _changed, _problem, _replaced

ACCELERATE = "1.16"  # the accelerate release fsdp_on_cpu was written for
STATE_INIT = ("self", "mixed_precision", "cpu", "dynamo_plugin", "deepspeed_plugin", "fsdp_plugin", ...)


def fsdp_requested() -> bool:
    """`accelerate launch` with an FSDP config (its environment for the ranks)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


@contextlib.contextmanager
def fsdp_on_cpu():
    """Inside, an AcceleratorState built for CPU ranks (MULTI_CPU, gloo) with an FSDP plugin is made an FSDP state, as
    accelerate makes it for GPU ranks: the Trainer then wraps the model with FSDP2's `fully_shard`, which runs on CPU
    over gloo. Elsewhere (GPU ranks, one process, no FSDP config) nothing is done. Puts back what was there on exit."""
    import torch
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if not fsdp_requested() or torch.cuda.is_available():
        yield
        return
    problem = _problem(AcceleratorState, "__init__", STATE_INIT)
    if problem:
        raise _changed("accelerate", ACCELERATE, problem)
    original = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    with _replaced(AcceleratorState, "__init__", init):
        yield
