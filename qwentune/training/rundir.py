"""The run dir: where it is, who owns it (one process at a time: `RunDirLock`), and what it records (resolved
recipe, library versions, git revision). Its files are written atomically through `qwentune.files`."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import QwentuneError
from ..files import atomic_write_json, atomic_write_text
from ..logs import log
from ..recipe import Recipe, dump_recipe

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


def run_state(run_dir: Path) -> str | None:
    """ "finished" once metrics.json is written (finish_run writes it last), "trained" when adapter/ was saved but the
    steps after it (plot, merge, sample, metrics.json) did not complete, None before that."""
    if (run_dir / "metrics.json").is_file():
        return "finished"
    return "trained" if (run_dir / "adapter").is_dir() else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


def run_dir_for(recipe: Recipe) -> Path:
    """`output.dir` with {model}, {method}, {peft} filled in."""
    model = _slug(Path(recipe.model.source.split(":")[-1]).name)
    return Path(recipe.output.dir.format(model=model, method=recipe.method, peft=recipe.peft.method)).expanduser()


def prepare_run_dir(recipe: Recipe, *, is_main: bool = True, resuming: bool = False) -> Path:
    """Create the run dir and record what is about to run. Refuses to mix two runs in one dir: a finished run is kept
    unless `output.overwrite`; a new run (not resuming) starts from an empty dir. Call it holding `RunDirLock`."""
    run_dir = run_dir_for(recipe)
    if is_main:
        state = run_state(run_dir)
        if state == "finished" and not recipe.output.overwrite:
            raise QwentuneError(
                "run dir already holds a finished run",
                where=str(run_dir),
                hint="pick another output.dir, or set output.overwrite=true",
            )
        if state == "trained" and not recipe.output.overwrite:
            raise QwentuneError(
                "run dir holds a trained adapter/ but the run did not finish (no metrics.json: killed during the "
                "merge?)",
                where=str(run_dir),
                hint=f"finish it without retraining: add --resume (training.resume=true), or merge only: qwentune "
                f"merge {run_dir / 'adapter'} --output {run_dir / 'merged'}; output.overwrite=true trains anew",
            )
        try:
            if not resuming:
                clear_run_dir(run_dir)
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


LOCK_NAME = ".qwentune.lock"  # the OS lock (filelock): the kernel releases it when its process dies
OWNER_NAME = ".qwentune-owner.json"  # who holds it: pid, host, command, since


def clear_run_dir(run_dir: Path) -> list[str]:
    """Remove what an earlier run left in `run_dir` (all but the lock files); returns the names removed."""
    if not run_dir.is_dir():
        return []
    removed = []
    for entry in sorted(run_dir.iterdir()):
        if entry.name in (LOCK_NAME, OWNER_NAME):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry.name)
    if removed:
        log(f"{run_dir}: removed the previous run's files ({', '.join(removed)})")
    return removed


def _describe(owner: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    return f"process {owner.get('pid', '?')} on {owner.get('host', '?')} since {since} ({owner.get('command', '?')})"


class RunDirLock:
    """One process owns a run dir at a time. A second `train` into the same `output.dir` is refused at once naming
    the holder; a lock left by a process that died is taken over (the OS released it), with a note."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._lock = None
        self._created = False  # made by this lock: removed again on release if the run wrote nothing into it

    def acquire(self) -> RunDirLock:
        from filelock import FileLock, Timeout

        self._created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise QwentuneError(
                f"cannot write the run dir: {exc.strerror or exc}",
                where=f"output.dir {self.run_dir}",
                hint="pick a writable dir",
            ) from None
        lock = FileLock(str(self.run_dir / LOCK_NAME), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            owner = self._owner()
            raise QwentuneError(
                f"run dir is in use by {_describe(owner) if owner else 'another process'}",
                where=str(self.run_dir),
                hint="wait for that run to end, or pick another output.dir",
            ) from None
        except OSError as exc:
            raise QwentuneError(f"cannot lock the run dir: {exc.strerror}", where=str(self.run_dir)) from None
        self._lock = lock
        previous = self._owner()
        if previous and previous.get("pid") != os.getpid():
            log(f"{self.run_dir}: took over the run dir from {_describe(previous)}, which is no longer running")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": " ".join(sys.argv)}
        atomic_write_json(self.run_dir / OWNER_NAME, me)
        return self

    def _owner(self) -> dict | None:
        try:
            owner = json.loads((self.run_dir / OWNER_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None

    def release(self) -> None:
        if self._lock is not None:
            (self.run_dir / OWNER_NAME).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None
            if self._created and {p.name for p in self.run_dir.iterdir()} <= {LOCK_NAME}:
                (self.run_dir / LOCK_NAME).unlink(missing_ok=True)  # refused before anything was written: no trace
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()


@contextlib.contextmanager
def owned_run_dir(run_dir: Path, *, is_main: bool = True) -> Iterator[Path]:
    """Hold the run dir for the block (main process only: other ranks never write it)."""
    if not is_main:
        yield run_dir
        return
    lock = RunDirLock(run_dir).acquire()
    try:
        yield run_dir
    finally:
        lock.release()
