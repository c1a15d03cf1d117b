"""GRPO's prompts: one per expected assistant turn of each data row, picked as `qwentune eval --turns all` picks them
(`eval.expected_turns`: every trained assistant turn that answers a user message or tool results) and rendered
exactly as eval and inference render them (`eval.prompt_text`: the history up to the turn and the row's tools through
the template, with the generation prompt; tokenized without special tokens added). The turn itself is the prompt's
reference: what its rewards score the sampled completions against.

Rows are read as training reads them (`data.read_split`: files, folders, save_to_disk dirs, hub ids, data in memory,
with data.limit, data.tools and data.system_prompt), and every prompt is accounted for in data_report.json: kept, or
skipped by reason. A prompt is never cut: one longer than data.max_length − grpo.max_completion_length is skipped as
`over_length` (a left cut, as TRL's old max_prompt_length made, would remove the tools block). data.train_on: last
keeps each row's last expected turn only.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets

from ..data import PreparedData, default_tools, read_split
from ..errors import BadRow, QwentuneError, json_error_text
from ..eval import expected_turns, prompt_text
from ..recipe import DataSection, Recipe
from ..rows import ChatTemplate, convert, has_images, load_template, needs_tools

COLUMNS = ("prompt", "prompt_input_ids", "reference", "tools")  # what the GRPO trainer and its rewards read
FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),  # the rendered text TRL tokenizes back into prompt_input_ids
        "prompt_input_ids": datasets.List(datasets.Value("int32")),
        "reference": datasets.Value("string"),  # the expected assistant message, as JSON
        "tools": datasets.Value("string"),  # the row's tools as a JSON list, "" for none
    }
)
OVER_LENGTH = "over_length"
BATCH = 512  # raw rows rendered and tokenized at a time
EXAMPLES = 3  # first rows kept per skip reason


@dataclass
class PromptReport:
    """One source's rows in one split: how many prompts they gave, and what was skipped by reason (a prompt over the
    length budget, or a row that gives none). total = kept + sum(skipped); `rows` counts the data rows read."""

    source: str
    detected_format: str
    split: str = "train"
    index_kind: str = "line"
    rows: int = 0
    total: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    truncated: int = 0  # never: prompts are not cut (a key of data_report.json rows)
    blank_lines: int = 0
    unit: str = "prompts"  # what kept / total count (the model card says it)

    def where(self, index: int) -> str:
        return f"{self.source}:{index}" if self.index_kind == "line" else f"{self.source} row {index}"

    def skip(self, reason: str, index: int, detail: str, data: DataSection) -> None:
        if reason == OVER_LENGTH and data.overlong == "error":
            raise QwentuneError(f"prompt is too long: {detail}", where=self.where(index),
                                hint="raise data.max_length, lower grpo.max_completion_length, or set "
                                "data.overlong: drop to skip such prompts")  # fmt: skip
        if reason != OVER_LENGTH and data.bad_rows == "error":
            raise QwentuneError(f"bad row ({reason}): {detail}", where=self.where(index),
                                hint="fix the row, or set data.bad_rows: skip to count and skip it")  # fmt: skip
        self.total += 1
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples.setdefault(reason, [])) < EXAMPLES:
            self.examples[reason].append((index, detail))

    def summary(self) -> str:
        lines = [f"{self.source} [{self.split}] format {self.detected_format}: {self.rows} rows → {self.kept} of "
                 f"{self.total} prompts kept (one per expected turn)"]  # fmt: skip
        for reason, count in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
            shown = ", ".join(f"{self.index_kind} {i}" + (f" ({d})" if d and k == 0 else "")
                              for k, (i, d) in enumerate(self.examples.get(reason, [])))  # fmt: skip
            lines.append(f"  skipped {count} {reason}: {shown}" + (", …" if count > EXAMPLES else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self) | {"examples": {k: [list(e) for e in v] for k, v in self.examples.items()}}


def prepare_prompts(recipe: Recipe, tokenizer: Any, *, limit: int | None = None, quiet: bool = False) -> PreparedData:
    """data.train (and data.eval) as GRPO prompt rows (`COLUMNS`), with a report per source and split; prints the
    reports to stderr unless `quiet`. Raises QwentuneError when a split gives no prompt."""
    d = recipe.data
    template = load_template(d.template, tokenizer)
    tools = default_tools(recipe.data, recipe.base_dir)
    budget = d.max_length - recipe.grpo.max_completion_length
    out: dict[str, datasets.Dataset] = {}
    reports: list[PromptReport] = []
    for which in ("train", "eval") if d.eval else ("train",):
        limits = [x for x in (limit, d.limit, d.eval_limit if which == "eval" else None) if x is not None]
        raw = read_split(d, "grpo", recipe.base_dir, which, min(limits, default=None))
        try:
            split = [PromptReport(x.source.label, x.fmt, which, x.source.index_kind, blank_lines=x.blank_lines)
                     for x in raw.sources]  # fmt: skip
            columns = _render(raw, split, d, tokenizer, template, tools, budget)
        finally:
            raw.close()
        reports += split
        if not columns["prompt"]:
            _refuse_empty(split, which)
        out[which] = datasets.Dataset.from_dict(columns, features=FEATURES)
    if not quiet:
        for report in reports:
            print(report.summary(), file=sys.stderr)
    return PreparedData(out["train"], out.get("eval"), reports, template, "grpo")  # type: ignore[arg-type]


def _render(raw, reports: list[PromptReport], d: DataSection, tokenizer: Any, template: ChatTemplate,
            tools: list | None, budget: int) -> dict[str, list]:  # fmt: skip
    """The prompt columns of one split's raw rows; every row and prompt counted in `reports`."""
    columns: dict[str, list] = {c: [] for c in COLUMNS}
    for batch in raw.dataset.iter(batch_size=BATCH):
        found = []  # (report, row index, item, text)
        for text, src, index, bad, detail in zip(*(batch[c] for c in ("_raw", "_src", "_row", "_read_bad",
                                                                      "_read_detail"))):  # fmt: skip
            report = reports[src]
            report.rows += 1
            try:
                if bad:  # a line that cannot be a row (bad_encoding, csv_malformed)
                    raise BadRow(bad, detail)
                row = _canonical(text, raw.sources[src], tools, d.system_prompt, template, report.where(index))
                items = expected_turns(report.source, index, row)
            except BadRow as why:
                report.skip(why.reason, index, why.detail, d)
                continue
            for item in items[-1:] if d.train_on == "last" else items:
                try:
                    found.append((report, index, item, prompt_text(item, tokenizer, template.text)))
                except Exception as exc:  # jinja's TemplateError, or a template tripping over unusual data
                    report.skip("template_error", index, f"{type(exc).__name__}: {exc}", d)
        ids = tokenizer([f[3] for f in found], add_special_tokens=False)["input_ids"] if found else []
        for (report, index, item, text), prompt_ids in zip(found, ids):
            if len(prompt_ids) > budget:
                report.skip(OVER_LENGTH, index, f"turn {item.turn}: a {len(prompt_ids)}-token prompt, over "
                            f"{budget} = data.max_length − grpo.max_completion_length", d)  # fmt: skip
                continue
            report.total += 1
            report.kept += 1
            columns["prompt"].append(text)
            columns["prompt_input_ids"].append(prompt_ids)
            columns["reference"].append(json.dumps(item.reply, ensure_ascii=False, default=str))
            columns["tools"].append(json.dumps(item.tools, ensure_ascii=False, default=str) if item.tools else "")
    return columns


def _canonical(text: str, read: Any, tools: list | None, system_prompt: str | None, template: ChatTemplate,
               where: str) -> dict:  # fmt: skip
    """The canonical conversation row of one raw row, as training converts it (data.tools, data.system_prompt)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRow("invalid_json", json_error_text(e)) from None
    row = convert(raw, read.fmt, arrow=read.source.arrow, tools=tools, system_prompt=system_prompt)
    if has_images(row):
        raise BadRow("images_not_supported", "GRPO prompts are text only")
    if not template.supports_tools and needs_tools(row):
        raise QwentuneError(
            f"the row uses tools, but chat template '{template.name}' has no tool support",
            where=where,
            hint="use a template with tools (data.template: qwen2.5-instruct) or data without tools",
        )
    return row


def _refuse_empty(reports: list[PromptReport], split: str) -> None:
    reasons = {}
    for r in reports:
        for reason, n in r.skipped.items():
            reasons[reason] = reasons.get(reason, 0) + n
    seen = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    raise QwentuneError(
        f"no prompt with a reference turn in data.{split}" + (f" (skipped: {seen})" if seen else ""),
        where=", ".join(r.source for r in reports) or f"data.{split}",
        hint="GRPO needs conversation rows whose assistant turns answer a user message or tool results; "
        "over_length: raise data.max_length or lower grpo.max_completion_length",
    )


__all__ = ["COLUMNS", "PromptReport", "prepare_prompts"]
