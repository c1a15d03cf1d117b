"""`qwentune eval --pairs OUT.jsonl`: every turn a model got wrong, as a DPO preference pair that `train` reads as is.

A pair is the turn's prompt exactly as eval rendered it (tools, system, the history up to the turn), `chosen` = the
row's expected assistant turn and `rejected` = the model's own reply (its text, as one assistant message), plus a
`meta` object naming where it came from: the model, the data file, row and turn, the verdict's `why`, greedy or which
sample, `cut` (the reply ran into max_new_tokens). The DPO reader ignores `meta`. Each pair is checked here the way
training reads it (format conversion, then rendering with exact masks): one that training would drop is not written
but counted; `meta.exact` says whether training's tokens are exactly what the model saw and wrote (the eval prompt's
ids; the reply's tokens + the end token), which holds whenever the reply's tokens are the tokenizer's own split of
its text.

Pairs are mined from training rows (or a split of them), never from an eval split: `refuse_eval_split` refuses a data
file that is the eval split of a recipe or run dir given as a model.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadRow, QwentuneError
from ..files import atomic_write_text
from ..rows import convert, render_preference_batch

PAIRABLE = ("tool_call", "no_call")


@dataclass
class Miss:
    """One wrong reply to one turn (`item`: an eval Item of kind tool_call / no_call)."""

    item: Any
    text: str
    ids: list[int]
    why: str
    prompt_ids: list[int]
    sample: int | None = None  # None: the greedy reply
    cut: bool = False  # the reply ran into max_new_tokens: the model had not ended it
    meta: dict = field(default_factory=dict)  # how it was sampled (temperature, seed)


@dataclass
class MinedPairs:
    path: str
    pairs: list[dict]
    turns: int  # turns a reply was generated for
    misses: int  # distinct wrong replies
    dropped: Counter  # wrong replies not written, by reason

    def line(self) -> str:
        dropped = "; ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items()))
        return (
            f"wrote {len(self.pairs)} preference pair(s) to {self.path} from {self.misses} wrong repl"
            f"{'y' if self.misses == 1 else 'ies'} on {self.turns} turn(s)"
            + (f" (not written: {dropped})" if dropped else "")
        )

    def to_dict(self) -> dict:
        return {"path": self.path, "written": len(self.pairs), "turns": self.turns, "misses": self.misses,
                "dropped": dict(self.dropped)}  # fmt: skip


def _recipe_of(model: Any) -> Path | None:
    path = Path(str(model))
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    return path / "recipe.yaml" if (path / "recipe.yaml").is_file() else None


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_eval_split(models: list[Any], data: list[str | Path]) -> None:
    """A QwentuneError when a data file is the eval split (eval.data, else data.eval) of a recipe or run dir among
    `models`: pairs are mined from training rows, never from the rows the model is judged on."""
    from ..recipe import load_recipe, resolve_path

    for model in models:
        recipe_file = _recipe_of(model)
        if recipe_file is None:
            continue
        try:
            recipe = load_recipe(recipe_file)
            held_out = [resolve_path(recipe, str(d)) for d in (recipe.eval.data or recipe.data.eval or [])]
        except (QwentuneError, TypeError):  # a recipe that no longer loads names no split to guard
            continue
        for file in data:
            if any(_same(Path(file), h) for h in held_out):
                raise eval_split_error(str(file), str(recipe_file))


def eval_split_error(file: str, recipe: str) -> QwentuneError:
    return QwentuneError(
        f"is the eval split of {recipe}: pairs are mined from training rows, never from the eval split",
        where=str(file),
        hint="qwentune eval MODEL --data TRAIN_FILE --pairs OUT.jsonl (the training rows, or a split of them)",
    )


def _message(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "train"}


def _pair(miss: Miss, model: str) -> dict:
    it = miss.item
    meta = {"model": model, "data": it.file, "row": it.row, "turn": it.turn, "kind": it.kind, "why": miss.why,
            "reply": "greedy" if miss.sample is None else "sampled", "cut": miss.cut}  # fmt: skip
    if miss.sample is not None:
        meta |= {"sample": miss.sample, **miss.meta}
    if getattr(it, "decision", None):  # the row's "decision" tag (data/tool_calls_decisions.jsonl)
        meta["decision"] = it.decision
    return {
        "prompt": [_message(m) for m in it.prompt],
        "chosen": [_message(it.reply)],
        "rejected": [{"role": "assistant", "content": miss.text}],
        "tools": it.tools,
        "meta": meta,
    }


def build_pairs(misses: list[Miss], tokenizer: Any, chat: Any, *, model: str, stops: list[int]):
    """(pairs, dropped reasons): one pair per distinct wrong reply of a turn, each checked the way training reads it
    (a whitespace-only reply, or a pair training would drop, is counted by reason instead)."""
    seen: set[tuple[str, int, int, str]] = set()
    kept: list[tuple[Miss, dict]] = []
    dropped: Counter = Counter()
    for miss in misses:
        key = (miss.item.file, miss.item.row, miss.item.turn, miss.text)
        if key in seen:
            continue
        seen.add(key)
        if not miss.text.strip():
            dropped["empty_reply"] += 1
            continue
        kept.append((miss, _pair(miss, model)))
    canonical: list[Any] = []
    for _, pair in kept:
        try:
            canonical.append(convert(pair, "preference"))
        except BadRow as bad:
            canonical.append(bad)
    ok = [c for c in canonical if not isinstance(c, BadRow)]
    rendered = iter(render_preference_batch(ok, tokenizer, chat))
    pairs = []
    for (miss, pair), row in zip(kept, canonical):
        result = row if isinstance(row, BadRow) else next(rendered)
        if isinstance(result, BadRow):
            dropped[result.reason] += 1
            continue
        rejected = result.rejected_input_ids
        pair["meta"]["exact"] = (result.prompt_input_ids == miss.prompt_ids and rejected[:-1] == miss.ids
                                 and rejected[-1] in stops)  # fmt: skip
        pairs.append(pair)
    return pairs, dropped


def check_mining(models: list, data: list, *, pairs: Any, samples: int, temperature: float | None) -> None:
    """Refuse, before any model loads, what --pairs / --samples / --temperature cannot do."""
    if not isinstance(samples, int) or samples < 0 or (samples and pairs is None):
        raise QwentuneError(f"samples={samples}: sampled replies serve --pairs only (a count ≥ 1 with --pairs)",
                            where="--samples", hint="qwentune eval MODEL --data TRAIN_FILE --pairs OUT.jsonl "
                            "--samples 4")  # fmt: skip
    if temperature is not None and (not samples or not temperature > 0):
        raise QwentuneError(f"temperature={temperature}: a temperature > 0 for --samples", where="--temperature")
    if pairs is None:
        return
    if len(models) != 1:
        raise QwentuneError(f"--pairs mines one model's misses, got {len(models)} models", where="--pairs",
                            hint="qwentune eval MODEL --data TRAIN_FILE --pairs OUT.jsonl")  # fmt: skip
    check_pairs_path(pairs, data)
    refuse_eval_split(models, data)


def check_pairs_path(path: str | Path, data: list[str | Path]) -> Path:
    """The pairs file to write: not a directory, not one of the data files."""
    path = Path(path)
    if path.is_dir():
        raise QwentuneError("is a directory", where=f"--pairs {path}", hint="name a .jsonl file, e.g. pairs.jsonl")
    if any(_same(path, Path(d)) for d in data):
        raise QwentuneError("is one of the --data files", where=f"--pairs {path}", hint="name a new .jsonl file")
    return path


def mine_pairs(
    path: str | Path, misses: list[Miss], turns: int, tokenizer: Any, chat: Any, *, model: str
) -> MinedPairs:
    """Build the pairs of `misses` and write them to `path` (atomically, also when there are none)."""
    from .generate import stop_token_ids

    pairs, dropped = build_pairs(misses, tokenizer, chat, model=model, stops=stop_token_ids(tokenizer))
    write_pairs(Path(path), pairs)
    distinct = len({(m.item.file, m.item.row, m.item.turn, m.text) for m in misses})
    return MinedPairs(str(path), pairs, turns, distinct, dropped)


def write_pairs(path: Path, pairs: list[dict]) -> None:
    """One pair a line, written atomically."""
    try:
        atomic_write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    except OSError as exc:
        raise QwentuneError(f"cannot write: {exc.strerror or exc}", where=f"--pairs {path}") from None


__all__ = [
    "PAIRABLE",
    "MinedPairs",
    "Miss",
    "build_pairs",
    "check_mining",
    "check_pairs_path",
    "mine_pairs",
    "refuse_eval_split",
    "write_pairs",
]
