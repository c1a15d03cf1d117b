"""The run dir: where it is, what it records (resolved recipe, library versions, git revision), atomic file writes."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .errors import QwentuneError
from .recipe import Recipe, dump_recipe

LIBRARIES = (
    "qwentune",
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "tokenizers",
)


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision(start: Path | None = None) -> str | None:
    """The git revision of the code that ran (qwentune's checkout), with '-dirty' when it had local changes."""
    where = start or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


def run_dir_for(recipe: Recipe) -> Path:
    """`output.dir` with {model}, {method}, {peft} filled in."""
    model = _slug(Path(recipe.model.source.split(":")[-1]).name)
    return Path(recipe.output.dir.format(model=model, method=recipe.method, peft=recipe.peft.method)).expanduser()


def prepare_run_dir(recipe: Recipe, *, is_main: bool = True) -> Path:
    """Create the run dir and record what is about to run. Refuses to mix two runs in one dir."""
    run_dir = run_dir_for(recipe)
    if is_main:
        if (run_dir / "adapter").exists() and not recipe.output.overwrite:
            raise QwentuneError(
                "run dir already holds a finished run",
                where=str(run_dir),
                hint="pick another output.dir, or set output.overwrite=true",
            )
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
        except OSError as e:
            raise QwentuneError(
                f"cannot write the run dir: {e.strerror or e}",
                where=f"output.dir {run_dir}",
                hint="pick a writable dir",
            ) from None
        atomic_write_json(run_dir / "versions.json", {"libraries": library_versions(), "git": git_revision()})
    return run_dir
