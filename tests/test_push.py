"""`qwentune push` as a user runs it: the dry-run plan, refusals (no token, bad dir, bad repo id), and a real upload
through huggingface_hub to a stand-in for the Hub on 127.0.0.1 (the endpoints create_repo / upload_folder call:
repos/create, validate-yaml, preupload, commit), checked file by file."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from fake_runs import make_run_dir

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_standinSECRETtoken0123456789"


class StandInHub(BaseHTTPRequestHandler):
    """Just enough of the Hub's API for create_repo + upload_folder (every file answered as a regular upload)."""

    received: dict  # set per server

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        got = self.server.received  # type: ignore[attr-defined]
        got["auth"].add(self.headers.get("Authorization"))
        base = f"http://127.0.0.1:{self.server.server_port}"
        if self.path == "/api/repos/create":
            request = json.loads(body)
            got["created"].append(request)
            return self._reply(200, {"url": f"{base}/{request['organization']}/{request['name']}"})
        if self.path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            front = content.split("---\n")[1]
            meta = yaml.safe_load(front)
            ok = isinstance(meta, dict) and isinstance(meta.get("tags"), list)
            return self._reply(200 if ok else 400, {"errors": [] if ok else [{"message": "bad front matter"}]})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})  # fmt: skip
        if "/commit/" in self.path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    got["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            repo = self.path.removeprefix("/api/models/").split("/commit/")[0]
            got["commits"].append(repo)
            return self._reply(200, {"commitUrl": f"{base}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        got["unknown"].append(self.path)
        return self._reply(404, {"error": f"stand-in hub: no {self.path}"})

    def do_GET(self):  # noqa: N802
        self.server.received["unknown"].append("GET " + self.path)  # type: ignore[attr-defined]
        self._reply(404, {"error": "not here"})


@pytest.fixture
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    server.received = {"auth": set(), "created": [], "files": {}, "commits": [], "unknown": []}  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def qwentune(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run(
        [sys.executable, "-m", "qwentune", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
    )


def no_token_env(tmp_path: Path) -> dict:
    return {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}


def test_dry_run_lists_exactly_the_files_and_the_card(tmp_path):
    run = make_run_dir(tmp_path)
    done = qwentune("push", str(run), "me/tiny", "--dry-run", env=no_token_env(tmp_path))
    assert done.returncode == 0, done.stderr
    merged = sorted(p.name for p in (run / "merged").iterdir() if p.is_file())
    listed = [line.split()[0] for line in done.stdout.split("\n\n")[0].splitlines()[1:]]
    assert listed == sorted({*merged, "README.md"})
    assert "model.safetensors" in done.stdout and "README.md" in done.stdout and "(card)" in done.stdout
    assert "merge_report.json" in done.stdout and "(paths replaced by names)" in done.stdout
    card = done.stdout.split("README.md (model card):\n", 1)[1]
    assert card.startswith("---\n") and "## Data" in card
    assert str(tmp_path) not in card
    assert "uploading" not in done.stderr
    again = qwentune("push", str(run / "merged"), "me/tiny", "--dry-run", env=no_token_env(tmp_path))
    assert again.stdout == done.stdout.replace(f"from {run / 'merged'}", f"from {(run / 'merged').resolve()}")


def test_push_refuses_without_token_bad_dir_and_bad_repo_id(tmp_path):
    run = make_run_dir(tmp_path, merged=False)
    for args, what in (
        (["push", str(tmp_path / "runs"), "me/tiny"], "not a run dir"),
        (["push", str(run), "me/tiny"], "no merged/"),
        (["push", str(run), "not a repo"], "not a Hub repo id"),
        (["push", str(run), "me/tiny", "--adapter-only"], "no Hugging Face token"),
    ):
        done = qwentune(*args, env=no_token_env(tmp_path))
        assert done.returncode == 2 and what in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_push_uploads_the_files_and_card_to_the_hub_and_never_shows_the_token(tmp_path, hub):
    run = make_run_dir(tmp_path)
    env = {
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_TOKEN": SECRET,
        "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}",
    }
    done = qwentune("push", str(run), "me/tiny", "--private", env=env)
    assert done.returncode == 0, done.stderr + str(hub.received["unknown"])
    got = hub.received
    assert got["created"] == [{"name": "tiny", "organization": "me", "visibility": "private"}]
    assert got["auth"] == {f"Bearer {SECRET}"} and got["commits"] == ["me/tiny"]
    for path in (run / "merged").iterdir():
        if path.name not in ("README.md", "merge_report.json"):
            assert got["files"][path.name] == path.read_bytes(), path.name
    report = json.loads(got["files"]["merge_report.json"])
    assert report["base"] == (run.parents[1] / "models" / "tiny-qwen2.5-0.5b-instruct").name
    assert report["adapter"] == "adapter"
    card = got["files"]["README.md"].decode()
    assert "library_name: transformers" in card and str(tmp_path) not in card
    for blob in got["files"].values():
        assert str(tmp_path).encode() not in blob
    assert SECRET not in done.stdout + done.stderr
    for path in run.rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes()


def test_adapter_only_dry_run_names_the_base_not_a_path(tmp_path):
    run = make_run_dir(tmp_path, source="Qwen/Qwen2.5-0.5B-Instruct")
    done = qwentune("push", str(run), "me/tiny-adapter", "--adapter-only", "--dry-run", env=no_token_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "adapter_model.safetensors" in done.stdout and "\n  config.json " not in done.stdout
    assert "adapter_config.json" in done.stdout and "qwentune_train.json" in done.stdout
    card = done.stdout.split("README.md (model card):\n", 1)[1]
    assert "base_model: Qwen/Qwen2.5-0.5B-Instruct" in card and "library_name: peft" in card


def test_staged_json_has_no_machine_paths(tmp_path):
    from qwentune.serve.hub import _stage

    run = make_run_dir(tmp_path, source="Qwen/Qwen2.5-0.5B-Instruct")
    staging = tmp_path / "staging"
    staging.mkdir()
    files = {f.path: f for f in _stage(run / "adapter", "card", staging, "Qwen/Qwen2.5-0.5B-Instruct")}
    config = json.loads((staging / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    sidecar = json.loads((staging / "qwentune_train.json").read_text())
    assert "base_path" not in sidecar and sidecar["chat_template"]
    assert files["adapter_model.safetensors"].size == (run / "adapter" / "adapter_model.safetensors").stat().st_size
    assert (staging / "adapter_model.safetensors").read_bytes() == (
        run / "adapter/adapter_model.safetensors"
    ).read_bytes()


def test_train_with_push_to_hub_and_no_token_stops_before_training(tmp_path):
    from tiny_models import tiny_model_dir

    model = tiny_model_dir(tmp_path)
    recipe = ROOT / "recipes/qwen2.5-0.5b-instruct/sft_lora.yaml"
    out = tmp_path / "run"
    done = qwentune(
        "train", str(recipe), f"model.source={model}", f"output.dir={out}", "output.push_to_hub=me/tiny",
        env=no_token_env(tmp_path),
    )  # fmt: skip
    assert done.returncode == 2 and "no Hugging Face token" in done.stderr, done.stderr
    assert not (out / "adapter").exists() and not (out / "recipe.yaml").exists()


@pytest.mark.slow
def test_train_with_push_to_hub_merges_writes_the_card_and_pushes(tmp_path, hub):
    from tiny_models import tiny_model_dir, tiny_training

    model = tiny_model_dir(tmp_path)
    recipe = {
        "model": {"source": str(model)},
        "data": {"train": [str(ROOT / "data/instructions.jsonl")], "limit": 4, "max_length": 128},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "training": tiny_training(max_steps=1),
        "output": {"dir": str(tmp_path / "run"), "push_to_hub": "me/tiny-run", "sample_tokens": 0},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_TOKEN": SECRET,
        "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}",
    }
    done = qwentune("train", str(path), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = tmp_path / "run" / "merged"
    card = (merged / "README.md").read_text()
    assert card == hub.received["files"]["README.md"].decode()
    assert str(tmp_path) not in card and "local model `tiny-qwen2.5-0.5b-instruct`" in card
    assert hub.received["files"]["model.safetensors"] == (merged / "model.safetensors").read_bytes()
    assert SECRET not in done.stdout + done.stderr
