"""The one place library noise is hidden: warnings and log lines from the libraries qwentune drives that say nothing a
user can act on (they are about how qwentune calls the library, already handled). Installed once by the API entry
points (`qwentune.setup` / `train`) and by every `qwentune` command; each filter is narrow (one message) and says why
it is safe to hide."""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    """Drops the log records whose message contains one of `fragments`."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


_KERNELS_COMMUNITY = _DropMessages("from kernels-community")
_KERNELS_OFFLINE = _DropMessages("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'")


def quiet_library_noise() -> None:
    """Install the filters below. Idempotent: `warnings` drops an identical filter before adding it again, and a
    logger holds the same filter object once."""
    # bitsandbytes 0.50 on CPU looks for an optional optimized 4-bit kernel on the hub (kernels-community) and logs
    # that it could not load it; the built-in CPU path it then uses is the one qwentune's QLoRA tests run on.
    # Logged once when bitsandbytes imports its CPU backend: the filter is on that logger, set before the import.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KERNELS_COMMUNITY)
    # With HF_HUB_OFFLINE=1, `kernels` (a transformers 5.25 dependency, 0.19) logs that it skips the publisher check
    # of that same repo on this lookup: the repo is bitsandbytes' choice, not the user's, and the lookup then fails
    # over to the same built-in path. Only that repo's message is hidden.
    logging.getLogger("kernels._internals.hf_hub").addFilter(_KERNELS_OFFLINE)
    # transformers 5 renamed gradient checkpointing to activation checkpointing. TRL's configs still set the old
    # field (qwentune sets it False and enables checkpointing itself, before PEFT wraps the model), and TRL/PEFT read
    # the old `model.is_gradient_checkpointing`; both aliases work until transformers 6 — nothing for a user to change.
    warnings.filterwarnings("ignore", r"`gradient_checkpointing` is deprecated", FutureWarning)
    warnings.filterwarnings("ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning)
    # TRL 1.16's `disable_gradient_checkpointing` (around DPO's forwards without gradients) calls the old method
    # names; same aliases, same reason.
    warnings.filterwarnings("ignore", r"`gradient_checkpointing_(enable|disable)` is deprecated", FutureWarning)
    # tqdm.auto in a notebook without ipywidgets falls back to plain-text bars (which render fine) and warns that
    # the widget is missing; the bars still show progress, and installing ipywidgets is the user's choice.
    warnings.filterwarnings("ignore", r"IProgress not found")


__all__ = ["quiet_library_noise"]
