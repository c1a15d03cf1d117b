"""data.streaming at two file sizes: the time to the first row, rows per second (and per CPU-second) rendered with
exact masks, and the anonymous memory (RssAnon) after each count of rows read, in one fresh process per file.

    python benchmarks/streaming.py [--sizes 10000,100000] [--read 1000,4000] [--workdir DIR]

The rows are `scale.make_rows`' unique tool sessions and instructions (the Qwen2.5 tokenizer, official template, the
bundled tools). Memory flat in rows: RssAnon after --read rows does not grow with the rows read, nor with the file's
size (only the first rows of each file are read before training).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

CHILD = """
import itertools, json, os, resource, sys, time
sys.path.insert(0, {tests!r})
from tiny_models import shared_tokenizer
from qwentune.data.pipeline import prepare_data
from qwentune.recipe.load import load_recipe

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

tok = shared_tokenizer("qwen2.5-instruct")
r = load_recipe({{"model": {{"source": "x"}}, "data": {{"train": [{path!r}], "streaming": True,
                 "tools": {tools!r}}}, "training": {{"max_steps": 1}}}})
t0, c0 = time.monotonic(), cpu()
prepared = prepare_data(r.data, r.method, r.base_dir, tok, quiet=True, streaming=True)
out = {{"first_row_s": time.monotonic() - t0, "points": []}}
stream, done = iter(prepared.train), 0
t1, c1 = time.monotonic(), cpu()
for n in {reads!r}:
    for _ in itertools.islice(stream, n - done):
        pass
    done = n
    wall, used = time.monotonic() - t1, cpu() - c1
    out["points"].append({{"rows": n, "rows_per_s": n / wall, "rows_per_cpu_s": n / used, "anon_mb": anon_mb()}})
print(json.dumps(out))
"""


def main() -> None:
    from scale import make_rows

    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--read", default="1000,4000")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "qwentune-streaming-bench"))
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    reads = [int(x) for x in args.read.split(",")]
    print("| file rows | time to first row s | rows read | rows/s | rows per CPU-s | RssAnon MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size in (int(x) for x in args.sizes.split(",")):
        path = work / f"rows-{size}.jsonl"
        make_rows(path, size)
        script = CHILD.format(tests=str(ROOT / "tests"), path=str(path), tools=str(ROOT / "data/tools.json"),
                              reads=reads)  # fmt: skip
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        out = json.loads(done.stdout.strip().splitlines()[-1])
        for p in out["points"]:
            print(f"| {size:,} | {out['first_row_s']:.1f} | {p['rows']:,} | {p['rows_per_s']:.0f} | "
                  f"{p['rows_per_cpu_s']:.0f} | {p['anon_mb']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
