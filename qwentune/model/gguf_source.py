"""A `.gguf` model as a plain Hugging Face model directory: dequantized once to float32 by transformers (with the
official Qwen config and tokenizer values a GGUF loses put back), cached under its sha256, one conversion at a time."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from importlib import metadata, resources
from pathlib import Path

from ..errors import QwentuneError
from ..files import public_tree
from .shapes import ENDOFTEXT, IM_END, IM_START

CHUNK = 8 * 1024 * 1024
MARKER = "qwentune-source.json"
# Qwen's ChatML special tokens (ids 151643-151645 in the real vocabulary; looked up, never assumed).


def progress_bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress)


@contextlib.contextmanager
def progress_bars(progress: bool) -> Iterator[None]:
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


def _sha256_file(path: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src, progress_bar(path.stat().st_size, f"sha256 {path.name}", progress) as bar:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def gguf_sha256(gguf: Path, root: Path, *, progress: bool) -> str:
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


def converted(
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
            public_tree(tmp)  # save_pretrained's weights are 0600 (safetensors writes via a temp file)
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

    with progress_bars(progress):
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


__all__ = ["MARKER", "converted", "dequantize_gguf", "gguf_sha256", "progress_bar", "progress_bars"]
