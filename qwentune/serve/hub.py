"""`qwentune push RUN_OR_MODEL_DIR OWNER/NAME`: put a trained model on the Hugging Face Hub (`create_repo` +
`upload_folder`), with its model card.

What goes up: for a run dir its `merged/` (or `adapter/` with `adapter_only`) with the card built from the run
(`card.card_for_run`) as README.md; for an adapter dir or a model dir, its files (a model dir keeps its own README.md,
or gets a card). Small JSON files are uploaded with machine paths replaced by names (adapter_config.json's base,
merge_report.json's base and adapter, the sidecar's base_path), so nothing on the Hub names this machine. The files
are staged as links in a temp dir (the run dir is never changed); `dry_run` lists exactly that staging (paths, sizes)
and the card, and uploads nothing. The token comes from HF_TOKEN or the saved login; it is never printed or written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import QwentuneError
from ..export import CardInputs, base_name, build_card, card_for_run, public_path
from .inference import SIDECAR, is_run_dir

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SMALL_JSON = 1 << 20  # JSON files under 1 MiB are checked for machine paths (tokenizer.json is larger and has none)


@dataclass
class Staged:
    path: str  # in the repo
    size: int
    note: str  # "" | "card" | "paths replaced by names"


@dataclass
class PushPlan:
    repo_id: str
    source: Path  # the folder whose files go up
    files: list[Staged]
    card: str

    def render(self) -> str:
        total = sum(f.size for f in self.files)
        lines = [f"would upload {len(self.files)} files ({_size(total)}) from {self.source} to {self.repo_id}:"]
        lines += [f"  {f.path}  {_size(f.size)}" + (f"  ({f.note})" if f.note else "") for f in self.files]
        return "\n".join(lines + ["", "README.md (model card):", self.card])


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def check_repo_id(repo_id: str, where: str = "command line") -> str:
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise QwentuneError(f"'{repo_id}' is not a Hub repo id", where=where, hint="use OWNER/NAME, e.g. me/my-model")
    return repo_id


def require_token() -> str:
    """The Hub token (HF_TOKEN or the saved login); QwentuneError without one. Never printed."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise QwentuneError(
            "no Hugging Face token: set HF_TOKEN or log in",
            where="push",
            hint="`hf auth login`, or export HF_TOKEN=hf_... (a token with write access)",
        )
    return token


def _folder_and_card(target: Path, adapter_only: bool) -> tuple[Path, str | None, str | None]:
    """(the folder to upload, the card to put as README.md (None: keep the folder's own README.md), the base as the
    user wrote it when known)."""
    if not target.is_dir():
        raise QwentuneError("no such directory", where=str(target), hint="pass a training run dir or a model dir")
    if target.resolve().name == "merged" and is_run_dir(target.resolve().parent) and not adapter_only:
        target = target.resolve().parent  # a run's merged/: the card comes from its run
    if is_run_dir(target):
        folder = target / ("adapter" if adapter_only else "merged")
        if not folder.is_dir():
            what = "adapter/" if adapter_only else "merged/ (the run did not merge)"
            hint = "train to the end first" if adapter_only else "push the adapter with --adapter-only, or merge"
            raise QwentuneError(f"the run has no {what}", where=str(target), hint=hint)
        base = _adapter_base_ref(target / "adapter") if (target / "adapter").is_dir() else None
        return folder, card_for_run(target, adapter_only=adapter_only), base
    if (target / "adapter_config.json").is_file():
        base = _adapter_base_ref(target)
        return target, build_card(CardInputs(title=target.resolve().name, base=base, adapter_only=True)), base
    if (target / "config.json").is_file():
        if adapter_only:
            raise QwentuneError("--adapter-only needs a run dir or an adapter dir", where=str(target))
        if (target / "README.md").is_file():
            return target, None, None
        return target, build_card(CardInputs(title=target.resolve().name, base=str(target.resolve().name))), None
    raise QwentuneError(
        "not a run dir, an adapter dir or a model dir",
        where=str(target),
        hint="pass the run dir (with merged/ or adapter/), an adapter dir or a dir with config.json",
    )


def _adapter_base_ref(adapter_dir: Path) -> str:
    for name, key in ((SIDECAR, "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            value = json.loads((adapter_dir / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError):
            value = None
        if isinstance(value, str) and value:
            return value
    return "unknown"


def _is_machine_path(value: str) -> bool:
    return value.startswith(("~/", "/")) and len(Path(value).parts) > 2 or bool(re.match(r"^[A-Za-z]:[\\/]", value))


_BASE_KEYS = ("base_model_name_or_path", "base", "base_model")


def _public_value(key: str, value: str, base: str | None) -> str:
    if key in _BASE_KEYS:
        name = base_name(base if base and not _is_machine_path(base) else value)
        return name.hub_id or (base if base and not _is_machine_path(base) else Path(value).name)
    return public_path(value)


def _scrub(data: Any, base: str | None, key: str = "") -> Any:
    """`data` with every string that is a machine path replaced by a public name (a base: the base as the user
    wrote it, `base`, when that is not a path itself; a hub id where one is known)."""
    if isinstance(data, dict):
        return {k: _scrub(v, base, k) for k, v in data.items() if k != "base_path"}
    if isinstance(data, list):
        return [_scrub(v, base, key) for v in data]
    if isinstance(data, str) and _is_machine_path(data):
        return _public_value(key, data, base)
    return data


def _stage(folder: Path, card: str | None, staging: Path, base: str | None = None) -> list[Staged]:
    """Links to `folder`'s files in `staging` (hidden files and checkpoints left out), README.md = the card,
    small JSON files rewritten without machine paths."""
    staged = []
    hidden = lambda p: any(part.startswith(".") for part in p.relative_to(folder).parts)  # noqa: E731
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not hidden(p))
    for path in files:
        rel = path.relative_to(folder).as_posix()
        if card is not None and rel == "README.md":
            continue
        out = staging / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        note = ""
        if path.suffix == ".json" and path.stat().st_size < _SMALL_JSON:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = None
            clean = _scrub(data, base) if data is not None else None
            if clean is not None and clean != data:
                out.write_text(json.dumps(clean, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
                note = "paths replaced by names"
        if not note:
            os.symlink(path.resolve(), out)
        staged.append(Staged(rel, out.stat().st_size, note))
    if card is not None:
        (staging / "README.md").write_text(card, encoding="utf-8")
        staged.append(Staged("README.md", (staging / "README.md").stat().st_size, "card"))
    return sorted(staged, key=lambda s: s.path)


def push(target: str | Path, repo_id: str, *, private: bool = False, adapter_only: bool = False,
         dry_run: bool = False, say: Callable[[str], None] | None = None) -> PushPlan:  # fmt: skip
    """Upload (or, with dry_run, only plan) a run / adapter / model dir to the Hub repo `repo_id`."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    check_repo_id(repo_id)
    folder, card, base = _folder_and_card(Path(target).expanduser(), adapter_only)
    token = None if dry_run else require_token()
    staging = Path(tempfile.mkdtemp(prefix="qwentune-push-"))
    try:
        files = _stage(folder, card, staging, base)
        plan = PushPlan(repo_id, folder, files, card if card is not None else (folder / "README.md").read_text())
        if dry_run:
            return plan
        _upload(staging, plan, token, private=private, say=say)
        return plan
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _upload(staging: Path, plan: PushPlan, token: str, *, private: bool, say: Callable[[str], None]) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    total = _size(sum(f.size for f in plan.files))
    try:
        url = api.create_repo(plan.repo_id, private=private, exist_ok=True)
        say(f"uploading {len(plan.files)} files ({total}) to {url}")
        api.upload_folder(repo_id=plan.repo_id, folder_path=staging, commit_message="Upload model from qwentune")
    except (HfHubHTTPError, OSError, ValueError) as exc:
        message = str(exc).replace(token, "***").splitlines()[0] if str(exc) else type(exc).__name__
        hint = "check the token's write access and the network"
        raise QwentuneError(f"upload failed: {message}", where=plan.repo_id, hint=hint) from None
    say(f"pushed to {url}")


def push_after_training(run_dir: Path, repo_id: str, *, private: bool = False) -> str:
    """The end of `train` with `output.push_to_hub`: upload merged/ and the card (after the verified merge)."""
    from ..logs import log

    plan = push(run_dir, repo_id, private=private, say=log)
    return plan.repo_id
