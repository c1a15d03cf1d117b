"""Host RAM of each phase of `qwentune train`, from the model's shape alone (`qwentune estimate` prints it beside
the per-process training figure). Phases run one after another in one process and each lets go of the previous one
(patches.release_trainer after the adapter is saved, release_host_memory between models), so the run's peak is the
largest phase, not their sum.

RSS counts the pages of a checkpoint memory-mapped while transformers reads it (file-backed, given back to the page
cache when the load ends): the load lines count the file once. The constants are measured on this project's 2-core
CPU machines (2026-12-07); on a GPU machine the CUDA runtime's host share is an assumption (see CUDA_HOST)."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3
PROCESS = 0.5 * GiB  # python + torch, transformers, peft, trl, bitsandbytes, datasets imported: 0.47 GiB RSS measured
CUDA_HOST = 1.5 * GiB  # assumed: the CUDA runtime's libraries and pinned staging buffers in host RAM (not measured)
SHARD_CAP = 5 * GiB  # transformers saves shards of at most 5 GB: a GPU load maps one at a time


@dataclass
class HostPhase:
    name: str
    bytes: float
    formula: str


def host_phases(
    *,
    params: int,
    checkpoint_bytes: int,
    trained_weights: float,
    train_tensors: float,
    device: str,
    largest_matrix: int,
    merge: bool = True,
    evaluate: bool = True,
) -> list[HostPhase]:
    """Host RAM per phase (one process). `params`: the model's parameters; `checkpoint_bytes`: bytes per parameter
    as stored (fp32 4, bf16 2); `trained_weights`: the model as held for training (the estimate's weight line);
    `train_tensors`: the estimate's total (what training holds on `device`); `largest_matrix`: parameters of the
    largest single weight (the vocabulary matrix), upcast to fp32 while it runs in the parity check."""
    checkpoint = params * checkpoint_bytes
    gib = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
    on_gpu = device != "cpu"
    phases = []
    if on_gpu:
        shard = min(checkpoint, SHARD_CAP)
        phases.append(HostPhase("load", PROCESS + CUDA_HOST + shard,
                                f"process {gib(PROCESS)} + CUDA runtime {gib(CUDA_HOST)} + one checkpoint shard "
                                f"mapped while its tensors go to the GPU ({gib(shard)})"))  # fmt: skip
        phases.append(HostPhase("train", PROCESS + CUDA_HOST, "process + CUDA runtime: the tensors are on the GPU"))
    else:
        phases.append(HostPhase("load", PROCESS + checkpoint + trained_weights,
                                f"process {gib(PROCESS)} + the checkpoint mapped while read ({params / 1e6:.0f}M × "
                                f"{checkpoint_bytes} B) + the model as trained ({gib(trained_weights)})"))  # fmt: skip
        tensors = f"process + the training estimate's tensors ({gib(train_tensors)}, worst case)"
        phases.append(HostPhase("train", PROCESS + train_tensors, tensors))
    if merge:
        # The parity check holds one model at a time: base + adapter for the reference, then the merged one, in the
        # checkpoint's dtype (QLoRA: the dtype the 4-bit weights were made from); 16-bit weights run one module at a
        # time in fp32 (the largest, the vocabulary matrix, bounds that); the merged file is mapped while it loads.
        upcast = largest_matrix * 4 if checkpoint_bytes < 4 else 0
        what = (
            f"process + one model held in the checkpoint's dtype ({gib(checkpoint)}) + the merged file mapped while "
            f"it loads ({gib(checkpoint)})" + (f" + the vocabulary matrix in fp32 ({gib(upcast)})" if upcast else "")
        )
        phases.append(HostPhase("merge + parity", PROCESS + 2 * checkpoint + upcast, what))
    if evaluate:
        if on_gpu:
            shard = min(checkpoint, SHARD_CAP)
            what = "process + CUDA runtime + one shard mapped while it goes to the GPU"
            phases.append(HostPhase("eval", PROCESS + CUDA_HOST + shard, what))
        else:
            held = params * 4  # CPU inference holds fp32 (serve.inference.default_dtype)
            phases.append(HostPhase("eval", PROCESS + held + checkpoint,
                                    f"process + one model in fp32 ({gib(held)}; base, then tuned) + its file mapped "
                                    f"while it loads ({gib(checkpoint)})"))  # fmt: skip
    return phases


def render_host(phases: list[HostPhase], first_use: float | None = None) -> str:
    gib = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
    width = max(len(p.name) for p in phases) + 2
    out = ["", "host RAM per phase (one process; each phase lets go of the one before):"]
    for p in phases:
        out.append(f"  {p.name:<{width}}{gib(p.bytes):>10}")
        out.append(f"      {p.formula}")
    peak = max(phases, key=lambda p: p.bytes)
    out.append(f"= {'run peak':<{width}}{gib(peak.bytes):>10}  ({peak.name})")
    if first_use is not None:
        out.append(f"  (first use of an offline/GGUF source converts it once: ~{gib(first_use)})")
    return "\n".join(out)
