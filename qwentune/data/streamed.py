"""data.streaming: train rows read, rendered and counted as training reads them, never all held or mapped first.

    each source's rows as read (`sources.read_source`) ──► a seeded buffer shuffle (data.shuffle_buffer; 0: file
    order) ──► the mapped path's own per-row step (`mapped.process_batch`: convert, render, fit) ──► bad rows counted
    by reason at their line (`report.count_skipped`) ──► kept rows, one entry after another: weighted entries are
    interleaved by drawing an entry per row with probabilities from the weights (shares sampled, not exact).

The stream never ends: an entry read to its end starts its next pass (reshuffled with (seed, entry, pass)); the
Trainer stops at training.max_steps. The first pass over a source counts its rows; later passes only count how many
rows were drawn again (`repeated`).

Resume. Every `rows_per_step` rows the stream notes where it is: per entry its pass and how many rows of the pass
(shuffled order) were taken, the mix's generator state, and the counters. A checkpoint saves the note of its step
(`qwentune-stream.json`, `StreamCheckpoints`); `--resume` reads each entry's pass again, without parsing or
rendering, up to that place (the shuffle buffer is rebuilt exactly, its seed is known), restores the generator and
the counters, and goes on: the resumed run trains on the same rows in the same order as an uninterrupted one.

The Trainer's own skipping is used for its bookkeeping, not for the rows: it would iterate the batches already trained
on and drop them (accelerate's `skip_first_batches`: every row read and rendered again). sft.py replaces its
documented hook `get_resumed_dataloader` by one that returns the dataloader as it is (the stream already starts at the
checkpoint's row). `ignore_data_skip` is not used: with it the Trainer restores the RNG state before the dataloader's
iterator draws its seed from it, so dropout would differ from the uninterrupted run; on the skipping path it restores
the RNG at the first batch, as for mapped rows.
"""

from __future__ import annotations

import collections
import copy
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ..errors import BadRow, QwentuneError
from ..files import atomic_write_json
from ..logs import process_state
from ..recipe import DataSection
from ..rows import DETECT_ROWS, ChatTemplate, ImageSettings
from .mapped import process_batch, row_options
from .raw import _detect
from .report import DataReport, count_skipped, new_report, refuse_empty, refuse_image_rows, refuse_tool_rows
from .sources import Source, check_columns, read_source, resolve_sources, smallest, take_rows

STATE_FILE = "qwentune-stream.json"  # in each checkpoint dir: where the stream was at that step
RENDER_ROWS = 64  # raw rows rendered at a time
NOTES_KEPT = 256  # steps whose place is kept: the DataLoader reads a few batches ahead of the step trained
HEAD_ROWS = 64  # the first train rows at hand: special-token check, merge parity rows, sample prompt
FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),
    }
)
WHOLE_FILE_KINDS = ("json", "csv")  # read whole before their first row


class _Entry:
    """One stream of rows: a weighted data.train entry, or (no weights) every data.train source in order."""

    def __init__(self, index: int, sources: list[int], stream: Stream):
        self.index, self.sources, self.s = index, sources, stream
        self.epoch, self.taken = 0, 0  # the pass, and rows of it (shuffled order, blank lines included) taken

    def _read(self) -> Iterator[tuple[int, int, str | BadRow | None]]:
        s = self.s
        for i in self.sources:
            source = s.sources[i]
            for index, text in take_rows(read_source(source, streaming=True), smallest(s.limit, source.limit)):
                yield i, index, text

    def _shuffled(self, epoch: int) -> Iterator[tuple[int, int, str | BadRow | None]]:
        """The pass's rows in the order they are taken: file order, or a buffer shuffle seeded by (seed, entry,
        pass) — the same order every time the pass is read."""
        size = self.s.data.shuffle_buffer
        if not size:
            yield from self._read()
            return
        rng = np.random.default_rng([self.s.data.seed, self.index, epoch])
        buffer: list = []
        for item in self._read():
            if len(buffer) < size:
                buffer.append(item)
                continue
            j = int(rng.integers(size))
            buffer[j], item = item, buffer[j]
            yield item
        for j in rng.permutation(len(buffer)).tolist():
            yield buffer[j]

    def rows(self) -> Iterator[dict]:
        """Kept rows forever, from (self.epoch, self.taken): the rows taken before are read again, not rendered."""
        s = self.s
        while True:
            items = self._shuffled(self.epoch)
            for _ in range(self.taken):  # resuming: back to the place the checkpoint noted
                if next(items, None) is None:
                    break
            while True:
                chunk = [item for _, item in zip(range(RENDER_ROWS), items)]
                if not chunk:
                    break
                for row in s.render(chunk, counting=self.epoch == 0, again=self.epoch > 0):
                    self.taken += 1
                    if row is not None:
                        yield row
            reports = [s.reports[i] for i in self.sources]
            if self.epoch == 0 and not sum(r.kept for r in reports):  # (the counters: a resumed pass went on)
                refuse_empty(reports, sum(r.total for r in reports), "train", s.data.max_length)
            self.epoch, self.taken = self.epoch + 1, 0


class Stream:
    """The train rows of data.streaming, with their counters (`reports`, one per source) and their place."""

    def __init__(
        self,
        data: DataSection,
        sources: list[Source],
        formats: list[str],
        opts: Any,
        tokenizer: Any,
        template: ChatTemplate,
        tools: list | None,
        limit: int | None,
    ):
        self.data, self.sources, self.opts, self.limit = data, sources, opts, limit
        self.tokenizer, self.template, self.tools = tokenizer, template, tools
        self.reports = [new_report(x, fmt, "train") for x, fmt in zip(sources, formats)]
        for report, x in zip(self.reports, sources):
            report.streamed = True
            report.drawn = 0
            report.weight = x.weight
        entries = sorted({x.entry for x in sources})
        self.weighted = sources[0].weight is not None
        groups = [[i for i, x in enumerate(sources) if x.entry == e] for e in entries] if self.weighted else None
        self.entries = [_Entry(e, g, self) for e, g in zip(entries, groups)] if groups else [
            _Entry(0, list(range(len(sources))), self)
        ]  # fmt: skip
        weights = np.asarray([sources[g[0]].weight for g in groups], dtype=np.float64) if groups else np.ones(1)
        self.probabilities = weights / weights.sum()
        self.rng = np.random.default_rng(data.seed)  # the entry drawn for each row (the entries: [seed, entry, pass])
        self.key = uuid.uuid4().hex
        self.rows_per_step = 1
        self.consumed = 0  # rows handed to training so far (from the resumed place on)
        self.notes: collections.OrderedDict[int, dict] = collections.OrderedDict()

    # --- rows ------------------------------------------------------------------------------------------------------

    def render(self, chunk: list, *, counting: bool, again: bool) -> Iterator[dict | None]:
        """Each raw row of `chunk` through the mapped path's per-row step, in order: its kept row, or None (a blank
        line, a skipped row). `counting`: the first pass, every row counted; `again`: a later pass (repeats)."""
        real = [(i, index, text) for i, index, text in chunk if text is not None]
        out = process_batch(
            {
                "_raw": [t if isinstance(t, str) else "" for _, _, t in real],
                "_src": [i for i, _, _ in real],
                "_read_bad": [t.reason if isinstance(t, BadRow) else "" for _, _, t in real],
                "_read_detail": [t.detail if isinstance(t, BadRow) else "" for _, _, t in real],
            },
            opts=self.opts,
            tokenizer=self.tokenizer,
            template=self.template,
        )
        k = 0
        for i, index, text in chunk:
            report = self.reports[i]
            if text is None:
                report.blank_lines += counting
                yield None
                continue
            reason, detail = out["_bad_reason"][k], out["_bad_detail"][k]
            if reason == "tools_unsupported":
                refuse_tool_rows((1, i, index), 1, self.reports, self.template, self.tools, "train")
            if reason == "images_unsupported":
                refuse_image_rows((1, i, index), 1, self.reports, "train")
            if counting:
                report.total += 1
                if reason:
                    count_skipped(report, index, reason, detail, self.data)
                else:
                    report.kept += 1
                    report.truncated += bool(out["_truncated"][k])
            row = None if reason else {c: out[c][k] for c in FEATURES}
            k += 1
            if row is not None:
                report.drawn += 1
                report.repeated += again
            yield row

    def __iter__(self) -> Iterator[dict]:
        rows = [e.rows() for e in self.entries]
        many = len(rows) > 1
        while True:
            pick = int(self.rng.choice(len(rows), p=self.probabilities)) if many else 0
            row = next(rows[pick])
            self.consumed += 1
            if self.consumed % self.rows_per_step == 0:  # the entries are paused just after this row
                self.notes[self.consumed] = self._note()
                while len(self.notes) > NOTES_KEPT:
                    self.notes.popitem(last=False)
            yield row

    def _note(self) -> dict:
        return {
            "rows": self.consumed,
            "entries": [{"pass": e.epoch, "taken": e.taken} for e in self.entries],
            "rng": copy.deepcopy(self.rng.bit_generator.state),
            "reports": [r.to_dict() for r in self.reports],
        }

    def __reduce__(self):
        """datasets hashes a generator's arguments by pickling them: this key stands for the stream (its tokenizer
        and place are not copied). Unpickled, it refuses: a stream is read in the process that owns it."""
        return _not_copied, (self.key,)

    def dataset(self) -> datasets.IterableDataset:
        return datasets.IterableDataset.from_generator(_generate, features=FEATURES, gen_kwargs={"stream": self})

    def head(self, count: int = HEAD_ROWS) -> datasets.Dataset:
        """The stream's first `count` kept rows, from a fresh copy of it (this stream's counters do not move)."""
        fresh = Stream(self.data, self.sources, [r.detected_format for r in self.reports], self.opts,
                       self.tokenizer, self.template, self.tools, self.limit)  # fmt: skip
        rows = [row for _, row in zip(range(count), fresh)]
        return datasets.Dataset.from_list(rows, features=FEATURES)

    # --- the place in a checkpoint ---------------------------------------------------------------------------------

    def note_at(self, rows: int) -> dict:
        """Where the stream was when training had taken `rows` rows."""
        if rows not in self.notes:
            raise RuntimeError(f"the stream kept no note at {rows} rows (kept: {list(self.notes)[:3]}…)")
        return self.notes[rows]

    def resume(self, checkpoint: Path) -> None:
        """Start from the place `checkpoint` noted (its counters included)."""
        path = checkpoint / STATE_FILE
        try:
            note = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise QwentuneError(
                f"cannot read the stream's place: {e}",
                where=str(path),
                hint="a checkpoint of a data.streaming run holds it; start over without --resume",
            ) from None
        for entry, place in zip(self.entries, note["entries"]):
            entry.epoch, entry.taken = place["pass"], place["taken"]
        self.rng.bit_generator.state = note["rng"]
        self.consumed = note["rows"]
        for report, saved in zip(self.reports, note["reports"]):
            _restore(report, saved)


def _not_copied(key: str):
    raise RuntimeError(f"stream {key}: a data.streaming stream is read only in the process that made it")


def _generate(stream: Stream) -> Iterator[dict]:
    yield from stream


def _restore(report: DataReport, saved: dict) -> None:
    for name in ("total", "kept", "truncated", "blank_lines", "drawn", "repeated"):
        setattr(report, name, saved[name])
    report.skipped = dict(saved["skipped"])
    report.examples = {k: [tuple(e) for e in v] for k, v in saved["examples"].items()}


def stream_train(
    d: DataSection,
    method: str,
    base_dir: Path,
    tokenizer: Any,
    template: ChatTemplate,
    tools: list | None,
    images: ImageSettings | None,
    limit: int | None,
) -> Stream:
    """data.train as a Stream: the sources resolved and each one's format detected from its first rows (only those
    are read now); what a stream cannot do is refused first, in one line."""
    if images is not None:
        raise QwentuneError(
            "data.streaming does not work with a vision model (Qwen2-VL)",
            where="data.streaming",
            hint="set data.streaming: false",
        )
    processes = process_state().num_processes
    if processes > 1:
        raise QwentuneError(
            f"data.streaming runs in one process; this run has {processes}",
            where="data.streaming",
            hint="train in one process, or set data.streaming: false (mapped rows are shared across processes)",
        )
    sources = resolve_sources(d, base_dir, "train")
    for x in sources:
        if x.kind in WHOLE_FILE_KINDS:
            raise QwentuneError(
                f"{x.label}: a .{x.kind} file is read whole before its first row, so it cannot be streamed",
                where=x.key,
                hint="convert it to .jsonl or .parquet, or set data.streaming: false",
            )
    formats = []
    for x in sources:
        forced = x.format or d.format
        check_columns(x, forced)
        first = []
        for _, text in take_rows(read_source(x, streaming=True), smallest(limit, x.limit, DETECT_ROWS)):
            if isinstance(text, str):
                first.append(text)
        if not first:
            raise QwentuneError(f"{x.label} has no rows", where=x.key, hint="check the file")
        formats.append(_detect(x, forced, method, first))
    opts = row_options(d, method, list(zip(formats, sources)), tools, images, tokenizer)
    return Stream(d, sources, formats, opts, tokenizer, template, tools, limit)


class StreamCheckpoints:
    """What the Trainer callback of a streamed run does (`stream_callbacks` makes it a TrainerCallback; transformers
    is imported with the trainer): each checkpoint gets the stream's place at its step; at the end of training the
    counters of the rows trained on go to data_report.json (and into `reports`, in place)."""

    def __init__(self, stream: Stream, run_dir: Path, reports: list[dict], rows_per_step: int):
        self.stream, self.run_dir, self.reports = stream, run_dir, reports
        stream.rows_per_step = rows_per_step

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            note = self.stream.note_at(state.global_step * self.stream.rows_per_step)
            atomic_write_json(Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE, note)

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        rows = state.global_step * self.stream.rows_per_step
        counted = self.stream.note_at(rows)["reports"] if rows else [r.to_dict() for r in self.stream.reports]
        self.reports[: len(counted)] = counted  # the eval reports follow the train reports
        atomic_write_json(self.run_dir / "data_report.json", self.reports)


def stream_callbacks(data: Any, run_dir: Path, reports: list[dict], checkpoint: Path | None, rows_per_step: int):
    """[the StreamCheckpoints callback] for a streamed run (its place restored from `checkpoint`), else []."""
    if data.stream is None:
        return []
    from transformers import TrainerCallback

    class StreamCallback(StreamCheckpoints, TrainerCallback):
        pass

    if checkpoint is not None:
        data.stream.resume(checkpoint)
    return [StreamCallback(data.stream, run_dir, reports, rows_per_step)]


__all__ = ["STATE_FILE", "Stream", "StreamCheckpoints", "stream_callbacks", "stream_train"]
