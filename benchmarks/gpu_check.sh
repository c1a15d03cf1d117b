#!/usr/bin/env bash
# The GPU check of issue 17, one script (about 8 minutes on one H100/H200):
#   1. 3B-shape QLoRA SFT at seq 2048: qwentune against TRL+PEFT defaults, same rows, same run (tokens/s, peak VRAM,
#      MFU) — benchmarks/train_throughput.py --shape 3b --peft qlora --seq 2048;
#   2. the qwentune arm again with `trainer.use_liger_kernel: true` (skipped, with a note, without liger-kernel);
#   3. `qwentune estimate` of that recipe against the measured peak;
#   4. 0.5B-shape LoRA SFT with sft.packing against TRL+PEFT;
# then one table. Models are random-weight copies of the real structures: nothing is downloaded.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --shape tiny    # the same steps on the tiny shape, few steps: a CPU dry run
#
# Several GPUs (issue 29), instead of the above: every launch/ config (DDP, FSDP2, DeepSpeed ZeRO-2/3 with and without
# offload) × LoRA/QLoRA on N GPUs against one GPU with accumulation N, each stopped by SIGTERM after a checkpoint and
# resumed (benchmarks/multi_process.py; 0.5B shape; one table: config, tokens/s, peak memory per GPU, adapter and
# merged difference vs one GPU, adapter complete, resumed from):
#   bash benchmarks/gpu_check.sh --gpus N
#   bash benchmarks/gpu_check.sh --shape tiny --gpus 2   # its CPU dry run: FSDP LoRA on 2 CPU processes (gloo),
#                                                        # ~1.5 min on 2 cores (tests/test_sharded.py runs it)
#
# The GPU machine has torch/transformers/peft/accelerate but not trl, bitsandbytes, datasets (+ dill, multiprocess)
# or liger-kernel: carry them as wheels in .whl/ (see the device notes); this script installs a .whl/ dir it finds
# into /tmp/site and puts it first on PYTHONPATH. Results (json, logs) go to $OUT/gpu_check or a temp dir.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

SHAPE=3b SMALL=0.5b SEQ=2048 STEPS=8 BATCH=4 DEVICE=cuda LIMIT=300 GPUS=
while [ $# -gt 0 ]; do
  case "$1" in
    --shape) shift; [ "${1:-}" = tiny ] || { echo "--shape takes: tiny (the CPU dry run)"; exit 2; }
             SHAPE=tiny SMALL=tiny SEQ=512 STEPS=3 BATCH=2 DEVICE=cpu LIMIT=600 ;;
    --gpus) shift; [[ "${1:-}" =~ ^[1-9][0-9]*$ ]] || { echo "--gpus takes a number of GPUs"; exit 2; }; GPUS=$1 ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--shape tiny] [--gpus N]"; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing the carried wheels in .whl/ into /tmp/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RES=${OUT:-$(mktemp -d)}/gpu_check
mkdir -p "$RES"
START=$SECONDS
if [ "$DEVICE" = cuda ] && ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device: run with --shape tiny for the CPU dry run"; exit 2
fi
$PY - <<'EOF'
import importlib.metadata as m, torch
names = ("torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "datasets", "liger-kernel", "deepspeed")
def version(n):
    try:
        return m.version(n)
    except m.PackageNotFoundError:
        return "-"
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
      "|", ", ".join(f"{n} {version(n)}" for n in names))
EOF

if [ -n "$GPUS" ]; then  # the multi-GPU part only (or its CPU dry run)
  if [ "$DEVICE" = cpu ]; then
    MULTI=(--shape tiny --device cpu --processes "$GPUS" --configs fsdp --peft lora)
  else
    MULTI=(--shape 0.5b --device cuda --processes "$GPUS" --resume --steps 6)
    $PY -c "import deepspeed" 2>/dev/null || MULTI+=(--configs ddp fsdp)  # ZeRO rows need deepspeed
  fi
  echo "== several processes: multi_process.py ${MULTI[*]}"
  nice -n 10 $PY benchmarks/multi_process.py "${MULTI[@]}" --out "$RES/multi" --json-out "$RES/multi.json"
  STATUS=$?
  echo "results: $RES ($((SECONDS - START)) s)"
  exit $STATUS
fi

bench() {  # bench NAME ARGS...: one train_throughput.py run, its json in $RES/NAME.json
  local name=$1; shift
  echo "== $name: train_throughput.py $*  ($((SECONDS - START)) s so far)"
  timeout "$LIMIT" $PY benchmarks/train_throughput.py "$@" --json-out "$RES/$name.json" 2>&1 | tee "$RES/$name.log" \
    | grep -v "^Failed to load CPU gemm_4bit" | tail -n 12
  [ -s "$RES/$name.json" ] || echo "$name: no result (see $RES/$name.log)"
}

QLORA=(--shape "$SHAPE" --peft qlora --seq "$SEQ" --steps "$STEPS" --batch "$BATCH")
[ "$SHAPE" = tiny ] || QLORA+=(--allow-cpu-3b)
bench qlora "${QLORA[@]}"
if $PY -c "import liger_kernel" 2>/dev/null; then
  bench liger "${QLORA[@]}" --arms qwentune --trainer use_liger_kernel=true
else
  echo "== liger: skipped (liger-kernel is not importable here; carry its wheel in .whl/ to run it)" \
    | tee "$RES/liger.skipped"
fi

echo "== estimate of the qlora recipe ($((SECONDS - START)) s so far)"
$PY - "$RES" "$DEVICE" <<'EOF'
import json, subprocess, sys, yaml
from pathlib import Path
res, device = Path(sys.argv[1]), sys.argv[2]
if not (res / "qlora.json").is_file():
    sys.exit("no qlora result: estimate skipped")
run = json.loads((res / "qlora.json").read_text())
q = run["results"]["qwentune"]
(res / "qlora.yaml").write_text(yaml.safe_dump(run["recipe"], sort_keys=False))
argv = [sys.executable, "-m", "qwentune", "estimate", str(res / "qlora.yaml"), "--json", "--device", device,
        "--seq-len", str(q["longest_row"]), "--token-rows", str(q.get("trainable_token_rows", 0))]
out = subprocess.run(argv, capture_output=True, text=True)
if out.returncode:
    sys.exit(f"estimate failed: {out.stderr.strip()[-2000:]}")
(res / "estimate.json").write_text(out.stdout)
print(" ".join(argv[2:]), "->", f"{json.loads(out.stdout)['total_bytes'] / 2**30:.2f} GiB")
EOF

bench packed --shape "$SMALL" --seq "$SEQ" --steps "$STEPS" --batch "$BATCH" --packing

echo "== summary ($((SECONDS - START)) s in all)"
$PY - "$RES" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from train_throughput import mfu

res = Path(sys.argv[1])
GiB = 2**30
def load(name):
    p = res / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None
def mem(r):
    return r["cuda_max_allocated"] if r["cuda_max_allocated"] is not None else r["peak_rss_delta"]
def util(r, fpt):
    m = mfu(r["device"], r["tokens_per_s"] * fpt) if r["cuda_max_allocated"] is not None else None
    return "-" if m is None else f"{m:.1%}"

rows = []
qlora, liger, packed = load("qlora"), load("liger"), load("packed")
for label, run, target in (("QLoRA SFT", qlora, True), ("LoRA SFT packed", packed, False)):
    if run is None:
        rows.append((label, "no result", "", "", "", "", ""))
        continue
    q, t, fpt = run["results"].get("qwentune"), run["results"].get("trl"), run["flops_per_token"]
    for arm, r in (("qwentune", q), ("TRL+PEFT", t)):
        if r:
            rows.append((label, arm, f"{r['tokens_per_s']:.1f}", f"{mem(r) / GiB:.2f}", util(r, fpt), "", ""))
    if q and t:
        speed, vram = q["tokens_per_s"] / t["tokens_per_s"], mem(q) / mem(t)
        goal = " (targets ≥ 2×, ≤ 0.4×, MFU ≥ 45%)" if target else ""
        rows.append((label, "qwentune/TRL", "", "", "", f"{speed:.2f}×", f"{vram:.2f}×{goal}"))
if liger:
    r, fpt = liger["results"]["qwentune"], liger["flops_per_token"]
    base = qlora and qlora["results"].get("qwentune")
    vs = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}× (vs Liger off)" if base else ""
    rows.append(("QLoRA SFT", "qwentune+Liger", f"{r['tokens_per_s']:.1f}", f"{mem(r) / GiB:.2f}", util(r, fpt), vs,
                 f"{mem(r) / mem(base):.2f}×" if base else ""))
else:
    rows.append(("QLoRA SFT", "qwentune+Liger", "skipped", "", "", "liger-kernel not importable", ""))
est = res / "estimate.json"
if est.is_file() and qlora and qlora["results"].get("qwentune"):
    e, measured = json.loads(est.read_text()), mem(qlora["results"]["qwentune"])
    rows.append(("estimate", f"{e['device']}", "", f"{e['total_bytes'] / GiB:.2f}", "",
                 f"measured {measured / GiB:.2f} GiB", f"estimate/measured {e['total_bytes'] / measured:.2f}×"))
head = ("check", "arm", "tokens/s", "peak GiB", "MFU", "speed ratio", "memory ratio")
widths = [max(len(str(row[i])) for row in (head, *rows)) for i in range(len(head))]
for row in (head, tuple("-" * w for w in widths), *rows):
    print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
some = next((run["results"] for run in (qlora, packed, liger) if run), None)
if some:
    r = next(iter(some.values()))
    kind = "CUDA max allocated" if r["cuda_max_allocated"] is not None else "peak RSS after imports (CPU)"
    print(f"device: {r['device']}; peak memory: {kind}")
EOF
echo "results: $RES"
