"""The `qwentune` command's arguments: the parser of every subcommand, its help text and argument types. The
commands themselves are in cli.py."""

from __future__ import annotations

import argparse
from collections.abc import Callable

EPILOG = """\
overrides: any recipe key as section.key=value anywhere after the command (before or after options), e.g.
  qwentune train recipes/qwen2.5-0.5b-instruct/sft_lora.yaml training.max_steps=20 data.limit=64
  qwentune preprocess recipes/qwen2.5-0.5b-instruct/sft_lora.yaml --output rows.jsonl data.limit=64
Values are typed like YAML (ints, floats, bools, [lists]); unknown keys are errors.
Multi-GPU: accelerate launch --config_file launch/ddp.yaml -m qwentune train RECIPE"""


def build_parser(handlers: dict[str, Callable]) -> argparse.ArgumentParser:
    """The argument parser; `handlers`: each command's function (cli.COMMANDS), set as its `func`."""
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
    p.set_defaults(func=handlers["validate"])

    p = sub.add_parser("preprocess", help="render and mask the data exactly as training will; write jsonl")
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE")
    p.add_argument("--output", "-o", required=True, help="output .jsonl (input_ids/labels, or DPO id columns)")
    p.add_argument("--limit", type=_at_least(1, "limit"), default=None, help="only the first N rows of each data file")
    p.set_defaults(func=handlers["preprocess"])

    p = sub.add_parser("preview", help="show tokens with the trained ones highlighted")
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE")
    p.add_argument("--rows", type=_at_least(1, "number of rows"), default=3)
    p.add_argument("--no-color", action="store_true", help="mark trained spans as [[...]] instead of colour")
    p.set_defaults(func=handlers["preview"])

    p = sub.add_parser("train", help="train (SFT, DPO or GRPO per the recipe's method), save the adapter and merge")
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE")
    p.add_argument("--resume", action="store_true", help="continue the run dir's newest checkpoint (same recipe)")
    p.set_defaults(func=handlers["train"])

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
    p.add_argument("--launch", metavar="FILE", help="per process under this accelerate config (launch/*.yaml)")
    p.add_argument("--processes", type=_at_least(1, "number of processes"), help="with --launch: its num_processes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=handlers["estimate"])

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
    p.set_defaults(func=handlers["merge"])

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
    p.set_defaults(func=handlers["chat"])

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
    p.set_defaults(func=handlers["push"])

    p = sub.add_parser("export", help="write a GGUF for llama.cpp / Ollama, verified against the model it came from")
    p.add_argument("model", help="merged model dir, run dir (its merged/), hub id, .gguf or offline:NAME")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument(
        "--type",
        default="f16",
        metavar="TYPE",
        help="f16 (default), bf16, q8_0; q4_k_m, q5_k_m, q6_k (llama.cpp's quantizer: the [gguf] extra)",
    )
    p.add_argument(
        "--check-data",
        action="append",
        metavar="FILE",
        help="score the written file in llama.cpp's server next to the source on these eval rows",
    )
    p.add_argument("--check-limit", type=int, metavar="N", help="with --check-data: the first N rows")
    p.add_argument("--ollama", action="store_true", help="also write a Modelfile beside the GGUF")
    p.add_argument("--force", action="store_true", help="replace an existing GGUF / Modelfile")
    p.set_defaults(func=handlers["export"])

    p = sub.add_parser(
        "eval",
        help="score models side by side: tool calls (incl. BFCL files), no-call, loss, preferences",
        description="qwentune eval MODEL [MODEL ...] --data FILE ..., or qwentune eval RECIPE_OR_RUN_DIR (base and "
        "tuned on the recipe's eval split). MODEL: hub id, dir, .gguf, offline:..., a run dir (its merged/), an "
        "adapter dir (base + adapter, not merged), or an OpenAI-compatible server's URL (http://HOST:PORT/v1, e.g. "
        "from `qwentune serve`): the same rows sent as messages + tools, the same scoring.",
    )
    p.add_argument("models", nargs="*", metavar="MODEL")
    p.add_argument("--endpoint", action="append", default=[], metavar="URL",
                   help="score the model an OpenAI-compatible server serves (http://127.0.0.1:8080/v1): greedy, every "
                   "sampling setting pinned; tool calls from its tool_calls (or its <tool_call> text)")  # fmt: skip
    p.add_argument("--served-model", default=None, metavar="NAME",
                   help="the endpoint's model name (default: the one it lists)")  # fmt: skip
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
    p.add_argument("--seed", type=int, default=0,
                   help="for --samples: turn i is sampled with seed+i; sent with each --endpoint request")  # fmt: skip
    p.set_defaults(func=handlers["eval"])

    from .serve import BACKENDS, DEFAULT_PORT

    p = sub.add_parser(
        "serve",
        help="serve a trained model behind an OpenAI-compatible server (transformers serve, llama.cpp, vLLM)",
        description="Starts an existing server with the chat template the model was trained with, tool calls "
        "returned as tool_calls: a .gguf in llama.cpp's llama-server --jinja; a merged/run dir in vLLM where it is "
        "installed (GPU), else transformers serve. Prints the URL and the exact command; Ctrl-C stops it.",
    )
    p.add_argument("model", metavar="MODEL", help="run dir (its merged/), merged model dir, .gguf, hub id, offline:…")
    p.add_argument("--port", type=_at_least(1, "port"), default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="default: by MODEL (see above)")
    p.add_argument("--wait", type=float, default=600.0, help="seconds to wait for it to answer (default 600)")
    p.add_argument("--server-args", default="", metavar="'ARGS'",
                   help="more arguments for the server, one string: --server-args='--ctx-size 8192'")  # fmt: skip
    p.set_defaults(func=handlers["serve"])
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
