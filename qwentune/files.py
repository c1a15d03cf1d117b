"""Files qwentune writes: atomic writes (a temporary file beside the target, then a rename), with the permissions
the umask asks for (`public_mode`), and staging dirs named by their owner's pid so a dead run's leftovers can be
swept. The bottom floor: export, eval, serve and training write through it."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .logs import log

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it: `os.umask` can only be read by setting it, and while it is set
    another thread's file gets the wrong mode (or two readers racing leave the wrong umask behind for good). Linux
    reports it in /proc/self/status; elsewhere the set-and-restore, serialised between qwentune's own callers."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _mode(is_dir: bool, umask: int) -> int:
    return (0o777 if is_dir else 0o666) & ~umask


def public_mode(path: Path) -> None:
    """The permissions an ordinary create would have given (0644 / 0755 under the default umask): `tempfile` makes
    0600 files and 0700 dirs, which a serving account could not read once renamed into place."""
    os.chmod(path, _mode(Path(path).is_dir(), _umask()))


def public_tree(path: Path) -> None:
    """`public_mode` for `path` and everything under it (symlinks left alone), before a staged dir is published:
    what libraries write inside it may be 0600 too (safetensors >= 0.8 saves through a temporary file, so every
    `save_pretrained` weight file is; Trainer checkpoints alike)."""
    path = Path(path)
    umask = _umask()
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, _mode(False, umask))
        return
    for root, _dirs, files in os.walk(path):  # symlinked dirs are not entered
        os.chmod(root, _mode(True, umask))
        for name in files:
            file = os.path.join(root, name)
            if not os.path.islink(file):
                os.chmod(file, _mode(False, umask))


def make_staging_dir(parent: Path, prefix: str) -> Path:
    """A hidden temporary dir beside its target (same filesystem, so the final rename is atomic), mode per umask."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    public_mode(tmp)
    return tmp


LEGACY_STALE_S = 3600  # a staging dir named without its owner's pid (older qwentune) is stale after an hour idle


def staging_prefix(name: str, kind: str = "tmp") -> str:
    """`.NAME.tmp-<pid>-`: a staging dir names its owner, so a later run can tell a dead one's leftovers."""
    return f".{name}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _idle_seconds(path: Path) -> float:
    try:
        newest = max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.iterdir())])
    except OSError:
        return 0.0
    return time.time() - newest


def remove_stale_staging(parent: Path, name: str) -> list[Path]:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` siblings that a killed process left: those whose owner pid is gone, and
    pid-less (older) ones idle for over an hour. A `.NAME.old-*` is kept while NAME is missing: it is then the only
    copy of the previous NAME (the kill fell between the two renames of a publish). Each removal is logged."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(?:(\d+)-)?")
    removed = []
    for entry in sorted(Path(parent).glob(f".{name}.*")) if Path(parent).is_dir() else []:
        match = pattern.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match.group(2)) if match.group(2) else None
        if pid == os.getpid() or (pid is not None and _alive(pid)):
            continue
        if pid is None and _idle_seconds(entry) < LEGACY_STALE_S:
            continue
        if match.group(1) == "old" and not (Path(parent) / name).exists():
            log(f"{entry} holds the previous {name} (a publish was interrupted): left in place, rename it back")
            continue
        shutil.rmtree(entry, ignore_errors=True)
        owner = f"process {pid}, no longer running" if pid is not None else "an older qwentune, idle over an hour"
        log(f"removed the stale staging dir {entry} (left by {owner})")
        removed.append(entry)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        public_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
