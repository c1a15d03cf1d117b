"""A run's metrics: every log line appended to run_dir/metrics.jsonl, read back, and drawn as loss.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..errors import QwentuneError
from ..logs import log


class MetricsFile(TrainerCallback):
    """Every log line (train and eval) appended to run_dir/metrics.jsonl by the main process."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl. A torn last line (the process died mid-append) is dropped with a note; a bad line
    before it is an error naming file:line (that file was not written by a dying MetricsFile alone)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif number - 1 == last:
            log(f"{path}:{number}: dropped a torn last line (the run was killed while writing it): {line[:60]!r}")
        else:
            raise QwentuneError(
                "not a JSON object: metrics.jsonl is corrupt before its last line",
                where=f"{path}:{number}",
                hint="fix or delete that line (every line is one log row: step, loss, ...), then run again",
            )
    return rows


def plot_losses(run_dir: Path) -> Path | None:
    """loss.png: training loss per step, eval loss where measured; for GRPO a second panel with the mean reward, each
    reward's mean and the share of groups with zero reward variance. Drawn on a bare Figure, not pyplot: the
    notebook's (or script's) matplotlib backend is left as it was."""
    from matplotlib.figure import Figure

    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and _finite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and _finite(r["eval_loss"])]
    if not train and not evals:
        return None
    rewards = _reward_curves(rows)
    fig = Figure(figsize=(7, 7 if rewards else 4))
    ax, *below = fig.subplots(2, 1, sharex=True) if rewards else [fig.subplots()]
    if below:
        for label, points in rewards.items():
            below[0].plot(*zip(*points), "--" if label.startswith("zero") else "-", label=label)
        below[0].set_ylabel("reward")
        below[0].grid(alpha=0.3)
        below[0].legend(fontsize="small")
        below[0].set_xlabel("optimizer step")
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=100)
    return path


def show_in_notebook(path: Path | None) -> None:
    """Under IPython (a notebook cell), show the image inline; elsewhere (a script, the CLI) do nothing."""
    if path is None:
        return
    try:
        from IPython import get_ipython
    except ImportError:
        return
    if get_ipython() is None:
        return
    from IPython.display import Image, display

    display(Image(filename=str(path)))


def _reward_curves(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """GRPO's logged rewards by step: the weighted total, each reward's mean, the zero-variance share of groups."""
    if not any("reward" in r for r in rows):
        return {}
    names = {"reward": "reward (weighted sum)", "frac_reward_zero_std": "zero-variance groups (share)"}
    names |= {k: k.split("/")[1] for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")}
    curves = {
        shown: [(r["step"], r[k]) for r in rows if "step" in r and _finite(r.get(k))] for k, shown in names.items()
    }
    return {shown: points for shown, points in curves.items() if points}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


__all__ = ["MetricsFile", "plot_losses", "read_metrics", "show_in_notebook"]
