"""Notebook-friendly output: the loss plot leaves the user's matplotlib backend alone and shows inline only under
IPython; the library noise quiet.py hides is exactly the messages it names, nothing else."""

from __future__ import annotations

import json
import logging
import warnings

import matplotlib

from qwentune.quiet import quiet_library_noise
from qwentune.training.metrics import plot_losses, show_in_notebook


def test_loss_plot_keeps_the_backend_and_shows_inline_only_under_ipython(tmp_path, capsys):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    rows = [{"step": s, "loss": 2.0 / s} for s in range(1, 5)] + [{"step": 4, "eval_loss": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        path = plot_losses(tmp_path)
        assert matplotlib.get_backend() == "svg"  # a notebook's inline backend survives a run
    finally:
        matplotlib.use(previous)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    show_in_notebook(path)  # no IPython here: nothing shown, nothing printed
    assert capsys.readouterr() == ("", "")
    InteractiveShell.instance()
    try:
        with capture_output() as shown:
            show_in_notebook(path)
    finally:
        InteractiveShell.clear_instance()
    assert len(shown.outputs) == 1 and "image/png" in shown.outputs[0].data


def test_quiet_hides_the_named_library_messages_only(caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_noise()
        quiet_library_noise()  # idempotent
        warnings.warn("`gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
        warnings.warn("`is_gradient_checkpointing` is deprecated in v6.", FutureWarning, stacklevel=1)
        warnings.warn("`something_else` is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["`something_else` is deprecated"]
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no module")
        logger.warning("a real bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes problem"]
    assert logger.filters.count(logger.filters[0]) == 1
    offline = logging.getLogger("kernels._internals.hf_hub")
    with caplog.at_level(logging.WARNING, logger=offline.name):
        caplog.clear()
        for repo in ("kernels-community/quantization-bitsandbytes", "someone/their-kernel"):
            offline.warning("Skipping publisher trust check for '%s' because Hugging Face Hub is offline.", repo)
    assert [r.getMessage() for r in caplog.records] == [
        "Skipping publisher trust check for 'someone/their-kernel' because Hugging Face Hub is offline."
    ]
