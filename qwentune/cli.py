"""The `qwentune` command: subcommands only; every one calls the same functions the notebook API exposes."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from . import cli_args
from .errors import QwentuneError


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

    from .model import estimate, estimate_for_launch, host_phases, model_shape, render_host

    recipe = _one_recipe(args.items)
    shape = model_shape(recipe.model.source)
    result = estimate(recipe, device=args.device, seq_len=args.seq_len, trainable_token_rows=args.token_rows,
                      shape=shape)  # fmt: skip
    if args.launch:  # per process of a multi-process launch config (FSDP, ZeRO, DDP)
        result = estimate_for_launch(result, args.launch, args.processes)
    parts = result.parts
    host = host_phases(
        params=parts["params"], checkpoint_bytes=shape.checkpoint_bytes, trained_weights=parts["weights"],
        train_tensors=result.total, device=args.device, largest_matrix=shape.vocab * shape.hidden,
        merge=recipe.output.merge, evaluate=recipe.eval.enabled,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result.to_dict() | {"host": [vars(p) for p in host]}, indent=2))
    else:
        print(result.render() + render_host(host))
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
    from .api import export_gguf

    report = export_gguf(args.model, args.gguf, type=args.type, ollama=args.ollama, force=args.force,
                         check_data=args.check_data, check_limit=args.check_limit)  # fmt: skip
    p = report.extra.get("verified_f16", report.__dict__)["parity"]
    kquant = "verified_f16" in report.extra
    checked = f" (on the f16 file it was quantized from; types {report.tensor_types})" if kquant else ""
    print(
        f"wrote {report.path} ({report.type}, {report.size_bytes / 2**20:.1f} MiB); parity max |Δlogit| = "
        f"{p['max_abs_diff']:.2e} (tolerance {p['tolerance']:.2g}){checked}"
    )
    llama = report.extra.get("llama_cpp", {})
    print(
        f"llama.cpp: greedy agreement {llama['agreement']:.0%}" if llama.get("ran") else f"llama.cpp: {llama['why']}"
    )
    if "check_data" in report.extra:
        print(report.extra["check_data"]["table"])
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


def cmd_serve(args) -> int:
    import shlex

    from .serve import serve

    return serve(args.model, backend=args.backend, host=args.host, port=args.port, wait=args.wait,
                 extra_args=shlex.split(args.server_args))  # fmt: skip


def cmd_eval(args) -> int:
    from .eval import evaluate

    labels, template, output = None, "model", args.output
    models, data = args.models + args.endpoint, args.data
    if not models:
        raise QwentuneError("no model given", where="command line", hint="qwentune eval MODEL|--endpoint URL --data F")
    if args.served_model and not any(m.startswith(("http://", "https://")) for m in models):
        raise QwentuneError("--served-model names a model of an endpoint", where="--served-model",
                            hint="qwentune eval --endpoint URL --served-model NAME --data FILE")  # fmt: skip
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
                      seed=args.seed, served_model=args.served_model)  # fmt: skip
    print(result.table())
    print(result.summary())
    if output:
        print(f"wrote {Path(output) / 'eval.json'} and {Path(output) / 'eval.md'}", file=sys.stderr)
    if result.pairs is not None:
        print(result.pairs.line(), file=sys.stderr)
    return 0


COMMANDS = {
    "validate": cmd_validate,
    "preprocess": cmd_preprocess,
    "preview": cmd_preview,
    "train": cmd_train,
    "estimate": cmd_estimate,
    "merge": cmd_merge,
    "chat": cmd_chat,
    "push": cmd_push,
    "export": cmd_export,
    "eval": cmd_eval,
    "serve": cmd_serve,
}


def build_parser() -> argparse.ArgumentParser:
    return cli_args.build_parser(COMMANDS)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input (a QwentuneError) is one line on stderr and exit code 2; any other exception is a
    bug, reported in one line with exit code 1. QWENTUNE_DEBUG=1 shows the traceback of either."""
    from .quiet import quiet_library_noise

    quiet_library_noise()  # before any command imports TRL (and with it bitsandbytes and kernels)
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = os.environ.get("QWENTUNE_DEBUG", "") not in ("", "0")
    try:
        return globals()[f"cmd_{args.command}"](args)  # looked up now: what replaced cmd_NAME is what runs
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
