"""Outputs are readable under the user's umask: every file and dir that `train`, `merge`, `export --gguf`,
`preprocess` and `eval --output` write is 0644 / 0755 under umask 022 (0640 / 0750 under 027), although tempfile and
safetensors (>= 0.8 saves through a temporary file) make 0600 files. One tiny training run, shared by the module."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from cli_in_process import run_main
from tiny_models import ROOT, tiny_model_dir, tiny_training

from qwentune import files
from qwentune.training import steps

EVAL_DATA = ROOT / "data" / "tool_calls_eval.jsonl"


def modes(root: Path) -> dict[str, int]:
    """{path relative to root's parent: permission bits} of `root` and everything under it (links not followed)."""
    root = Path(root)
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *sorted(root.rglob("*"))]}


def assert_modes(root: Path, umask: int = 0o022) -> dict[str, int]:
    """`root` and every dir under it are 0777 & ~umask, every file 0666 & ~umask; nothing else (no links, no temp
    files or staging dirs left behind). Returns the modes found."""
    found = modes(root)
    wrong = {}
    for name, mode in found.items():
        path = root.parent / name
        want = None if path.is_symlink() else (0o777 if path.is_dir() else 0o666) & ~umask
        if mode != want or ".tmp" in path.name:
            wrong[name] = f"{oct(mode)}, want {oct(want) if want is not None else 'no link'}"
    assert not wrong, wrong
    return found


@pytest.fixture
def umask():
    """`umask(MASK)` sets the process umask for the test; the previous one is restored after it."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


class Trained(NamedTuple):
    tmp: Path
    recipe: Path
    run_dir: Path
    refused: list[tuple[int, str]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """`qwentune train` under umask 022: 2 steps, a checkpoint after each, merged. While it holds the run dir (just
    before it saves the adapter), a second `qwentune train` into the same dir is started, and refused."""
    tmp = tmp_path_factory.mktemp("permissions")
    run_dir = tmp / "run"
    recipe = tmp / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"source": str(tiny_model_dir(tmp))},
                "data": {"train": [str(ROOT / "data/instructions.jsonl")], "limit": 4, "max_length": 128},
                "peft": {"method": "lora", "r": 4, "alpha": 8, "train_new_tokens": "off"},
                "training": tiny_training(max_steps=2, save_steps=1),
                "output": {"dir": str(run_dir), "merge": True, "sample_tokens": 0},
            }
        )
    )
    refused: list[tuple[int, str]] = []
    save_adapter = steps.save_adapter

    def second_train_then_save(*args, **kwargs):
        refused.append(run_main(["train", str(recipe)]))
        return save_adapter(*args, **kwargs)

    previous = os.umask(0o022)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(steps, "save_adapter", second_train_then_save)
            code, stderr = run_main(["train", str(recipe)])
    finally:
        os.umask(previous)
    assert code == 0, stderr[-3000:]
    return Trained(tmp, recipe, run_dir, refused)


def test_train_outputs_after_a_refused_second_train(trained):
    assert len(trained.refused) == 1
    code, stderr = trained.refused[0]
    assert code == 2 and f"run dir is in use by process {os.getpid()}" in stderr, stderr
    # The run dir's lock file (.qwentune.lock) is walked too: filelock creates it per umask as well.
    found = assert_modes(trained.run_dir)
    weights = [
        "run/adapter/adapter_model.safetensors",
        "run/checkpoints/checkpoint-1/adapter_model.safetensors",
        "run/checkpoints/checkpoint-2/adapter_model.safetensors",
        "run/merged/model.safetensors",
    ]
    assert {name: oct(found.get(name, 0)) for name in weights} == dict.fromkeys(weights, "0o644")
    assert "run/metrics.json" in found and "run/merged/README.md" in found


def test_merge(trained, tmp_path, umask):
    umask(0o022)
    argv = ["merge", str(trained.run_dir / "adapter"), "--output", str(tmp_path / "m" / "out")]
    code, stderr = run_main([*argv, "--no-parity"])  # the parity check writes no file (train's merge runs it)
    assert code == 0, stderr[-3000:]
    found = assert_modes(tmp_path / "m")
    assert "m/out/model.safetensors" in found and "m/out/merge_report.json" in found


def test_in_memory_merge(trained, tmp_path, umask):
    """streaming=False saves with transformers' save_pretrained, whose safetensors file comes out 0600."""
    import qwentune

    umask(0o027)
    qwentune.merge(trained.run_dir / "adapter", tmp_path / "m" / "out", streaming=False, check_parity=False)
    assert "m/out/model.safetensors" in assert_modes(tmp_path / "m", 0o027)


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_export_gguf(trained, tmp_path, umask, mask, monkeypatch):
    pytest.importorskip("gguf")
    import qwentune.serve.gguf_verify as verify

    # Loading the GGUF back (~20 s) checks its content, which test_gguf_export.py covers: the modes are the point here.
    checks = {"parity": {"max_abs_diff": 0.0, "tolerance": 0.05}, "greedy": {"agreement": 1.0, "source": []},
              "tokenizer": {}}  # fmt: skip
    monkeypatch.setattr(verify, "verify_gguf", lambda *args, **kwargs: checks)
    umask(mask)
    out = tmp_path / "g" / "model.gguf"
    code, stderr = run_main(["export", str(trained.run_dir / "merged"), "--gguf", str(out), "--ollama"])
    assert code == 0, stderr[-3000:]
    found = assert_modes(tmp_path / "g", mask)
    assert sorted(found) == ["g", "g/Modelfile", "g/export_report.json", "g/model.gguf"]


def test_preprocess(trained, tmp_path, umask):
    umask(0o022)
    out = tmp_path / "p" / "rows.jsonl"
    code, stderr = run_main(["preprocess", str(trained.recipe), "--output", str(out), "--limit", "2"])
    assert code == 0, stderr[-3000:]
    assert sorted(assert_modes(tmp_path / "p")) == ["p", "p/rows.jsonl"]


def test_eval_output(trained, tmp_path, umask):
    umask(0o022)
    argv = ["eval", str(trained.run_dir / "merged"), "--data", str(EVAL_DATA), "--limit", "2"]
    code, stderr = run_main([*argv, "--max-new-tokens", "4", "--output", str(tmp_path / "e" / "out")])
    assert code == 0, stderr[-3000:]
    assert sorted(assert_modes(tmp_path / "e")) == ["e", "e/out", "e/out/eval.json", "e/out/eval.md"]


def test_public_tree_follows_the_umask_and_leaves_links_alone(tmp_path, umask):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True, mode=0o700)
    for path in (tree / "a.bin", tree / "sub" / "b.json"):
        path.write_text("x")
        path.chmod(0o600)
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    outside.chmod(0o600)
    (tree / "link").symlink_to(outside)
    for mask, file_mode, dir_mode in [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750), (0o077, 0o600, 0o700)]:
        umask(mask)
        files.public_tree(tree)
        assert {p: stat.S_IMODE((tmp_path / p).stat().st_mode) for p in ("tree", "tree/sub")} == {
            "tree": dir_mode,
            "tree/sub": dir_mode,
        }
        assert stat.S_IMODE((tree / "a.bin").stat().st_mode) == file_mode
        assert stat.S_IMODE((tree / "sub" / "b.json").stat().st_mode) == file_mode
        assert stat.S_IMODE(outside.stat().st_mode) == 0o600  # the link's target is not ours


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_umask_is_read_without_setting_it(umask, monkeypatch):
    """os.umask can only be read by setting it: another thread's file created meanwhile would get the wrong mode."""
    umask(0o027)

    def no_set(mask):
        raise AssertionError("os.umask called: racy in a multi-threaded process")

    monkeypatch.setattr(files.os, "umask", no_set)
    assert files._umask() == 0o027
