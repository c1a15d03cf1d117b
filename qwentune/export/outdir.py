"""Writing the merged directory: staged beside the target and published atomically (the previous target is kept
until the new one is in place), plus tokenizer, chat template, generation config, processor files and the report."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import QwentuneError
from ..files import make_staging_dir, public_tree, remove_stale_staging, staging_prefix
from ..model import is_vl
from .checkpoint import read_json, text_config
from .job import MergeJob, MergeResult

REPORT_NAME = "merge_report.json"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
QWEN_EOS_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>
_AUX_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


def prepare_target(output_dir: str | Path, *, forbidden: list[Path]) -> Path:
    target = Path(output_dir).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise QwentuneError("exists and is not a directory", where=str(target))
    for other in forbidden:
        if other is not None and target.resolve() == Path(other).expanduser().resolve():
            raise QwentuneError(
                "the output directory is the adapter or base directory", where=str(target), hint="choose a new path"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


@contextlib.contextmanager
def staging(target: Path) -> Iterator[Path]:
    """A temp dir beside `target` (`.NAME.tmp-<pid>-…`); on success its files and dirs get the umask's modes and it
    replaces `target` (old one moved aside, then deleted). Staging dirs that a killed merge left beside it are removed
    first, with a note."""
    remove_stale_staging(target.parent, target.name)
    tmp = make_staging_dir(target.parent, staging_prefix(target.name))
    try:
        yield tmp
        public_tree(tmp)  # save_pretrained's weights are 0600 (safetensors writes via a temp file)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, target)


def _publish(tmp: Path, target: Path) -> None:
    old = None
    try:
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=staging_prefix(target.name, "old"), dir=target.parent))
            os.rmdir(old)
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            os.rename(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_companions(
    job: MergeJob, tmp: Path, config_dict: dict, base_gen: dict | None, extra_sources: list[Path]
) -> dict:
    """Tokenizer, chat template, generation config, processor files, licence files. Returns facts for the card."""
    facts: dict[str, Any] = {}
    sources = []
    if job.tokenizer_source is not None:
        if not job.tokenizer_source.is_dir():
            raise QwentuneError("no such directory", where=f"tokenizer_source={job.tokenizer_source}")
        sources.append(job.tokenizer_source)
    sources += [s for s in extra_sources if s is not None]
    tok = None
    for src in sources:
        if (src / "tokenizer.json").is_file() or (src / "tokenizer_config.json").is_file():
            tok = _load_tokenizer(src)
            facts["tokenizer_source"] = str(src)
            break
    if tok is None and job.tokenizer_source is not None:
        raise QwentuneError("no tokenizer files here", where=f"tokenizer_source={job.tokenizer_source}")
    if tok is not None:
        if job.chat_template is not None:
            tok.chat_template = job.chat_template
        tok.save_pretrained(tmp)
        expected = tok.chat_template
        from transformers import AutoTokenizer

        reloaded = AutoTokenizer.from_pretrained(tmp)
        if reloaded.chat_template != expected:
            raise QwentuneError("the saved tokenizer's chat template does not read back identical", where=str(tmp))
        facts["chat_template_saved"] = expected is not None
    else:
        print("[qwentune merge] warning: no tokenizer found (adapter dir, base dir); none is saved")
    for src in [job.base_dir, *sources]:
        if src is None:
            continue
        for name in _AUX_FILES:
            if (src / name).is_file() and not (tmp / name).exists():
                shutil.copy2(src / name, tmp / name)
    if job.image_processor and is_vl(config_dict):
        facts["image_processor"] = job.report["image_processor"] = _write_image_processor(tmp, job.image_processor)
    elif job.image_processor:
        print("[qwentune merge] note: image-processor settings ignored (not a vision-language model)")
    if job.base_dir is not None:
        for item in job.base_dir.iterdir():
            if item.is_file() and item.name.upper().startswith(("LICENSE", "NOTICE")):
                shutil.copy2(item, tmp / item.name)

    gen = dict(base_gen) if base_gen else {}
    text = text_config(config_dict)
    if not gen:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = text.get(key, config_dict.get(key))
            if value is not None:
                gen[key] = value
    if job.eos_ids is not None:
        eos = [int(i) for i in job.eos_ids]
    elif tok is not None and IM_END in tok.get_vocab():
        eos = [tok.convert_tokens_to_ids(IM_END)]
        if ENDOFTEXT in tok.get_vocab():
            eos.append(tok.convert_tokens_to_ids(ENDOFTEXT))
    else:
        eos = gen.get("eos_token_id")
    if eos is not None:
        gen["eos_token_id"] = eos
    gen.pop("transformers_version", None)
    import transformers

    gen["transformers_version"] = transformers.__version__
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    facts["eos_token_id"] = eos
    facts["tokenizer"] = tok
    return facts


def _write_image_processor(tmp: Path, settings: dict) -> dict:
    """Put `settings` into the merged dir's image-processor config: preprocessor_config.json, and the nested
    ``image_processor`` of processor_config.json when there is one (transformers reads that one first). The pixel
    limits go into ``size`` (shortest_edge/longest_edge, where transformers 5 reads them) as well."""
    targets = []
    if (tmp / "preprocessor_config.json").is_file():
        targets.append((tmp / "preprocessor_config.json", None))
    if (tmp / "processor_config.json").is_file():
        if isinstance(read_json(tmp / "processor_config.json").get("image_processor"), dict):
            targets.append((tmp / "processor_config.json", "image_processor"))
    if not targets:
        raise QwentuneError(
            "image-processor settings were given, but neither the base nor the adapter dir has an image-processor "
            "config (preprocessor_config.json) to put them in",
            where="image_processor",
            hint="pass tokenizer_source=<dir with the processor files>",
        )
    for path, nested in targets:
        data = read_json(path)
        config = data[nested] if nested else data
        config.update(settings)
        size = dict(config.get("size") or {})
        for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if key in settings:
                size[edge] = settings[key]
                if key in size:  # an older layout keeps the limits under their own names inside size
                    size[key] = settings[key]
        if size:
            config["size"] = size
        path.write_text(json.dumps(data, indent=2) + "\n")
    return settings


def _load_tokenizer(src: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(src)
    except Exception:
        if (src / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
        raise


def write_report(job: MergeJob, tmp: Path, result: MergeResult, save_dtype: torch.dtype) -> None:
    report = {
        "mode": result.mode,
        "max_abs_diff": None if math.isnan(result.max_abs_diff) else result.max_abs_diff,
        "tolerance": result.tolerance,
        "untied": result.untied,
        "dtype": str(save_dtype).removeprefix("torch."),
        "base": job.base_name,
        "adapter": job.adapter_label or (str(job.adapter_dir) if job.adapter_dir else "(in memory)"),
        "streaming": job.streaming,
        "quantization": job.spec.to_dict() if job.spec else None,
        **job.report,
    }
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
