"""`qwentune eval`: measure what a tune did, one or more models side by side on the same rows.

Each row is scored by its kind, found with the same format detection and official-template rendering as training
(the prompt is exactly what the model was trained to continue); `turns="all"` (`--turns all`) scores every assistant
turn of a row with tools, one prompt per turn (the history up to it), instead of the first only:
  tool_call   the first assistant turn makes calls: greedy reply scored by `toolscore` (exact match + breakdown)
  no_call     a row with tools whose first assistant turn makes no call: did the model refrain
  bfcl        a BFCL question file (+ --bfcl-answers): BFCL's AST rules per category (`bfcl`)
  sft         a row without tools: loss / perplexity on exactly the trained tokens (the training masks), and a few
              greedy samples
  preference  log p(chosen) > log p(rejected) summed over the completion tokens, and the mean margin
  vl          a row with images (Qwen2-VL; paths relative to the data file): loss / perplexity on the trained tokens
              rendered and collated as training does, and exact match of the greedy reply on short answers
              (`evalvision`); with a text-only model they are skipped (`images_need_a_vision_model`). Preference
              rows with images are not scored yet (skipped, `images_not_supported`).
With `pairs` (`--pairs OUT.jsonl`), every wrong tool-call / no-call reply becomes a DPO preference pair (`pairs`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadRow, QwentuneError
from ..files import atomic_write_text
from ..patches import release_host_memory
from ..rows import ChatTemplate, ImageFile, convert, detect_format, load_template, row_images
from .bfcl import BfclCase, check_case, is_bfcl_row, read_bfcl
from .decisions import decision_field, summarize_decisions, tag_decisions
from .endpoint import Endpoint, is_endpoint, open_endpoint
from .pairs import PAIRABLE, Miss, check_mining, mine_pairs
from .table import EvalResult
from .toolscore import parse_tool_calls, reference_calls, score_tool_calls
from .vision import NEEDS_VISION, score_vl_rows, summarize_vl, vision_inputs

SFT_SAMPLES = 3  # greedy samples shown per SFT file


@dataclass
class Item:
    file: str
    row: int  # 1-based line in the file
    kind: str  # tool_call | no_call | bfcl | sft | preference | vl
    prompt: list[dict] = field(default_factory=list)
    tools: list[dict] | None = None
    expected: Any = None  # reference calls, the reference reply, or the BFCL case
    raw: dict | None = None  # the canonical row (sft: messages + tools; preference: prompt/chosen/rejected/tools)
    sample: bool = False  # an sft row that also gets a greedy sample
    images: list[ImageFile] = field(default_factory=list)  # vl: every image of the row, in template order
    turn: int = 1  # which assistant turn of the row is the reference (1-based)
    reply: dict | None = None  # tool_call / no_call: the expected assistant message (a pair's `chosen`)
    decision: str | None = None  # the row's "decision" tag, on its first turn (`decisions`)


@dataclass
class Skipped:
    file: str
    row: int
    reason: str


def _read_rows(path: Path) -> list[tuple[int, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QwentuneError(f"cannot read the eval file: {exc.strerror or exc}", where=str(path)) from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # else JSON Lines in a .json file, as BFCL ships its files: read line by line
                raise QwentuneError(f"not valid JSON: {exc.msg}", where=f"{path} line {exc.lineno}") from None
        else:
            return list(enumerate(data if isinstance(data, list) else [data], 1))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise QwentuneError(f"not valid JSON: {exc.msg}", where=f"{path} row {n}") from None
    return rows


def _has_images(messages: list[dict]) -> bool:
    return any(isinstance(m.get("content"), list) for m in messages)


TURNS = ("first", "all")


def _after_a_question(messages: list[dict], i: int) -> bool:
    """Message i is an assistant turn that training trains, answering a user message or tool results."""
    m = messages[i]
    return m["role"] == "assistant" and i > 0 and messages[i - 1]["role"] in ("user", "tool") and m.get("train", True)


def _items(file: str, n: int, raw: Any, turns: str = "first") -> list[Item]:
    """The scoreable items of one data row: its first assistant turn, or with turns="all" one item per assistant
    turn of a row with tools (the history up to the turn as its prompt; loss, image and preference rows stay one
    item: their loss covers every trained turn). Raises BadRow with the reason there is none."""
    fmt = detect_format(raw)
    if fmt is None:
        raise BadRow("unknown_format", "no messages/conversations/instruction/prompt+completion/chosen+rejected keys")
    row = convert(raw, fmt)
    if fmt == "preference":
        if _has_images(row["prompt"]):
            raise BadRow("images_not_supported")
        return [Item(file, n, "preference", row["prompt"], row.get("tools"), raw=row)]
    messages = row["messages"]
    turn = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if turn is None or turn == 0:
        raise BadRow("no_expected_turn", "no assistant turn after a prompt")
    prompt, reply = messages[:turn], messages[turn]
    if _has_images(messages):  # opened and sized now: a missing image is a skipped row, as in training's report
        images = row_images(row, str(Path(file).parent))
        return [Item(file, n, "vl", prompt, row.get("tools"), reply.get("content"), raw=row, images=images)]
    if not row.get("tools"):
        return [Item(file, n, "sft", prompt, None, reply.get("content"), raw=row)]
    return tag_decisions(expected_turns(file, n, row, turns), raw)


def expected_turns(file: str, n: int, row: dict, turns: str = "all") -> list[Item]:
    """The tool_call / no_call items of a canonical conversation row: its first assistant turn, or (turns="all")
    every trained assistant turn answering a user message or tool results, each with the history up to it as its
    prompt and the turn as its reference (`--turns all`, and GRPO's prompts). Raises BadRow when there is none."""
    messages = row["messages"]
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), 0)
    picked = [first] if turns == "first" else [i for i in range(len(messages)) if _after_a_question(messages, i)]
    if not picked or not picked[0]:
        raise BadRow("no_expected_turn", "no trained assistant turn answers a user message or tool results")
    out = []
    for i in picked:
        calls = reference_calls(messages[i])
        k = sum(m["role"] == "assistant" for m in messages[: i + 1])
        out.append(Item(file, n, "tool_call" if calls else "no_call", messages[:i], row.get("tools"), calls, turn=k,
                        reply=messages[i]))  # fmt: skip
    return out


def collect(data: list[str | Path], *, bfcl_answers: str | Path | None = None, limit: int | None = None,
            turns: str = "first", mining: bool = False):  # fmt: skip
    """(items, skipped) from the eval files: at most `limit` scoreable rows per file, each its first assistant turn
    or (turns="all") one item per assistant turn. Raises QwentuneError when no file holds anything scoreable, and
    when `mining` (pairs) on a BFCL file."""
    if turns not in TURNS:
        raise QwentuneError(f"turns must be one of {', '.join(TURNS)}, got {turns!r}", where="turns")
    items: list[Item] = []
    skipped: list[Skipped] = []
    for path in map(Path, data):
        rows = _read_rows(path)
        if rows and is_bfcl_row(rows[0][1]):
            if mining:
                raise QwentuneError("BFCL is an evaluation set: no pairs are mined from it", where=str(path))
            cases = read_bfcl(path, bfcl_answers, limit=limit)
            items += [Item(str(path), k, "bfcl", c.messages, c.tools, c) for k, c in enumerate(cases, 1)]
            continue
        taken = sft = 0
        for n, raw in rows:
            if limit is not None and taken >= limit:
                break
            try:
                row_items = _items(str(path), n, raw, turns)
            except BadRow as bad:
                reason = "no_expected_turn" if bad.reason == "no_assistant_turn" else bad.reason
                skipped.append(Skipped(str(path), n, reason))
                continue
            for item in row_items:
                if item.kind == "sft":
                    item.sample, sft = sft < SFT_SAMPLES, sft + 1
            items += row_items
            taken += 1
    if not items:
        _nothing_scoreable(skipped, data)
    return items, skipped


def _nothing_scoreable(skipped: list[Skipped], data: list) -> None:
    first = skipped[0] if skipped else None
    where = f"{first.file} row {first.row}" if first else ", ".join(map(str, data)) or "--data"
    reason = f"nothing scoreable (first row: {first.reason})" if first else "nothing scoreable (no rows)"
    hint = "rows need a prompt and the expected assistant turn"
    if first and first.reason == NEEDS_VISION:
        hint = "image rows need a Qwen2-VL model (every model given scores the same rows)"
    raise QwentuneError(reason, where=where, hint=hint)


def prompt_text(item: Item, tokenizer: Any, template_text: str) -> str:
    """The item's prompt as the model sees it, as inference renders it: its history and tools through the template,
    with the generation prompt (its ids: the text tokenized without special tokens added, `_prompt_ids`)."""
    return tokenizer.apply_chat_template(
        item.prompt, tools=item.tools, chat_template=template_text, add_generation_prompt=True, tokenize=False
    )


def _prompt_ids(item: Item, tokenizer: Any, template_text: str) -> list[int]:
    return tokenizer(prompt_text(item, tokenizer, template_text), add_special_tokens=False)["input_ids"]


def _score_generation(item: Item, text: str) -> dict:
    if item.kind == "bfcl":
        case: BfclCase = item.expected
        why = check_case(case, parse_tool_calls(text) if "<tool_call>" in text else [])
        return {"ok": not why, "why": why, "category": case.category}
    if item.kind == "sft":
        return {"ok": None, "why": ""}
    return score_tool_calls(text, item.expected, item.tools).to_dict()


def _score_model(
    model: Any,
    tokenizer: Any,
    items: list[Item],
    *,
    label: str,
    template: str | ChatTemplate,
    batch_size: int,
    max_new_tokens: int,
    progress: bool = True,
    train_on: str = "all",
    vision: Any = None,
) -> list[dict]:
    """One record per item: prompt, expected, got, verdict, why (+ loss numbers for sft/preference/vl rows).
    `vision`: a Qwen2-VL model's `evalvision.VisionInputs` (needed when items hold vl rows)."""
    from ..rows import render_batch, render_preference_batch
    from .generate import greedy_generate, sequence_logprobs

    chat = template if isinstance(template, ChatTemplate) else load_template(template, tokenizer)
    records: list[dict] = [
        {"file": it.file, "row": it.row, "turn": it.turn, "kind": it.kind,
         "prompt": it.prompt[-1].get("content") if it.prompt else "", **decision_field(it)}
        for it in items
    ]  # fmt: skip
    gen = [i for i, it in enumerate(items) if it.kind in ("tool_call", "no_call", "bfcl") or it.sample]
    outputs = greedy_generate(
        model, tokenizer, [_prompt_ids(items[i], tokenizer, chat.text) for i in gen],
        max_new_tokens=max_new_tokens, batch_size=batch_size, desc=f"eval {label}", progress=progress,
    )  # fmt: skip
    for i, ids in zip(gen, outputs):
        text = tokenizer.decode(ids, skip_special_tokens=False)
        verdict = _score_generation(items[i], text)
        expected = items[i].expected
        if isinstance(expected, BfclCase):
            expected = expected.ground_truth
        records[i].update(expected=expected, got=text, verdict=verdict.pop("ok"), why=verdict.pop("why"), **verdict)
        records[i]["_ids"] = ids  # the reply's tokens, for mining pairs; never written out
    sft = [i for i, it in enumerate(items) if it.kind == "sft"]
    rendered = render_batch([items[i].raw for i in sft], tokenizer, chat, train_on=train_on)
    pairs = [i for i, it in enumerate(items) if it.kind == "preference"]
    rendered_pairs = render_preference_batch([items[i].raw for i in pairs], tokenizer, chat)
    seqs, owners = [], []
    for i, r in zip(sft, rendered):
        if isinstance(r, BadRow):
            records[i].update(verdict=None, why=f"not rendered: {r.reason}")
            continue
        seqs.append((r.input_ids, r.labels))
        owners.append((i, "sft"))
    for i, p in zip(pairs, rendered_pairs):
        if isinstance(p, BadRow):
            records[i].update(verdict=None, why=f"not rendered: {p.reason}")
            continue
        for side in (p.chosen_input_ids, p.rejected_input_ids):
            seqs.append((p.prompt_input_ids + side, [-100] * len(p.prompt_input_ids) + list(side)))
            owners.append((i, "preference"))
    logps = sequence_logprobs(model, seqs, batch_size=batch_size)
    k = 0
    while k < len(owners):
        i, kind = owners[k]
        if kind == "sft":
            logp, n = logps[k]
            records[i].update(nll=-logp, tokens=n)
            records[i].setdefault("expected", items[i].expected)
            k += 1
            continue
        (chosen, _), (rejected, _) = logps[k], logps[k + 1]
        margin = chosen - rejected
        records[i].update(margin=margin, verdict=margin > 0, why="" if margin > 0 else "rejected is more likely",
                          expected="chosen", got="chosen" if margin > 0 else "rejected")  # fmt: skip
        k += 2
    vl = [i for i, it in enumerate(items) if it.kind == "vl"]
    if vl:
        scored = score_vl_rows(model, tokenizer, [items[i] for i in vl], [_prompt_ids(items[i], tokenizer, chat.text)
                               for i in vl], chat, vision, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               train_on=train_on, label=label, progress=progress)  # fmt: skip
        for i, record in zip(vl, scored):
            records[i].update(record)
    return records


def summarize(records: list[dict]) -> dict[str, dict]:
    """Metric name → {"correct", "total"} (a rate) or {"value", "total"} (a number), from one model's records."""
    out: dict[str, dict] = {}
    kinds = Counter(r["kind"] for r in records)
    calls = [r for r in records if r["kind"] == "tool_call"]
    if calls:
        for key in ("ok", "tagged", "valid_json", "right_function", "right_arguments"):
            name = "tool calls: exact" if key == "ok" else f"tool calls: {key.replace('_', ' ')}"
            out[name] = {"correct": sum(bool(r.get(key) if key != "ok" else r.get("verdict")) for r in calls),
                         "total": len(calls)}  # fmt: skip
    if kinds["no_call"]:
        nocall = [r for r in records if r["kind"] == "no_call"]
        out["no call: refrained"] = {"correct": sum(bool(r["verdict"]) for r in nocall), "total": len(nocall)}
    bfcl = [r for r in records if r["kind"] == "bfcl"]
    for cat in sorted({r["category"] for r in bfcl}):
        rows = [r for r in bfcl if r["category"] == cat]
        out[f"bfcl {cat}"] = {"correct": sum(bool(r["verdict"]) for r in rows), "total": len(rows)}
    if bfcl:
        out["bfcl overall"] = {"correct": sum(bool(r["verdict"]) for r in bfcl), "total": len(bfcl)}
    sft = [r for r in records if r["kind"] == "sft" and r.get("tokens")]
    if sft:
        nll, tokens = sum(r["nll"] for r in sft), sum(r["tokens"] for r in sft)
        out["sft: loss"] = {"value": nll / tokens, "total": len(sft)}
        out["sft: perplexity"] = {"value": math.exp(min(nll / tokens, 50.0)), "total": len(sft)}
    prefs = [r for r in records if r["kind"] == "preference" and "margin" in r]
    if prefs:
        out["preference: accuracy"] = {"correct": sum(r["margin"] > 0 for r in prefs), "total": len(prefs)}
        out["preference: mean margin"] = {"value": sum(r["margin"] for r in prefs) / len(prefs), "total": len(prefs)}
    return out | summarize_decisions(records) | summarize_vl(records)


def _misses(model: Any, tokenizer: Any, items: list[Item], records: list[dict], chat: ChatTemplate, *, samples: int,
            temperature: float, seed: int, max_new_tokens: int, progress: bool) -> tuple[list[Miss], int]:  # fmt: skip
    """The wrong replies of the tool-call / no-call turns: the greedy ones, and with `samples` that many sampled
    replies per turn (prompt i seeded with seed + i). Returns (misses, turns generated for)."""
    from .generate import sample_generate

    turns = [i for i, it in enumerate(items) if it.kind in PAIRABLE]
    prompts = {i: _prompt_ids(items[i], tokenizer, chat.text) for i in turns}
    misses = []
    for i in turns:
        r = records[i]
        if r["verdict"] is False:
            misses.append(
                Miss(items[i], r["got"], r["_ids"], r["why"], prompts[i], cut=len(r["_ids"]) >= max_new_tokens)
            )
    if samples:
        sampled = sample_generate(model, tokenizer, [prompts[i] for i in turns], samples=samples,
                                  temperature=temperature, seed=seed, max_new_tokens=max_new_tokens,
                                  progress=progress)  # fmt: skip
        for k, (i, replies) in enumerate(zip(turns, sampled)):
            for j, ids in enumerate(replies):
                text = tokenizer.decode(ids, skip_special_tokens=False)
                verdict = _score_generation(items[i], text)
                if not verdict["ok"]:
                    how = {"temperature": temperature, "seed": seed + k}
                    misses.append(Miss(items[i], text, ids, verdict["why"], prompts[i], sample=j, meta=how,
                                       cut=len(ids) >= max_new_tokens))  # fmt: skip
    return misses, len(turns)


def evaluate(models: list[str] | str, data: list[str | Path] | str | Path, *, limit: int | None = None,
             batch_size: int = 8, max_new_tokens: int = 256, output: str | Path | None = None,
             bfcl_answers: str | Path | None = None, template: str | ChatTemplate = "model", progress: bool = True,
             labels: list[str] | None = None, turns: str = "first", pairs: str | Path | None = None,
             samples: int = 0, temperature: float | None = None, seed: int = 0,
             served_model: str | None = None) -> EvalResult:  # fmt: skip
    """Score each model on the same rows of `data`; with `output`, write eval.json and eval.md there (atomically).
    A model is anything `inference.resolve_trained` opens (run dir, adapter dir, model dir, hub id, .gguf, offline:…)
    or a TrainResult (its run dir), or the URL of an OpenAI-compatible server (http://…/v1; `served_model`: the name
    it serves the model by, when it lists several), scored over its API (`eval.endpoint`; each request seeded `seed`).
    `template`: the chat template rows are rendered with ('model': each model's own; a ChatTemplate: that one).
    `turns`: "first" scores each row's first assistant turn, "all" every assistant turn of a row with tools (one
    prompt per turn: the history up to it).
    `pairs`: write every wrong tool-call / no-call reply of the (one) model as a DPO pair to this jsonl (see
    `eval.pairs`; training rows only, never an eval split); `samples` K also samples K replies per turn at
    `temperature` (default 1.0), seeded from `seed`, one pair per distinct wrong reply."""
    from ..serve import load_for_inference, resolve_trained  # here: it imports torch (keeps `import qwentune` fast)

    models = list(models) if isinstance(models, (list, tuple)) else [models]
    models = [getattr(m, "run_dir", m) for m in models]  # a notebook's TrainResult stands for its run dir
    data = [data] if isinstance(data, (str, Path)) else list(data)
    if not models:
        raise QwentuneError("no model given", where="command line", hint="qwentune eval MODEL --data FILE")
    check_mining(models, data, pairs=pairs, samples=samples, temperature=temperature)
    items, skipped = collect(data, bfcl_answers=bfcl_answers, limit=limit, turns=turns, mining=pairs is not None)
    if pairs is not None and not any(it.kind in PAIRABLE for it in items):
        raise QwentuneError(
            "no turn to mine pairs from",
            where=", ".join(map(str, data)),
            hint="pairs come from rows with tools and the expected assistant turns (tool-call and no-call turns)",
        )
    if pairs is not None and any(map(is_endpoint, models)):
        raise QwentuneError("pairs are mined from a model loaded here (they need its tokenizer), not an endpoint",
                            where="--pairs", hint="mine with the model dir the server serves")  # fmt: skip
    # every MODEL resolves (an endpoint answers) before minutes of scoring start
    trained = [open_endpoint(m, served_model) if is_endpoint(m) else resolve_trained(str(m)) for m in models]
    if not all(t.is_vision for t in trained):  # a text model cannot see images; every model scores the same rows
        skipped += [Skipped(it.file, it.row, NEEDS_VISION) for it in items if it.kind == "vl"]
        items = [it for it in items if it.kind != "vl"]
        if not items:
            _nothing_scoreable(skipped, data)
    names = labels or [str(m) for m in models]
    result = EvalResult(models=names, data=[str(d) for d in data], skipped=[vars(s) for s in skipped], turns=turns,
                        scored=_scored(data, items))  # fmt: skip
    for name, spec in zip(names, trained):
        if isinstance(spec, Endpoint):
            result.rows[name] = spec.score(items, _score_generation, label=name, max_new_tokens=max_new_tokens,
                                           seed=seed, progress=progress)  # fmt: skip
            result.metrics[name] = summarize(result.rows[name])
            result.notes.append(spec.note(name))
            continue
        model, tokenizer = load_for_inference(spec)
        vision = vision_inputs(spec.model_path, spec.adapter_path, tokenizer) if spec.is_vision else None
        chat = template if isinstance(template, ChatTemplate) else load_template(template, tokenizer)
        records = _score_model(model, tokenizer, items, label=name, template=chat, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, progress=progress, vision=vision)  # fmt: skip
        if pairs is not None:
            misses, n_turns = _misses(model, tokenizer, items, records, chat, samples=samples, seed=seed,
                                      temperature=temperature or 1.0, max_new_tokens=max_new_tokens,
                                      progress=progress)  # fmt: skip
            result.pairs = mine_pairs(pairs, misses, n_turns, tokenizer, chat, model=str(models[0]))
        for record in records:
            record.pop("_ids", None)
        result.rows[name] = records
        result.metrics[name] = summarize(records)
        del model
        release_host_memory()  # the next model loads into what this one freed (glibc keeps it otherwise)
    if output is not None:
        result.write(Path(output))
    return result


def _scored(data: list, items: list[Item]) -> list[dict]:
    """Per data file: rows and turns scored."""
    return [{"file": str(d), "rows": len({it.row for it in items if it.file == str(d)}),
             "turns": sum(it.file == str(d) for it in items)} for d in data]  # fmt: skip


def evaluate_after_training(run_dir: str | Path, eval_section: Any, base_source: str, data_files: list[str | Path],
                            *, template: str | ChatTemplate = "model", progress: bool = True) -> dict:  # fmt: skip
    """Score the run's model (`run_dir/merged`, else its adapter on the base) and, when `eval_section.base`, the base
    `base_source`, on `eval_section.data` or, when that is empty, `data_files` (paths resolved by the caller).
    Writes run_dir/eval/eval.json + eval.md (every row) and run_dir/eval.md (the table the model card includes).
    Returns {"metrics": {"base": {...}, "tuned": {...}}, "markdown"/"table": the table, "summary", "data"}."""
    run_dir = Path(run_dir)
    data = [str(d) for d in (eval_section.data or data_files)]
    if not data:
        raise QwentuneError("no eval data", where="eval.data", hint="set eval.data or data.eval in the recipe")
    models, labels = [str(run_dir)], ["tuned"]
    if eval_section.base:
        models, labels = [base_source, *models], ["base", *labels]
    result = evaluate(models, data, limit=eval_section.limit, batch_size=eval_section.batch_size,
                      max_new_tokens=eval_section.max_new_tokens, output=run_dir / "eval", template=template,
                      progress=progress, labels=labels)  # fmt: skip
    markdown = result.markdown()
    atomic_write_text(run_dir / "eval.md", markdown)
    summary = result.summary(held_out=True)
    return {"metrics": result.metrics, "markdown": markdown, "table": result.table(), "summary": summary, "data": data}


# ------------------------------------------------------------------------------------ older entry points (kept)


@dataclass
class ToolCallScore:
    total: int = 0
    correct: int = 0
    tagged: int = 0
    valid_json: int = 0
    samples: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"total": self.total, "correct": self.correct, "tagged": self.tagged, "valid_json": self.valid_json,
                "accuracy": round(self.accuracy, 4), "samples": self.samples}  # fmt: skip


def tool_call_accuracy(model_dir: str | Path, data_file: str | Path, *, limit: int = 12, max_new_tokens: int = 160,
                       **_: Any) -> ToolCallScore:  # fmt: skip
    """Exact tool-call matches of greedy replies on the first `limit` tool-call rows of `data_file`."""
    result = evaluate([str(model_dir)], [data_file], limit=limit, max_new_tokens=max_new_tokens, progress=False)
    rows = [r for r in result.rows[str(model_dir)] if r["kind"] == "tool_call"]
    return ToolCallScore(
        total=len(rows),
        correct=sum(bool(r["verdict"]) for r in rows),
        tagged=sum(bool(r.get("tagged")) for r in rows),
        valid_json=sum(bool(r.get("valid_json")) for r in rows),
        samples=[{k: r.get(k) for k in ("prompt", "expected", "got", "verdict", "why")} for r in rows[:8]],
    )


def preference_margin(model_dir: str | Path, data_file: str | Path, *, limit: int = 20, **_: Any) -> dict:
    """Mean log p(chosen) − log p(rejected) and the share of pairs where chosen wins, on the first `limit` pairs."""
    result = evaluate([str(model_dir)], [data_file], limit=limit, progress=False)
    margins = [r["margin"] for r in result.rows[str(model_dir)] if "margin" in r]
    return {
        "pairs": len(margins),
        "mean_margin": sum(margins) / max(len(margins), 1),
        "chosen_preferred": sum(m > 0 for m in margins) / max(len(margins), 1),
    }
