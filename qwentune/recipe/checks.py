"""The checks on a built recipe that a key's type cannot express: bounds of every number, rules across keys, the
placeholders of output.dir. They take the recipe as built by `load.load_recipe` (duck-typed: this module sits
below load.py)."""

from __future__ import annotations

import string
from typing import Any

from ..errors import QwentuneError, did_you_mean

# data.max_length above this is refused even when the model's config is not at hand (validate also checks the
# model's max_position_embeddings when the model is on disk): 2^20 tokens, above every Qwen2/2.5 context window.
MAX_LENGTH_CAP = 1 << 20
OUTPUT_DIR_FIELDS = ("model", "method", "peft")  # the placeholders output.dir may use
# The integrations transformers reports to (transformers.integrations.INTEGRATION_TO_CALLBACK).
REPORT_TO = ("wandb", "tensorboard", "mlflow", "trackio", "comet_ml", "neptune", "clearml", "azure_ml", "dagshub",
             "dvclive", "flyte", "kubeflow", "codecarbon", "swanlab")  # fmt: skip

# Lower bounds of every number key that has one (None values are skipped): key → (minimum, example for the hint).
MINIMUMS: dict[str, tuple[float, str]] = {
    "model.min_pixels": (1, "3136"),
    "model.max_pixels": (1, "1003520"),
    "data.max_length": (16, "2048"),
    "data.limit": (1, "64 (or null for every row)"),
    "data.eval_limit": (1, "64 (or null for every row)"),
    "data.num_proc": (1, "4"),
    "data.seed": (0, "42"),
    "data.shuffle_buffer": (0, "10000 (0: file order)"),
    "peft.r": (1, "16"),
    "peft.alpha": (1, "32"),
    "training.learning_rate": (0, "2e-4"),
    "training.per_device_batch_size": (1, "1"),
    "training.grad_accum": (1, "8"),
    "training.seed": (0, "42"),
    "training.weight_decay": (0, "0.0"),
    "training.max_grad_norm": (0, "1.0"),
    "training.logging_steps": (1, "10"),
    "training.eval_steps": (1, "100 (or null: each epoch)"),
    "training.save_steps": (1, "100 (or null: no checkpoints)"),
    "training.save_total_limit": (1, "2"),
    "training.dataloader_num_workers": (0, "0"),
    "output.sample_tokens": (0, "128 (0: no sample)"),
    "dpo.label_smoothing": (0, "0.0"),
    "dpo.rpo_alpha": (0, "1.0"),
    "grpo.num_generations": (2, "8 (a group needs two completions to compare)"),
    "grpo.max_completion_length": (1, "256"),
    "grpo.beta": (0, "0.0"),
    "eval.limit": (1, "40 (or null for every row)"),
    "eval.max_new_tokens": (1, "256"),
    "eval.batch_size": (1, "8"),
}
# Upper bounds where a huge value would not fail cleanly but start thousands of processes.
MAXIMUMS = {"data.num_proc": 256, "training.dataloader_num_workers": 256}
_STRICT = {"training.learning_rate"}  # must be > its minimum, not ≥
_SEEDS = ("data.seed", "training.seed")  # numpy / torch seeds: < 2^32


def _value(recipe: Any, key: str) -> Any:
    node: Any = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


def check_recipe(recipe: Any, where: str) -> None:
    """Bounds of every number and the rules across keys of a built Recipe; the first problem raises."""

    def fail(key: str, message: str, hint: str) -> None:
        raise QwentuneError(f"'{key}' {message}", where=where, hint=hint)

    if not recipe.model.source:
        fail("model.source", "is required", "a hub id, local dir, .gguf file or offline:qwen2.5-coder-0.5b-instruct")
    if not recipe.data.train:
        fail("data.train", "is required", "one or more data files, e.g. data/tool_calls.jsonl")
    for key, (minimum, example) in MINIMUMS.items():
        value = _value(recipe, key)
        if value is not None and (value <= minimum if key in _STRICT else value < minimum):
            fail(key, f"must be {'>' if key in _STRICT else '≥'} {minimum}, got {value}", f"e.g. {example}")
    for key, maximum in MAXIMUMS.items():
        if _value(recipe, key) > maximum:
            fail(key, f"must be at most {maximum}, got {_value(recipe, key)}", "about the number of CPU cores")
    for key in _SEEDS:
        if _value(recipe, key) >= 1 << 32:
            fail(key, f"must be < 2^32, got {_value(recipe, key)}", "e.g. 42")
    m = recipe.model
    if m.min_pixels is not None and m.max_pixels is not None and m.min_pixels > m.max_pixels:
        fail("model.min_pixels", f"({m.min_pixels}) is above model.max_pixels ({m.max_pixels})", "swap them")
    if not 0.0 <= recipe.data.eval_fraction < 1.0:
        fail("data.eval_fraction", f"must be in [0, 1), got {recipe.data.eval_fraction}", "e.g. 0.05")
    if recipe.data.max_length > MAX_LENGTH_CAP:
        fail("data.max_length", f"must be at most {MAX_LENGTH_CAP}, got {recipe.data.max_length}", "e.g. 2048")
    t = recipe.training
    if t.max_steps == 0 or t.max_steps < -1:
        fail("training.max_steps", f"must be ≥ 1, or -1 to train for training.epochs; got {t.max_steps}", "e.g. 100")
    if t.max_steps <= 0 and t.epochs <= 0:
        fail("training.epochs", "must be > 0 when training.max_steps is not set", "e.g. epochs: 1 or max_steps: 100")
    if not 0.0 <= t.warmup_ratio < 1.0:
        fail("training.warmup_ratio", "must be in [0, 1)", "e.g. 0.03")
    p = recipe.peft
    if not 0.0 <= p.dropout < 1.0:
        fail("peft.dropout", "must be in [0, 1)", "e.g. 0.05")
    if p.method == "qlora" and p.quant.bits != 4:
        fail("peft.quant.bits", "must be 4 for QLoRA merges to be exact", "use bits: 4 (nf4)")
    for target in recipe.logging.report_to:
        if target not in REPORT_TO:
            hint = did_you_mean(target, REPORT_TO) or ", ".join(REPORT_TO)
            fail("logging.report_to", f"has unknown target {target!r}", hint)
    d = recipe.dpo
    if d.beta <= 0:
        fail("dpo.beta", "must be > 0", "e.g. 0.1")
    if d.label_smoothing >= 0.5:
        fail("dpo.label_smoothing", f"must be below 0.5, got {d.label_smoothing}", "e.g. 0.0")
    if d.loss_weights is not None and len(d.loss_weights) != len(d.loss_type):
        fail("dpo.loss_weights", f"needs one weight per loss_type ({len(d.loss_type)})", "e.g. [1.0, 0.5]")
    if recipe.grpo.temperature <= 0:
        fail("grpo.temperature", f"must be > 0, got {recipe.grpo.temperature}", "e.g. 1.0 (completions are sampled)")
    if recipe.method == "sft" and recipe.data.format == "preference":
        fail("data.format", "is 'preference' but method is sft", "use method: dpo, or a conversation format")
    if recipe.eval.enabled and not (recipe.eval.data or recipe.data.eval):
        fail("eval.enabled", "is true but there is no eval data (eval.data and data.eval are empty)",
             "set eval.data: [data/tool_calls_eval.jsonl], or data.eval")  # fmt: skip
    _check_mix(recipe.data, fail)
    _check_streaming(recipe, fail)
    _check_output_dir(recipe.output.dir, fail)


def _check_mix(data: Any, fail) -> None:
    """Mapping entries of data.train / data.eval: a path each, limits ≥ 1; weights on every train entry or on none,
    each > 0 (non-finite numbers are refused when read); data.mix_rows only with weights, at least one row each."""
    for which in ("train", "eval"):
        for i, entry in enumerate(getattr(data, which)):
            if not hasattr(entry, "weight"):  # a plain path, or data in memory
                continue
            key = f"data.{which}[{i}]"
            if isinstance(entry.path, str) and not entry.path:
                fail(f"{key}.path", "is required", "a data file, folder, save_to_disk dir or hub id")
            if entry.limit is not None and entry.limit < 1:
                fail(f"{key}.limit", f"must be ≥ 1, got {entry.limit}", "e.g. 1000 (or leave it out for every row)")
            if which == "eval" and entry.weight is not None:
                fail(f"{key}.weight", "has no use: eval entries are scored each, not mixed", "remove the weight")
    weights = [getattr(e, "weight", None) for e in data.train]
    given = [w for w in weights if w is not None]
    if given and len(given) < len(weights):
        i = weights.index(None)
        fail(f"data.train[{i}]", "has no weight while other data.train entries have one",
             "give every data.train entry a weight ({path: FILE, weight: 0.2}), or none")  # fmt: skip
    for i, w in enumerate(weights):
        if w is not None and w <= 0:
            fail(f"data.train[{i}].weight", f"must be > 0, got {w}", "e.g. 0.2 (weights are relative)")
    if data.mix_rows is not None:
        if not given:
            fail("data.mix_rows", "sets the rows of a weighted mix, but no data.train entry has a weight",
                 "write the entries as {path: FILE, weight: W}, or remove data.mix_rows")  # fmt: skip
        if data.mix_rows < len(weights):
            fail("data.mix_rows", f"must be at least the number of data.train entries ({len(weights)}), "
                 f"got {data.mix_rows}", "each entry contributes at least one row")  # fmt: skip


def _check_streaming(recipe: Any, fail) -> None:
    """data.streaming: SFT text rows, one process (checked when the data is read), steps known up front; what needs
    every row at hand first (an eval split, a seen-set, exact quotas, bins, lengths) is refused."""
    d, t = recipe.data, recipe.training
    if not d.streaming:
        if d.shuffle_buffer:
            fail("data.shuffle_buffer", "has no use without data.streaming", "set data.streaming: true, or remove it")
        return
    refused = [
        (recipe.method != "sft", "method", f"is {recipe.method}; data.streaming works for sft only",
         "set data.streaming: false (DPO and GRPO data are mapped)"),
        (t.max_steps <= 0, "training.max_steps", "is required with data.streaming (a stream has no length)",
         "e.g. max_steps: 1000"),
        (d.eval_fraction > 0, "data.eval_fraction", "cannot split a stream",
         "give data.eval files instead (eval data is not streamed)"),
        (d.dedupe, "data.dedupe", "does not work with data.streaming (its seen-set grows with the rows)",
         "dedupe the files first, or set data.streaming: false"),
        (d.mix_rows is not None, "data.mix_rows", "sets exact quotas; a streamed mix samples its shares by weight",
         "remove data.mix_rows, or set data.streaming: false"),
        (recipe.sft.packing, "sft.packing", "does not work with data.streaming", "set sft.packing: false"),
        (recipe.sft.group_by_length, "sft.group_by_length", "needs every row's length up front",
         "set sft.group_by_length: false, or data.streaming: false"),
        (t.dataloader_num_workers > 0, "training.dataloader_num_workers",
         "must be 0 with data.streaming (the stream's position is saved in each checkpoint from the main process)",
         "set training.dataloader_num_workers: 0"),
    ]  # fmt: skip
    for bad, key, message, hint in refused:
        if bad:
            fail(key, message, hint)


def _check_output_dir(template: str, fail) -> None:
    """output.dir may use {model}, {method} and {peft} only (and {{ }} for literal braces)."""
    known = ", ".join("{" + f + "}" for f in OUTPUT_DIR_FIELDS)
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        fail(
            "output.dir",
            f"is not a valid path template ({e}): {template!r}",
            f"placeholders: {known}; {{{{ }}}} for braces",
        )
    for name, spec, conv in fields:
        if name not in OUTPUT_DIR_FIELDS or spec or conv:
            shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            fail("output.dir", f"has an unknown placeholder {shown}", f"the known ones are {known}")
