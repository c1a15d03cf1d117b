"""Padding share of the bundled SFT data as training batches it: unpacked (random order, as `training.shuffle`),
length-grouped (`sft.group_by_length`, transformers' LengthGroupedSampler) and packed (`sft.packing`: TRL's BFD
packing into bins of `data.max_length`, batched padding-free). No model is built; rows are rendered and masked by
qwentune's own data pipeline.

    python benchmarks/padding.py [--max-length 2048] [--batch-sizes 1 4 8] [--files data/tool_calls.jsonl ...]

Padding share = pad tokens / tokens in the batch tensors (what the model runs over). Trained share = tokens with a
label / real tokens (what the loss reads; the fused head scores only these on our path).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FILES = ("data/tool_calls.jsonl", "data/instructions.jsonl")


def tokenizer_dir(target: Path) -> Path:
    """A model source with the real Qwen2.5 tokenizer, its official instruct template and a config (no weights)."""
    from transformers import AutoTokenizer

    from qwentune.model.shapes import tiny_config

    tok = AutoTokenizer.from_pretrained(ROOT / "tests/assets/qwen2.5-tokenizer")
    tok.chat_template = (ROOT / "qwentune/templates/qwen2.5-instruct.jinja").read_text()
    tok.save_pretrained(target)
    tiny_config("qwen2.5-0.5b-instruct").save_pretrained(target)
    return target


def rows_of(files: list[str], max_length: int, source: Path) -> tuple[list[int], list[int]]:
    """(lengths, trained token counts) of the rows training would see."""
    import qwentune

    recipe = {"model": {"source": str(source)}, "data": {"train": list(files), "max_length": max_length}}
    data = qwentune.prepare(recipe)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    trained = [sum(label != -100 for label in labels) for labels in data.train["labels"]]
    return lengths, trained


def padded_share(batches: list[list[int]]) -> float:
    real = sum(sum(b) for b in batches)
    total = sum(len(b) * max(b) for b in batches)
    return 1 - real / total


def random_batches(lengths: list[int], batch: int, seed: int = 42) -> list[list[int]]:
    import torch

    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    return [[lengths[i] for i in order[k : k + batch]] for k in range(0, len(order), batch)]


def grouped_batches(lengths: list[int], batch: int, seed: int = 42) -> list[list[int]]:
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    sampler = LengthGroupedSampler(batch, lengths=lengths, generator=torch.Generator().manual_seed(seed))
    order = list(sampler)
    return [[lengths[i] for i in order[k : k + batch]] for k in range(0, len(order), batch)]


def packed_bins(lengths: list[int], max_length: int) -> list[int]:
    """Bin lengths from TRL's own BFD packing (what SFTTrainer runs with packing=True)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    ds = Dataset.from_dict({"input_ids": [[0] * n for n in lengths], "labels": [[0] * n for n in lengths]})
    packed = pack_dataset(ds, max_length, "bfd")
    return [len(ids) for ids in packed["input_ids"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", default=list(FILES))
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()

    tmp = Path(tempfile.mkdtemp(prefix="qwentune-padding-"))
    try:
        source = tokenizer_dir(tmp / "tokenizer")
        for file in args.files:
            lengths, trained = rows_of([str(ROOT / file)], args.max_length, source)
            report(file, lengths, trained, args)
        if len(args.files) > 1:
            lengths, trained = rows_of([str(ROOT / f) for f in args.files], args.max_length, source)
            report(" + ".join(args.files), lengths, trained, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(name: str, lengths: list[int], trained: list[int], args) -> None:
    bins = packed_bins(lengths, args.max_length)
    mean = sum(lengths) / len(lengths)
    print(
        f"\n{name}: {len(lengths)} rows, {sum(lengths)} tokens, length mean {mean:.0f} / max {max(lengths)}, "
        f"trained share {sum(trained) / sum(lengths):.1%}"
    )
    print(f"packed (BFD, max_length {args.max_length}): {len(bins)} bins of mean {sum(bins) / len(bins):.0f} tokens")
    print(
        f"{'batch':>5}  {'unpacked':>9}  {'group_by_length':>15}  {'packed, padding-free':>20}  {'(bins padded)':>13}"
    )
    for b in args.batch_sizes:
        print(
            f"{b:>5}  {padded_share(random_batches(lengths, b)):>9.1%}  "
            f"{padded_share(grouped_batches(lengths, b)):>15.1%}  {0.0:>20.1%}  "
            f"{padded_share(random_batches(bins, b)):>13.1%}"
        )


if __name__ == "__main__":
    sys.exit(main())
