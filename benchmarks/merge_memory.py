"""Peak memory of the streaming merge vs loading everything and calling PEFT's merge_and_unload.

    python benchmarks/merge_memory.py                 # Qwen2.5-0.5B shape, bf16, 200MB shards, LoRA r16 all-linear
    python benchmarks/merge_memory.py --layers 4      # a quicker, smaller run

The base is a random-weight model with the real Qwen2.5-0.5B dimensions (hidden 896, intermediate 4864, 24 layers,
14 heads, 2 kv heads, vocab 151,936, tied embeddings) saved in bf16 in ~200MB shards; the adapter is LoRA r=16 on all
linear layers with random non-zero B. Each variant runs in a fresh Python process and reports its own peak RSS
(`ru_maxrss`), so the numbers do not mix:

* `imports`   — python + torch + transformers + peft + qwentune.export, nothing loaded (the fixed floor);
* `streaming` — `merge_adapter(..., streaming=True, check_parity=False)`: shard by shard;
* `naive`     — `from_pretrained` (bf16) + `PeftModel.from_pretrained` + `merge_and_unload` + `save_pretrained`;
* `in_memory` — `merge_adapter(..., streaming=False, check_parity=False)`: PEFT layer merges, each in fp32;
* `streaming+parity` — the default standalone merge including its fp32 parity check (loads the model twice, in turn).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

VARIANTS = ("imports", "streaming", "naive", "in_memory", "streaming+parity")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _make_fixture(work: Path, layers: int, shard: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        bos_token_id=151643,
        eos_token_id=151643,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=151643, eos_token_id=151643)
    model.save_pretrained(work / "base", max_shard_size=shard)
    params = sum(p.numel() for p in model.parameters())
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-2)
    pm.save_pretrained(work / "adapter")
    shards = sorted(p.name for p in (work / "base").glob("*.safetensors"))
    sizes = [(work / "base" / s).stat().st_size for s in shards]
    adapter_mb = (work / "adapter" / "adapter_model.safetensors").stat().st_size / 2**20
    return {
        "params": params,
        "shards": len(shards),
        "largest_shard_mb": max(sizes) / 2**20,
        "base_mb": sum(sizes) / 2**20,
        "adapter_mb": adapter_mb,
    }


def _child(variant: str, work: Path) -> dict:
    warnings.simplefilter("ignore")
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from peft import PeftModel

    from qwentune.export.merge import merge_adapter

    out = work / f"out-{variant.replace('+', '-')}"
    start = time.time()
    if variant == "streaming":
        merge_adapter(work / "adapter", out, base=work / "base", check_parity=False)
    elif variant == "streaming+parity":
        merge_adapter(work / "adapter", out, base=work / "base", check_parity=True)
    elif variant == "in_memory":
        merge_adapter(work / "adapter", out, base=work / "base", check_parity=False, streaming=False)
    elif variant == "naive":
        model = transformers.AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, str(work / "adapter")).merge_and_unload()
        model.save_pretrained(out)
    elif variant != "imports":
        raise SystemExit(f"unknown variant {variant}")
    seconds = time.time() - start
    shutil.rmtree(out, ignore_errors=True)
    return {"variant": variant, "peak_rss_mb": _peak_mb(), "seconds": seconds}


def _run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--shard", default="200MB")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the fixture here (default: a temp dir)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "WORKDIR"), help=argparse.SUPPRESS)
    parser.add_argument("--fixture", nargs=3, metavar=("WORKDIR", "LAYERS", "SHARD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], Path(args.child[1]))))
        return
    if args.fixture:
        print(json.dumps(_make_fixture(Path(args.fixture[0]), int(args.fixture[1]), args.fixture[2])))
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="qwentune-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not (work / "adapter" / "adapter_model.safetensors").is_file():
            print(f"building the fixture in {work} ({args.layers} layers, {args.shard} shards) ...", flush=True)
            fixture = _run_child(["--fixture", str(work), str(args.layers), args.shard])
        else:
            fixture = {}
        if fixture:
            print(
                f"base: {fixture['params'] / 1e6:.0f}M params, {fixture['base_mb']:.0f} MiB bf16 in "
                f"{fixture['shards']} shards (largest {fixture['largest_shard_mb']:.0f} MiB); "
                f"adapter {fixture['adapter_mb']:.0f} MiB"
            )
        results = {}
        for variant in args.variants.split(","):
            results[variant] = _run_child(["--child", variant, str(work)])
            r = results[variant]
            print(f"{variant:>17}: peak RSS {r['peak_rss_mb']:7.0f} MiB   ({r['seconds']:.1f} s)", flush=True)
        if "streaming" in results and "naive" in results:
            s, n = results["streaming"]["peak_rss_mb"], results["naive"]["peak_rss_mb"]
            print(f"naive / streaming peak RSS: {n / s:.2f}x")
            if "imports" in results:
                floor = results["imports"]["peak_rss_mb"]
                print(
                    f"above the import floor ({floor:.0f} MiB): naive {n - floor:.0f} MiB, streaming "
                    f"{s - floor:.0f} MiB -> {(n - floor) / max(s - floor, 1):.2f}x"
                )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
