"""The `qwentune` command: subcommands only; every one calls the same functions the notebook API exposes."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from .errors import QwentuneError

EPILOG = """\
overrides: any recipe key as section.key=value anywhere after the command (before or after options), e.g.
  qwentune train recipes/qwen2.5-0.5b-instruct/sft_lora.yaml training.max_steps=20 data.limit=64
  qwentune preprocess recipes/qwen2.5-0.5b-instruct/sft_lora.yaml --output rows.jsonl data.limit=64
Values are typed like YAML (ints, floats, bools, [lists]); unknown keys are errors.
Multi-GPU: accelerate launch --config_file launch/ddp.yaml -m qwentune train RECIPE"""


def _split(items: list[str]) -> tuple[list[str], list[str]]:
    """Recipe paths and `a.b=value` overrides, in any order. A word that is neither a file nor has '=' is refused
    here, so a mistyped override is not read as a second recipe path."""
    recipes, overrides = [], []
    for item in items:
        if os.path.isfile(item) or ("=" not in item and item.endswith((".yaml", ".yml"))):
            recipes.append(item)
        elif "=" in item:
            overrides.append(item)
        else:
            raise QwentuneError(
                f"'{item}' is not an override (expected section.key=value) and not a recipe file",
                where="command line",
                hint="write overrides as section.key=value, e.g. training.epochs=2",
            )
    return recipes, overrides


def _one_recipe(items: list[str]):
    from .recipe import load_recipe

    recipes, overrides = _split(items)
    if len(recipes) != 1:
        raise QwentuneError(
            f"expected one recipe file, got {len(recipes)}",
            where="command line",
            hint="qwentune CMD RECIPE [a.b=value ...]",
        )
    return load_recipe(recipes[0], overrides)


def cmd_validate(args) -> int:
    from .training import validate_recipe

    recipes, overrides = _split(args.items)
    if not recipes:
        raise QwentuneError("no recipe given", where="command line", hint="qwentune validate recipes/**/*.yaml")
    for path in recipes:
        for line in validate_recipe(path, overrides):
            print(line)
    print(f"{len(recipes)} recipe(s) valid")
    return 0


def cmd_preprocess(args) -> int:
    from .api import preprocess

    recipe = _one_recipe(args.items)
    n = preprocess(recipe, args.output, limit=args.limit)
    print(f"wrote {n} rows to {args.output}", file=sys.stderr)
    return 0


def cmd_preview(args) -> int:
    from .api import preview

    recipe = _one_recipe(args.items)
    print(preview(recipe, rows=args.rows, color=not args.no_color and sys.stdout.isatty()))
    return 0


def cmd_train(args) -> int:
    from .api import train

    recipe = _one_recipe(args.items + (["training.resume=true"] if args.resume else []))
    result = train(recipe)
    if result.adapter_dir is not None:
        print(f"adapter: {result.adapter_dir}")
    if result.merged_dir is not None:
        print(f"merged model: {result.merged_dir}")
    return 0


def cmd_estimate(args) -> int:
    import json

    from .training import estimate

    recipe = _one_recipe(args.items)
    result = estimate(recipe, device=args.device, seq_len=args.seq_len, trainable_token_rows=args.token_rows)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.render())
    return 0


def cmd_merge(args) -> int:
    from .export import merge_adapter

    result = merge_adapter(
        Path(args.adapter_dir),
        Path(args.output),
        base=args.base,
        qlora_merge=args.qlora_merge,
        check_parity=not args.no_parity,
    )
    parity = "skipped" if args.no_parity else f"max |Δlogit| = {result.max_abs_diff:.2e}"
    print(f"merged ({result.mode}) into {result.output_dir}; parity {parity}")
    return 0


def cmd_chat(args) -> int:
    from .serve import run_chat

    return run_chat(
        args.model,
        tools=args.tools,
        system=args.system,
        image=args.image,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        prompt=args.prompt,
    )


def cmd_push(args) -> int:
    from .serve import push

    plan = push(args.target, args.repo_id, private=args.private, adapter_only=args.adapter_only, dry_run=args.dry_run)
    if args.dry_run:
        print(plan.render())
    return 0


def cmd_export(args) -> int:
    from .serve import export_gguf

    report = export_gguf(args.model, args.gguf, type=args.type, ollama=args.ollama, force=args.force)
    p = report.parity
    print(
        f"wrote {report.path} ({report.type}, {report.size_bytes / 2**20:.1f} MiB); parity max |Δlogit| = "
        f"{p['max_abs_diff']:.2e} (tolerance {p['tolerance']:.2g}), greedy agreement {report.greedy['agreement']:.0%}"
    )
    if report.modelfile is not None:
        print(f"Modelfile: {report.modelfile} (ollama create NAME -f {report.modelfile})")
    return 0


def _recipe_eval(target: str):
    """(models, labels, data, template, eval section, run dir) for `qwentune eval RECIPE_OR_RUN_DIR`."""
    from .recipe import load_recipe, resolve_path
    from .serve import is_run_dir
    from .training import run_dir_for

    path = Path(target)
    recipe = load_recipe(path / "recipe.yaml" if path.is_dir() else path)
    run_dir = path if path.is_dir() else run_dir_for(recipe)
    if not is_run_dir(run_dir):
        raise QwentuneError("no merged/ model or adapter/ in the run dir", where=str(run_dir), hint="train it first")
    data = [str(resolve_path(recipe, d)) for d in (recipe.eval.data or recipe.data.eval)]
    if not data:
        raise QwentuneError("the recipe has no eval data", where=str(path), hint="set eval.data or data.eval")
    models, labels = [str(run_dir)], ["tuned"]  # merged/, else the adapter on its base
    if recipe.eval.base:
        models, labels = [recipe.model.source, *models], ["base", *labels]
    return models, labels, data, recipe.data.template, recipe.eval, run_dir


def cmd_eval(args) -> int:
    from .eval import evaluate

    labels, template, output = None, "model", args.output
    models, data = args.models, args.data
    limit, batch_size, max_new_tokens = args.limit, args.batch_size, args.max_new_tokens
    one = Path(models[0])
    if not data and len(models) == 1 and (one.suffix in (".yaml", ".yml") or (one / "recipe.yaml").is_file()):
        if args.pairs is not None:
            raise QwentuneError(
                "scores the recipe's eval split, and pairs are never mined from the eval split",
                where=str(one),
                hint="qwentune eval MODEL --data TRAIN_FILE --pairs OUT.jsonl (the training rows, or a split of them)",
            )
        models, labels, data, template, section, run_dir = _recipe_eval(models[0])
        limit = limit if limit is not None else section.limit
        batch_size = batch_size or section.batch_size
        max_new_tokens = max_new_tokens or section.max_new_tokens
        output = output or str(run_dir / "eval")
    if not data:
        raise QwentuneError("no eval data", where="command line", hint="qwentune eval MODEL [MODEL ...] --data FILE")
    result = evaluate(models, data, limit=limit, batch_size=batch_size or 8, max_new_tokens=max_new_tokens or 256,
                      output=output, bfcl_answers=args.bfcl_answers, template=template, labels=labels,
                      turns=args.turns, pairs=args.pairs, samples=args.samples or 0, temperature=args.temperature,
                      seed=args.seed)  # fmt: skip
    print(result.table())
    print(result.summary())
    if output:
        print(f"wrote {Path(output) / 'eval.json'} and {Path(output) / 'eval.md'}", file=sys.stderr)
    if result.pairs is not None:
        print(result.pairs.line(), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qwentune",
        description="Fine-tune Qwen2.5 / Qwen2 / Qwen2-VL with LoRA or QLoRA: exact chat-template masks, SFT and DPO, "
        "merged checkpoints that plain transformers loads.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)

    p = sub.add_parser("validate", help="check recipes: schema, model source, data files, template (no weights)")
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("preprocess", help="render and mask the data exactly as training will; write jsonl")
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE")
    p.add_argument("--output", "-o", required=True, help="output .jsonl (input_ids/labels, or DPO id columns)")
    p.add_argument("--limit", type=_at_least(1, "limit"), default=None, help="only the first N rows of each data file")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("preview", help="show tokens with the trained ones highlighted")
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE")
    p.add_argument("--rows", type=_at_least(1, "number of rows"), default=3)
    p.add_argument("--no-color", action="store_true", help="mark trained spans as [[...]] instead of colour")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("train", help="train (SFT, DPO or GRPO per the recipe's method), save the adapter and merge")
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE")
    p.add_argument("--resume", action="store_true", help="continue the run dir's newest checkpoint (same recipe)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("estimate", help="peak memory per process from the model's config (nothing loads)")
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where training runs (default cuda)")
    p.add_argument(
        "--seq-len",
        type=_at_least(16, "sequence length"),
        default=None,
        help="tokens per row (default: data.max_length)",
    )
    p.add_argument(
        "--token-rows",
        type=_at_least(0, "number of token rows"),
        default=None,
        help="trainable token rows (default: 2 if auto, else 0)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("merge", help="merge an adapter dir into its base, shard by shard, with a parity check")
    p.add_argument("adapter_dir")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--base", default=None, help="base model source (default: the one the adapter was trained on)")
    p.add_argument(
        "--qlora-merge",
        choices=("dequantized", "original"),
        default="dequantized",
        help="QLoRA adapters: merge onto the dequantized 4-bit base (as trained) or the original weights",
    )
    p.add_argument("--no-parity", action="store_true", help="skip the logits parity check (big models)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "chat",
        help="talk to a trained model (run dir, adapter, merged dir, hub id, .gguf, offline:…) with its template",
        description="Interactive chat that streams tokens; tool calls are shown as structured calls. Commands: "
        "/tool RESULT answers the open call, /reset, /save FILE.jsonl (a training row), /exit. With --prompt or a "
        "pipe on stdin: one reply (calls as 'tool_call: {json}' lines), then exit.",
    )
    p.add_argument("model", metavar="MODEL", help="run dir, adapter dir, merged/model dir, hub id, .gguf, offline:…")
    p.add_argument("--tools", default=None, help="JSON file: a list of tool definitions passed to the template")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--image", action="append", default=None, help="image for the first turn (Qwen2-VL; repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--prompt", default=None, help="one message, print the reply and exit")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "push",
        help="upload a run's merged model (or adapter) with its model card to the Hugging Face Hub",
        description="Token from HF_TOKEN or `hf auth login`; never printed. --dry-run lists the files and the card.",
    )
    p.add_argument("target", metavar="RUN_OR_MODEL_DIR")
    p.add_argument("repo_id", metavar="OWNER/NAME")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--adapter-only", action="store_true", help="upload the run's adapter/ instead of merged/")
    p.add_argument("--dry-run", action="store_true", help="list exactly what would be uploaded; upload nothing")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("export", help="write a GGUF for llama.cpp / Ollama, verified against the model it came from")
    p.add_argument("model", help="merged model dir, run dir (its merged/), hub id, .gguf or offline:NAME")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument("--type", default="f16", metavar="TYPE", help="f16 (default), bf16 or q8_0")
    p.add_argument("--ollama", action="store_true", help="also write a Modelfile beside the GGUF")
    p.add_argument("--force", action="store_true", help="replace an existing GGUF / Modelfile")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "eval",
        help="score models side by side: tool calls (incl. BFCL files), no-call, loss, preferences",
        description="qwentune eval MODEL [MODEL ...] --data FILE ..., or qwentune eval RECIPE_OR_RUN_DIR (base and "
        "tuned on the recipe's eval split). MODEL: hub id, dir, .gguf, offline:..., a run dir (its merged/), or an "
        "adapter dir (base + adapter, not merged).",
    )
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--data", action="append", default=[], help="eval file (jsonl/json, any training format, or BFCL)")
    p.add_argument("--bfcl-answers", default=None, help="BFCL possible-answer file for a BFCL question file")
    p.add_argument("--limit", type=int, default=None, help="only the first N scoreable rows of each file")
    p.add_argument("--batch-size", type=int, default=None, help="prompts generated together (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="greedy tokens per reply (default 256)")
    p.add_argument("--output", "-o", default=None, help="write eval.json and eval.md into this dir")
    p.add_argument("--turns", choices=("first", "all"), default="first",
                   help="score each row's first assistant turn (default) or every one: a prompt per turn, the "
                   "history up to it")  # fmt: skip
    p.add_argument("--pairs", default=None, metavar="OUT.jsonl",
                   help="write every wrong tool-call / no-call reply as a DPO pair (chosen: the expected turn, "
                   "rejected: the reply); mine training rows, never the eval split")  # fmt: skip
    p.add_argument("--samples", type=_at_least(1, "number of samples"), default=None, metavar="K",
                   help="with --pairs: also sample K replies per turn to find more misses")  # fmt: skip
    p.add_argument("--temperature", type=float, default=None, help="for --samples (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="for --samples: turn i is sampled with seed+i (default 0)")
    p.set_defaults(func=cmd_eval)
    return parser


def _at_least(minimum: int, what: str):
    """argparse type for a count (--limit, --rows, ...): a whole number ≥ `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not a valid {what} (must be ≥ {minimum})")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (like every other error) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (hint: {self.prog} --help)\n")


class _CommandParser(_Parser):
    """A subcommand's parser: positionals (recipe, overrides, models) may sit before, between or after its options,
    as `parse_intermixed_args` reads them: `train R --resume training.max_steps=5` is `train R training.max_steps=5
    --resume`. The top-level parser cannot parse intermixed (it has subparsers); its subparsers action calls this
    parse_known_args, which parses intermixed, whose own two passes come back here and parse plainly."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # parse_known_intermixed_args's own passes (on Pythons where it calls parse_known_args)
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input (a QwentuneError) is one line on stderr and exit code 2; any other exception is a
    bug, reported in one line with exit code 1. QWENTUNE_DEBUG=1 shows the traceback of either."""
    from .quiet import quiet_library_noise

    quiet_library_noise()  # before any command imports TRL (and with it bitsandbytes and kernels)
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = os.environ.get("QWENTUNE_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except QwentuneError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e.render()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(
            f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(a bug in qwentune, not in your input; set QWENTUNE_DEBUG=1 for the traceback and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
