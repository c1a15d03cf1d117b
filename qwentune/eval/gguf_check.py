"""`qwentune export --check-data FILE`: the written GGUF scored where it will run — llama.cpp's own server, asked
through the OpenAI API as an agent would (its `--jinja` mode returns Qwen's tool calls as `tool_calls`) — next to
the model it was exported from, loaded here, on the same rows with the same scoring. The result goes into the
export's export_report.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import read_json_file
from ..files import atomic_write_json
from .evaluation import evaluate


def score_gguf(gguf: str | Path, source: str | Path, data: list[str | Path], *, limit: int | None = None,
               max_new_tokens: int = 256, progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """{"data", "limit", "metrics": {"source": …, "llama.cpp": …}, "table"}; the server is stopped afterwards."""
    from ..serve import free_port, plan_server, start_server

    plan = plan_server(Path(gguf), backend="llama.cpp", port=free_port(), extra_args=["--ctx-size", "4096"])
    with start_server(plan, wait=300.0, log=Path(gguf).with_suffix(".llama-server.log")) as server:
        labels = ["source", "llama.cpp"]
        result = evaluate([str(source), server.url], [str(d) for d in data], limit=limit, labels=labels,
                          max_new_tokens=max_new_tokens, progress=progress)  # fmt: skip
    return {"data": [str(d) for d in data], "limit": limit, "server": plan.command_line(), "metrics": result.metrics,
            "table": result.markdown(), "notes": result.notes}  # fmt: skip


def add_to_report(report_path: Path, check: dict[str, Any]) -> None:
    """Put the check into export_report.json (rewritten atomically)."""
    report = read_json_file(report_path, hint="export the GGUF again")
    report["check_data"] = check
    atomic_write_json(report_path, report)
