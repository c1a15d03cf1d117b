"""Every reach into a library's internals (TRL, PEFT, transformers' GGUF loader), in one place; the checking and
scoping machinery is `machinery.py`.

Each patch is a context manager that installs what it needs around one trainer's life and puts back exactly what was
there on exit (normal or raised). Each names the library release it was written for and checks, on entry, that the
internal it needs is still there with the same signature and is still read where the patch expects; when not, it
raises `LibraryChanged` naming the internal and both versions. The exceptions are speed only: where TRL's CPU fold
changed, `lean_cpu_fold` leaves TRL's own (slower, equal) CPU path running, and where transformers' GGUF loader
changed, `one_gguf_read` leaves its reads as they are; each says so once.

sft.py and dpo.py each enter one block: `with trl_for_sft(model):` / `with trl_for_dpo(model) as DPOTrainer:`;
grpo.py's block, `trl_for_grpo`, is in `grpo.py` beside this module (this one is at the module size limit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

from ..errors import QwentuneError
from .lean_fold import CPU_VOCAB_CHUNK, lean_backward_fold, lean_forward_fold
from .machinery import (
    LibraryChanged,  # noqa: F401 - what these patches raise, caught by their callers
    _changed,
    _mark,
    _ours,
    _problem,
    _replaced,
    _say_once,
    _version,
)

TRL = "1.16"  # the TRL release the TRL patches below were written for
PEFT = "0.21"  # the PEFT release peft_output_bias was written for

# TRL 1.16's signatures of the internals we replace or override ("..." ends a prefix: more may follow).
USE_TRITON = ("device",)
FORWARD_TILE = (
    "tile", "tile_stride", "targets", "running_max", "sum_exp", "x_sum_exp", "sq_sum_exp", "z_sum",
    "max_before_target", "target_logit", "vocab_start", "n_cols", "logit_scale", "softcap", "inv_t", "HAS_SOFTCAP",
    "HAS_ENTROPY", "HAS_LOG_SUM_SQ_PROBS", "HAS_MEAN_LOGITS", "HAS_IS_TOP1", "BLOCK_SIZE",
)  # fmt: skip
BACKWARD_TILE = (
    "tile", "tile_stride", "targets", "log_z", "entropy", "grad_logprobs", "grad_entropy", "vocab_start", "n_cols",
    "logit_scale", "softcap", "inv_t", "HAS_SOFTCAP", "HAS_LOGPROB_GRAD", "HAS_ENTROPY_GRAD", "BLOCK_SIZE",
)  # fmt: skip
CHUNKED_FORWARD = ("ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size", ...)
LAYER_FIELDS = (
    "token_indices", "trainable_tokens_delta", "base_layer", "disable_adapters", "merged", "active_adapters",
)  # fmt: skip
PREPARE_DATASET = ("self", "dataset", "processing_class", "args", "dataset_name")
PRECOMPUTE_REF_LOGPS = ("self", "dataset", "name", "batch_size")
# The loss types TRL 1.16's DPOConfig documents; used when the installed TRL's help text yields none.
TRL_DPO_LOSSES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip


# --- TRL's fused LM head on CPU (speed only: loss and gradients unchanged, tests/test_speed*.py) ---------------------


@contextlib.contextmanager
def compact_head_on_cpu():
    """TRL's fused LM head projects only the positions whose label is trained ("compact"), but only on CUDA/XPU; on
    CPU it projects every position through the 151,936-row head, although masked positions contribute exactly zero
    (chat data trains ~25% of its tokens). Lets the compact path run on CPU too. Written for TRL 1.16:
    `trl.trainer.utils._use_triton(device)`, read by `add_fused_lm_head` on every call. The Triton kernel choice is
    untouched (TRL's kernel reads its own `trl.kernels.chunked_logprob._use_triton`)."""
    import trl.trainer.utils as trl_utils

    problem = _problem(trl_utils, "_use_triton", USE_TRITON, read_by=(trl_utils, "add_fused_lm_head"))
    if problem:
        raise _changed("trl", TRL, problem)
    on_gpu = trl_utils._use_triton
    if _ours(on_gpu):  # already installed by an enclosing block
        yield
        return

    @_mark
    def compact(device) -> bool:
        return True if device.type == "cpu" else on_gpu(device)

    with _replaced(trl_utils, "_use_triton", compact):
        yield


@contextlib.contextmanager
def lean_cpu_fold():
    """On CPU, TRL's fused LM head folds CPU_VOCAB_CHUNK-column tiles with lean_fold's in-place folds: the same online
    log-sum-exp and gradient, the tile still rounded to the compute dtype before the gradient products. Softcapped or
    scaled logits (not Qwen) keep TRL's own fold; the CUDA/Triton path is untouched (TRL's torch fold only runs where
    Triton does not, and the tile width changes only for CPU tensors). Written for TRL 1.16:
    `trl.kernels.chunked_logprob._forward_tile/_backward_tile` (tensors and column range positional, flags as
    keywords) and `trl.trainer.utils._ChunkedLogProbFunction`. Speed only: where they changed, TRL's own CPU fold runs
    and this says so once."""
    try:
        import trl.kernels.chunked_logprob as chunked
        import trl.trainer.utils as trl_utils
    except ImportError as error:
        problems = [str(error)]
    else:
        function = getattr(trl_utils, "_ChunkedLogProbFunction", None)
        if _ours(function):  # already installed by an enclosing block
            yield
            return
        problems = [
            _problem(trl_utils, "_ChunkedLogProbFunction", read_by=(trl_utils, "add_fused_lm_head")),
            _problem(chunked, "_forward_tile", FORWARD_TILE, read_by=(chunked.ChunkedLogProbFunction, "forward")),
            _problem(chunked, "_backward_tile", BACKWARD_TILE, read_by=(chunked.ChunkedLogProbFunction, "backward")),
        ]
        if function is not None:
            problems.append(_problem(function, "forward", CHUNKED_FORWARD))
        problems = [p for p in problems if p]
    if problems:
        _say_once(
            f"TRL {_version('trl')}: {'; '.join(problems)} (qwentune's lean CPU fold was written for TRL {TRL}); "
            "TRL's own CPU fold runs instead (slower, same loss)"
        )
        yield
        return

    original_forward, original_backward = chunked._forward_tile, chunked._backward_tile

    def unscaled(flags: dict) -> bool:
        return not flags["HAS_SOFTCAP"] and flags["logit_scale"] == 1.0 and flags["inv_t"] == 1.0

    def forward_tile(*args, **flags):
        if not unscaled(flags):  # softcapped or scaled logits: TRL's own fold
            return original_forward(*args, **flags)
        tile, _, targets, *stats, vocab_start, n_cols = args
        lean_forward_fold(tile, targets, *stats, vocab_start, n_cols, flags)

    def backward_tile(*args, **flags):
        if not unscaled(flags):
            return original_backward(*args, **flags)
        tile, _, targets, log_z, entropy, grad_logprobs, grad_entropy, vocab_start, n_cols = args
        lean_backward_fold(tile, targets, log_z, entropy, grad_logprobs, grad_entropy, vocab_start, n_cols, flags)

    @_mark
    class NarrowTilesOnCPU:
        """TRL's ChunkedLogProbFunction, called with `CPU_VOCAB_CHUNK` vocabulary columns for CPU tensors."""

        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, *args):
            if hidden.device.type == "cpu":
                chunk_size = min(chunk_size, CPU_VOCAB_CHUNK)
            return function.apply(hidden, weight, bias, targets, temperature, chunk_size, *args)

    with (
        _replaced(chunked, "_forward_tile", forward_tile),
        _replaced(chunked, "_backward_tile", backward_tile),
        _replaced(trl_utils, "_ChunkedLogProbFunction", NarrowTilesOnCPU),
    ):
        yield


# --- PEFT's trainable-token wrapper under TRL's fused LM head --------------------------------------------------------


@contextlib.contextmanager
def peft_output_bias(peft_model):
    """TRL's fused LM head reads `lm_head.weight` and `lm_head.bias`. PEFT's trainable-token wrapper
    (`TrainableTokensWrapper`, on an output layer with trainable token rows) forwards only `weight` (base + trained
    rows) and raises AttributeError for `bias` on the first training step. Gives the wrapper instance its base layer's
    bias (None for Qwen) as a plain attribute, removed on exit: its `weight` is already the trained one, and a bias
    is never a trainable-token row. Written for PEFT 0.21 (`peft.utils.other.TrainableTokensWrapper`,
    `.token_adapter.base_layer`); where the wrapper answers `bias` itself, nothing is done."""
    try:
        from peft.utils.other import TrainableTokensWrapper
    except ImportError:
        raise _changed("peft", PEFT, "peft.utils.other.TrainableTokensWrapper is missing") from None
    head = peft_model.get_output_embeddings()
    if not isinstance(head, TrainableTokensWrapper):
        yield
        return
    if hasattr(head, "bias"):  # the wrapper answers `bias` itself: nothing to patch
        yield
        return
    base = getattr(getattr(head, "token_adapter", None), "base_layer", None)
    if base is None:
        raise _changed("peft", PEFT, "TrainableTokensWrapper.token_adapter.base_layer is missing")
    # object.__setattr__: nn.Module's would register a tensor bias as the wrapper's own parameter (saved twice).
    object.__setattr__(head, "bias", getattr(base, "bias", None))
    try:
        yield
    finally:
        head.__dict__.pop("bias", None)


@contextlib.contextmanager
def lean_token_rows(peft_model):
    """PEFT's trainable token rows without the full-vocabulary copy (token_rows.py has the math and why). Per
    `TrainableTokensLayer` instance of `peft_model`, `forward_adapters` runs the base layer and sets the trained rows'
    positions (embedding) or columns (head); the output wrapper answers `weight`/`bias` with its base layer's (TRL's
    fused head reads them), and TRL's `_ChunkedLogProbFunction` moves the log-probs scored on that base weight by the
    trained rows (`log_probs` and its gradient exact; the metrics-only `entropy`/`is_top1`/`mean_logits` stay those
    of the base rows). Disabled, merged or absent adapters take PEFT's own path. Written for PEFT 0.21
    (`TrainableTokensLayer.forward_adapters(x, active_adapters)`, `.token_indices`, `.trainable_tokens_delta`,
    `.base_layer`) and TRL 1.16 (`_ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature,
    chunk_size, softcap, logit_scale, outputs)`, read by `add_fused_lm_head`); all restored on exit."""
    import torch

    from .token_rows import embed_with_rows, logits_with_rows, logprobs_with_rows

    try:
        from peft.tuners.trainable_tokens import TrainableTokensLayer
        from peft.utils.other import TrainableTokensWrapper
    except ImportError as error:
        raise _changed("peft", PEFT, str(error)) from None
    layers = [m for m in peft_model.modules() if isinstance(m, TrainableTokensLayer)]
    if not layers or any("forward_adapters" in layer.__dict__ for layer in layers):  # none, or already installed
        yield
        return
    import trl.trainer.utils as trl_utils

    problems = [
        _problem(TrainableTokensLayer, "forward_adapters", ("self", "x", "active_adapters", ...)),
        _problem(trl_utils, "_ChunkedLogProbFunction", read_by=(trl_utils, "add_fused_lm_head")),
        *(f"TrainableTokensLayer.{n} is missing" for n in LAYER_FIELDS if not hasattr(layers[0], n)),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise _changed("peft/trl", f"{PEFT}/{TRL}", "; ".join(problems))

    def active_rows(layer):
        """(indices, values) of the layer's active, unmerged trainable rows; None where PEFT's path is right."""
        active = [a for a in layer.active_adapters if a in layer.trainable_tokens_delta]
        if layer.disable_adapters or layer.merged or not active or len(active) != len(layer.active_adapters):
            return None
        values = [layer.trainable_tokens_delta[a] for a in active]
        indices = [i for a in active for i in layer.token_indices[a]]
        return torch.tensor(indices, device=values[0].device), torch.cat(values) if len(values) > 1 else values[0]

    def lean(layer):
        peft_forward = layer.forward_adapters

        def forward_adapters(x, active_adapters, *args, **kwargs):
            rows = active_rows(layer) if list(active_adapters) == list(layer.active_adapters) else None
            base = layer.base_layer
            if rows is None or args or kwargs or not isinstance(base, (torch.nn.Embedding, torch.nn.Linear)):
                return peft_forward(x, active_adapters, *args, **kwargs)
            if isinstance(base, torch.nn.Embedding):
                scale = layer._get_embed_scale() if hasattr(layer, "_get_embed_scale") else None
                return embed_with_rows(base(x), x, *rows, scale=scale)
            return logits_with_rows(base(x), x, *rows, bias=base.bias)

        return forward_adapters

    head = peft_model.get_output_embeddings()
    head_layer = head.token_adapter if isinstance(head, TrainableTokensWrapper) else None
    head_base = head_layer.base_layer if head_layer is not None else None
    fused = trl_utils._ChunkedLogProbFunction

    @_mark
    class WithTokenRows:
        """TRL's chunked log-prob function; on the head's base weight, moved by its trained rows."""

        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0, *rest):
            results = fused.apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, *rest)
            rows = active_rows(head_layer) if head_base is not None and weight is head_base.weight else None
            if rows is None:
                return results
            if softcap is not None:
                raise QwentuneError("trainable token rows under a softcapped LM head are not supported", where="model")
            moved = logprobs_with_rows(results[0], hidden, weight, bias, targets, *rows, logit_scale / temperature)
            return (moved, *results[1:])

    for layer in layers:
        layer.__dict__["forward_adapters"] = lean(layer)
    if head_base is not None:  # object.__setattr__: nn.Module's would register them as the wrapper's own
        object.__setattr__(head, "weight", head_base.weight)
        object.__setattr__(head, "bias", getattr(head_base, "bias", None))
    try:
        with _replaced(trl_utils, "_ChunkedLogProbFunction", WithTokenRows):
            yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward_adapters", None)
        if head_base is not None:
            head.__dict__.pop("weight", None)
            head.__dict__.pop("bias", None)


# --- TRL's DPOTrainer on our exact ids -------------------------------------------------------------------------------


def pretokenized_dpo_trainer():
    """TRL's DPOTrainer on our exact ids, with the reference settled before TRL first uses it. TRL 1.16 has no public
    switch to skip its DPO dataset preparation (only vision datasets skip it), so the subclass overrides
    `_prepare_dataset` and hooks `_precompute_ref_logps`; a subclass changes nothing outside its own instances.
    Written for TRL 1.16: both are checked to exist with their 1.16 signatures and to be called by `__init__`."""
    from trl import DPOTrainer

    for name, params in (("_prepare_dataset", PREPARE_DATASET), ("_precompute_ref_logps", PRECOMPUTE_REF_LOGPS)):
        problem = _problem(DPOTrainer, name, params, read_by=(DPOTrainer, "__init__"))
        if problem:
            raise _changed("trl", TRL, problem)

    class PretokenizedDPOTrainer(DPOTrainer):
        def __init__(self, *args, continuing: bool, **kwargs):
            self._continuing = continuing
            self._reference_settled = False
            super().__init__(*args, **kwargs)
            self._settle_reference()

        # TRL re-renders and re-tokenizes text pairs and adds a trained "\n" after <|im_end|>; ours are already exact.
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            self._settle_reference()  # TRL precomputes inside its __init__, right after it made its "ref" copy
            return super()._precompute_ref_logps(dataset, name, batch_size)

        def _settle_reference(self) -> None:
            if not self._reference_settled:
                self._reference_settled = True
                settle_reference_adapter(self, continuing=self._continuing, where="dpo reference")

    return PretokenizedDPOTrainer


def settle_reference_adapter(trainer, *, continuing: bool, where: str) -> None:
    """The one place where TRL's reference adapter is fixed up (DPOTrainer, and GRPOTrainer with beta > 0).

    Given a PeftModel and no ref_model, TRL 1.16 adds an adapter "ref" and copies every parameter whose name
    contains ".default." into it; the reference forward then runs with "ref" active.
    - Fresh adapter: the copy is zero-initialised LoRA (B = 0) and trainable-token rows equal to the base rows, i.e.
      exactly the base, which the policy with its adapter disabled already is. We delete it: the reference is the
      adapter-disabled model, with no copy kept.
    - Continued adapter: PEFT trainable tokens are named `…trainable_tokens_delta.default` (no trailing dot), so TRL
      leaves "ref" with the *base* token rows and the reference would be neither the base nor the adapter it
      continues. We copy every "default" tensor into "ref", frozen."""
    from peft import PeftModel

    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.ref_model is not None or not isinstance(model, PeftModel) or "ref" not in model.peft_config:
        return
    if not continuing:
        model.delete_adapter("ref")
        model.set_adapter("default")
        return
    named = dict(model.named_parameters())
    for name, param in named.items():
        parts = name.split(".")
        if "default" not in parts:
            continue
        parts[parts.index("default")] = "ref"
        ref = named.get(".".join(parts))
        if ref is None:
            raise QwentuneError(
                f"TRL's reference adapter has no copy of {name}",
                where=where,
                hint="set dpo.reference to the merged model of the adapter you continue"
                if where.startswith("dpo")
                else "set grpo.beta: 0 (no reference), or merge the adapter and train a new one on the merged model",
            )
        ref.data = param.data.detach().clone()
        ref.requires_grad_(False)


def trl_dpo_loss_types() -> tuple[str, ...]:
    """The loss types the installed TRL's DPOConfig documents. TRL 1.16 keeps no public list: they are read from the
    help text of `DPOConfig.loss_type` (each written `'name'` in backticks). Where that yields none, TRL 1.16's list,
    said once."""
    try:
        from trl import DPOConfig

        help_text = {f.name: f for f in dataclasses.fields(DPOConfig)}["loss_type"].metadata.get("help", "")
        found = tuple(dict.fromkeys(re.findall(r"`'([a-z0-9_]+)'`", help_text)))
        if found:
            return found
    except (ImportError, KeyError):
        pass
    _say_once(
        f"TRL {_version('trl')}: DPOConfig's loss_type help names no loss types; checking dpo.loss_type against "
        f"TRL {TRL}'s list"
    )
    return TRL_DPO_LOSSES


# --- PEFT's LoRA input cast under CPU autocast (memory only) ------------------------------------------------------


@contextlib.contextmanager
def lora_input_cast_off(peft_model, active: bool = True):
    """Under bf16/fp16 autocast, no copy of each adapter's input in the adapter's fp32. PEFT's LoRA layers cast their
    input to the adapter weights' dtype unless `torch.is_autocast_enabled()`, which asks about CUDA only: on CPU
    every adapter input is copied to fp32, and autocast copies it back to bf16 for the matmul and keeps that copy for
    backward (0.6 GiB on the 0.5B Quickstart). Autocast already runs the adapters in the compute dtype, so each LoRA
    layer's `cast_input_dtype_enabled` is off inside the block (a no-op on CUDA); `active=False` (fp32, no autocast)
    leaves the casts. PEFT 0.21's public `peft.helpers.disable_input_dtype_casting` sets the same flag but raises on a
    model with trainable token rows (`TrainableTokensLayer` has no such flag). Written for PEFT 0.21."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)] if active else []
    if layers and not hasattr(layers[0], "cast_input_dtype_enabled"):
        raise _changed("peft", PEFT, "LoraLayer.cast_input_dtype_enabled is missing")
    before = [(layer, layer.cast_input_dtype_enabled) for layer in layers]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer, value in before:
            layer.cast_input_dtype_enabled = value


# --- transformers' GGUF loader (speed only) -------------------------------------------------------------------------

TRANSFORMERS_GGUF = "5.24"  # the transformers release one_gguf_read was written for


@contextlib.contextmanager
def one_gguf_read():
    """transformers parses a GGUF file's metadata again for the config, the tokenizer and the weights (3-4 reads in
    one export check, ~14 s each for Qwen's 151,936-token vocabulary and merges). Within this block every
    `gguf.GGUFReader(path)` of the same unchanged file (same inode, size and mtime: a rename, as the atomic save
    does after its check, keeps it) returns the one reader made first (read-only memory maps, so sharing it is
    safe); put back on exit. Written for transformers 5.24, whose `load_gguf_checkpoint` imports
    `GGUFReader` from `gguf` when called; where it no longer does, the reads are left as they are (said once)."""
    import os

    import gguf
    from transformers import modeling_gguf_pytorch_utils as loader

    problem = _problem(gguf, "GGUFReader", read_by=(loader, "load_gguf_checkpoint"))
    if problem:
        _say_once(f"{_changed('transformers', TRANSFORMERS_GGUF, problem).message}: GGUF files are read as usual")
        yield
        return
    if _ours(gguf.GGUFReader):
        yield
        return
    reader_class, readers = gguf.GGUFReader, {}

    @_mark
    def shared_reader(path, mode="r"):
        if mode != "r":  # a writable map is never shared (and its file may not exist yet)
            return reader_class(path, mode)
        stat = os.stat(path)
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    with _replaced(gguf, "GGUFReader", shared_reader):
        yield


# --- one block per trainer -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def trl_for_sft(peft_model):
    """Everything SFTTrainer needs patched: construct, evaluate and train the trainer inside this block."""
    with compact_head_on_cpu(), lean_cpu_fold(), lean_token_rows(peft_model):
        yield


@contextlib.contextmanager
def trl_for_dpo(peft_model):
    """Everything DPOTrainer needs patched; yields the DPOTrainer class to construct (`pretokenized_dpo_trainer`).
    Construct, evaluate and train the trainer inside this block."""
    trainer_class = pretokenized_dpo_trainer()
    with compact_head_on_cpu(), lean_cpu_fold(), lean_token_rows(peft_model):
        yield trainer_class
