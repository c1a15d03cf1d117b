"""Several processes that each hold a slice of the model (FSDP2, DeepSpeed ZeRO-3): the adapter gathered whole before
it is saved, models loaded whole by the main process alone after training, and what cannot be sharded refused before
any process loads a model."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def without_zero3_init(trainer):
    """Models loaded inside load whole, as in a process without DeepSpeed. While the trainer's DeepSpeed ZeRO-3
    config is alive, transformers builds every model under `deepspeed.zero.Init` (it keeps the config in a global),
    whose parameter broadcasts are collectives: the merge, its parity check and the sample, run by the main process
    alone while the others wait at the end of the run, hung there. Inside, the global is unset (transformers'
    `unset_hf_deepspeed_config`), and set back to the trainer's config on exit. Elsewhere nothing is done."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled as zero3
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    if not zero3():
        yield
        return
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if getattr(plugin, "hf_ds_config", None) is not None:
            set_hf_deepspeed_config(plugin.hf_ds_config)


@contextlib.contextmanager
def whole_trainables(trainer):
    """The trainable parameters whole for the adapter save (every process enters: the gathers are collectives).
    ZeRO-3 (PEFT saved the main process's empty slices): whole inside (`GatheredParameters`), yields None. FSDP2 (PEFT
    cannot write DTensors): yields {name: whole tensor} of the trainable ones, never the frozen base. Else None."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if getattr(trainer, "is_fsdp_enabled", False):
        from ..logs import log

        whole = {
            name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
            for name, p in trainer.model.named_parameters()
            if p.requires_grad
        }
        log(f"FSDP: the adapter's {len(whole)} tensors gathered whole from {trainer.accelerator.num_processes} ranks")
        yield whole
        return
    if not (getattr(trainer, "is_deepspeed_enabled", False) and is_deepspeed_zero3_enabled()):
        yield None
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for p in trainer.model.parameters() if p.requires_grad]):
        yield None


def check_4bit_after_wrapping(trainer) -> None:
    """QLoRA under FSDP2, once wrapped (train begin): each bitsandbytes 4-bit layer on each process must hold packed
    rows (one column of the storage dtype) and a quant_state of the whole (out, in) matrix (the weight's, or the
    layer's copy bitsandbytes restores it from after FSDP re-created the parameter). Raises where one has not."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return
    from transformers import TrainerCallback

    from ..errors import QwentuneError
    from ..logs import log

    class Check(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            layers = [m for m in model.modules() if type(m).__module__.startswith("bitsandbytes.nn")]  # not PEFT's
            lost = [layer for layer in layers if not _packed_4bit(layer)]
            if lost:
                raise QwentuneError(
                    f"{len(lost)} of {len(layers)} 4-bit layers lost their 4-bit weights or quantization state when "
                    "FSDP wrapped the model",
                    where="peft.method: qlora",
                    hint="train QLoRA with DDP (launch/ddp.yaml) or LoRA under FSDP",
                )
            if layers:
                log(f"FSDP: all {len(layers)} 4-bit layers kept packed 4-bit weights and quant_state (every rank)")

    trainer.add_callback(Check())


def _packed_4bit(layer) -> bool:
    local = layer.weight.to_local() if hasattr(layer.weight, "to_local") else layer.weight
    quant = getattr(layer.weight, "quant_state", None) or getattr(layer, "quant_state", None)
    whole = (layer.out_features, layer.in_features)
    return quant is not None and local.shape[1:] == (1,) and tuple(quant.shape) == whole


def refuse_unshardable(recipe) -> None:
    """What a sharded launch cannot train, refused on every process before a model loads (found on 2 CPU ranks)."""
    from ..errors import QwentuneError
    from ..patches import fsdp_requested

    if fsdp_requested() and recipe.peft.train_new_tokens == "auto":
        raise QwentuneError(
            "trainable token rows cannot be sharded by FSDP here (accelerate's FSDP2 wrap fails on the embedding "
            "PEFT gives them: 'model.embed_tokens.weight is neither a parameter, buffer, nor extra state')",
            where="peft.train_new_tokens: auto (the default) under an FSDP launch",
            hint="set peft.train_new_tokens=off, or train token rows with launch/ddp.yaml or deepspeed_zero*.yaml",
        )
