"""DPO on the real offline Qwen2.5-Coder-0.5B-Instruct: does the tuned model prefer the chosen answers more?

    python benchmarks/dpo_proof.py                       # trains the recipe (~15 min on 2 CPU cores), then measures
    python benchmarks/dpo_proof.py --run-dir runs/offline-dpo-qlora   # only measure a finished run
    python benchmarks/dpo_proof.py training.max_steps=2 data.limit=8  # recipe overrides (a quick smoke run)

Prints, from the run's metrics.json, TRL's eval reward accuracy and mean reward margin before vs after training
(reference = the base), and `qwentune.eval.evaluation.preference_margin` — summed log p(chosen) − log p(rejected)
on the held-out pairs — for the base model dir vs the merged model dir, both loaded with plain transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "recipes/qwen2.5-coder-0.5b-instruct-offline/dpo_qlora.yaml"
HELD_OUT = ROOT / "data/preferences_eval.jsonl"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, a.b=value")
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--run-dir", default=None, help="a finished run dir: measure it, do not train")
    parser.add_argument("--pairs", type=int, default=20, help="held-out pairs for preference_margin")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import qwentune
    from qwentune.eval.evaluation import preference_margin
    from qwentune.model.sources import resolve_model

    recipe = qwentune.load_recipe(args.recipe, args.overrides)
    if args.run_dir:
        run_dir = Path(args.run_dir)
        merged = run_dir / "merged"
    else:
        start = time.perf_counter()
        result = qwentune.train(recipe)
        print(f"trained in {time.perf_counter() - start:.0f} s", flush=True)
        run_dir, merged = result.run_dir, result.merged_dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    base_dir = resolve_model(recipe.model.source, progress=False).path

    before, after = metrics.get("eval_before", {}), metrics.get("eval_after", {})
    print(f"\n{run_dir}: {metrics.get('global_step')} steps, effective batch {metrics.get('effective_batch')} pairs")
    print(f"{'TRL eval (reference = base)':34} {'before':>10} {'after':>10}")
    for key in ("rewards/accuracies", "rewards/margins", "loss"):
        print(f"{key:34} {before.get(key, float('nan')):10.4f} {after.get(key, float('nan')):10.4f}")

    print(f"\npreference_margin on the first {args.pairs} held-out pairs (plain transformers, fp32):")
    rows = {}
    for name, model_dir in (("base", base_dir), ("merged DPO", merged)):
        rows[name] = preference_margin(model_dir, HELD_OUT, limit=args.pairs)
        margin, won = rows[name]["mean_margin"], rows[name]["chosen_preferred"]
        print(f"  {name:12} mean log-prob margin {margin:9.3f}   chosen preferred {won:.2f}")
    delta = rows["merged DPO"]["mean_margin"] - rows["base"]["mean_margin"]
    print(f"  change in mean margin: {delta:+.3f} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
