"""The recipe's sections: typed dataclasses, one per YAML section, each key with its default and a one-line help
text (`docs/recipe-reference.md` is generated from them). Building, overrides and checks are `load.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = ("auto", "bfloat16", "float16", "float32")
NAME_MAX = 255  # the longest file name (bytes) of every common filesystem


def key(default: Any = dataclasses.MISSING, *, help: str, choices: tuple = (), factory: Any = None) -> Any:
    """A recipe key: its default (or `factory` for a list/section), its one-line help and its allowed values."""
    metadata = {"help": help, **({"choices": choices} if choices else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelSection:
    source: str = key("", help="the base model: hub id, local dir, .gguf file, or offline:qwen2.5-coder-0.5b-instruct")
    adapter: str | None = key(None, help="an adapter dir to keep training (e.g. DPO after SFT); empty: a new adapter")
    revision: str | None = key(None, help="hub revision (branch, tag or commit) of model.source")
    trust_remote_code: bool = key(False, help="run the model repo's own Python code (never needed for Qwen2/2.5/2-VL)")
    dtype: str = key("auto", choices=DTYPES, help="weights' dtype when loaded unquantized; auto: from the precision")
    attn_implementation: str = key(
        "sdpa", choices=("sdpa", "eager", "flash_attention_2"), help="attention kernel passed to transformers"
    )
    min_pixels: int | None = key(None, help="Qwen2-VL: fewest pixels an image is resized to (ignored for text models)")
    max_pixels: int | None = key(None, help="Qwen2-VL: most pixels an image is resized to (ignored for text models)")


FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "preference")


@dataclass
class DataSource:
    """Entries written as a mapping instead of a plain path, each with its own limit, split and format, and (in
    data.train) its weight in the mix."""

    path: str = key("", help="a file, folder, save_to_disk dir or hub id (in Python also a Dataset or list of rows)")
    weight: float | None = key(
        None, help="share of the mixed train rows (relative to the other entries' weights; all entries or none)"
    )
    limit: int | None = key(None, help="only the first N rows of this entry (with data.limit: the smaller)")
    split: str | None = key(None, help="split of a hub dataset or save_to_disk dir; empty: data.split")
    format: str | None = key(None, choices=FORMATS, help="row format of this entry; empty: data.format")


@dataclass
class DataSection:
    train: list[str | DataSource] = key(
        factory=list,
        help="training data: jsonl/json/parquet/csv files, folders, save_to_disk dirs or hub ids, as paths or "
        "mappings (data.train[]); in Python also datasets",
    )
    eval: list[str | DataSource] = key(
        factory=list, help="eval data, same forms as data.train (no weights); empty: none or data.eval_fraction"
    )
    mix_rows: int | None = key(
        None, help="weighted train entries: rows in the mix; empty: the most that repeats no row of any entry"
    )
    dedupe: bool = key(False, help="drop exact duplicate rows (same conversation), counted as duplicate")
    streaming: bool = key(
        False, help="SFT: read and render train rows as training reads them (memory flat); needs training.max_steps"
    )
    shuffle_buffer: int = key(0, help="streamed rows shuffled in a buffer of N (seeded by data.seed); 0: file order")
    eval_fraction: float = key(0.0, help="share of data.train held out for eval when data.eval is empty")
    format: str = key("auto", choices=FORMATS, help="row format of every data file; auto: detected per file")
    template: str = key(
        "model",
        help="chat template: model (the tokenizer's own), qwen2.5-instruct, qwen2.5-base, qwen2-instruct, "
        "qwen2-vl-instruct, or a .jinja path",
    )
    tools: str | None = key(None, help="a JSON file of tools offered to every row that has none")
    system_prompt: str | None = key(None, help="a system message put first in rows that have none")
    max_length: int = key(2048, help="most tokens per row (prompt and answer together)")
    overlong: str = key(
        "drop", choices=("drop", "truncate", "error"), help="a row over data.max_length: skip it, cut it, or stop"
    )
    bad_rows: str = key(
        "skip",
        choices=("skip", "error"),
        help="a row that cannot be trained on exactly: skip it (counted, with its line), or stop at the first",
    )
    train_on: str = key(
        "all", choices=("all", "last"), help="assistant turns with loss: every one, or only each row's last"
    )
    limit: int | None = key(None, help="only the first N rows of each data.train file (quick runs)")
    eval_limit: int | None = key(None, help="only the first N rows of each data.eval file")
    num_proc: int = key(1, help="worker processes that render rows (datasets' map)")
    split: str = key("train", help="split to read from hub datasets and save_to_disk dirs")
    seed: int = key(42, help="seed of the data.eval_fraction split and of the weighted mix's draws")


@dataclass
class SFTSection:
    packing: bool = key(False, help="padding-free packing with position_ids; no attention across rows")
    group_by_length: bool = key(False, help="batch rows of similar length together (less padding)")


@dataclass
class DPOSection:
    beta: float = key(0.1, help="DPO's beta: how far the policy may move from the reference")
    loss_type: list[str] = key(factory=lambda: ["sigmoid"], help="TRL DPO loss types (several: a weighted sum)")
    loss_weights: list[float] | None = key(None, help="weights of the loss types, one each; empty: all 1")
    label_smoothing: float = key(0.0, help="conservative DPO's label smoothing (0: plain DPO)")
    reference: str | None = key(
        None, help="reference model source; empty: the policy with its adapter disabled (or the continued adapter's)"
    )
    precompute_ref_log_probs: bool = key(False, help="score the reference once before training (less memory)")
    rpo_alpha: float | None = key(None, help="RPO: weight of an NLL loss on the chosen answers; empty: none")


GRPO_LOSSES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")  # TRL 1.16's GRPO loss_type


@dataclass
class GRPOSection:
    rewards: dict[str, float] = key(
        factory=lambda: {"tool_call": 1.0, "no_call": 1.0},
        help="reward name: weight; built in: tool_call, no_call, format (docs/grpo.md), or a name passed with "
        "rewards= from Python",
    )
    num_generations: int = key(
        8, help="completions sampled per prompt (the group, ≥ 2); the effective batch (completions) is a multiple"
    )
    max_completion_length: int = key(
        256, help="most tokens generated per completion; a prompt over data.max_length minus it is skipped, never cut"
    )
    temperature: float = key(1.0, help="sampling temperature of the completions")
    beta: float = key(
        0.0, help="KL penalty to the reference (0, TRL's default: none); the base, or a frozen copy of model.adapter"
    )
    loss_type: str = key("dapo", choices=GRPO_LOSSES, help="TRL's GRPO loss variant (dr_grpo: Dr. GRPO, ...)")
    scale_rewards: str = key(
        "group",
        choices=("group", "batch", "none"),
        help="advantages divided by the reward std of the group, of the batch, or not at all (Dr. GRPO: none)",
    )
    use_vllm: bool = key(False, help="generate with vLLM (installed, on a GPU, colocated), not transformers' generate")


@dataclass
class QuantSection:
    bits: int = key(4, choices=(4, 8), help="bits per base weight (bitsandbytes)")
    quant_type: str = key("nf4", choices=("nf4", "fp4"), help="4-bit data type")
    double_quant: bool = key(True, help="quantize the quantization constants too (~0.4 bits per weight less)")
    compute_dtype: str = key(
        "bfloat16", choices=("bfloat16", "float16", "float32"), help="dtype the 4-bit layers compute in"
    )


@dataclass
class PeftSection:
    method: str = key("lora", choices=("lora", "qlora"), help="lora: base in full precision; qlora: base in 4-bit")
    r: int = key(16, help="LoRA rank")
    alpha: int = key(32, help="LoRA alpha (the update is scaled by alpha / r, or alpha / sqrt(r) with rsLoRA)")
    dropout: float = key(0.05, help="dropout on the LoRA input")
    target_modules: list[str] = key(
        factory=lambda: ["all-linear"], help="modules that get LoRA: all-linear, or names like q_proj, v_proj"
    )
    use_rslora: bool = key(False, help="rank-stabilized LoRA scaling (alpha / sqrt(r))")
    use_dora: bool = key(False, help="DoRA: weight-decomposed LoRA")
    modules_to_save: list[str] = key(factory=list, help="modules trained in full and saved with the adapter")
    train_new_tokens: str = key(
        "auto",
        choices=("auto", "off"),
        help="auto: special/added tokens in the trained labels whose embedding rows look untrained get trainable rows",
    )
    train_vision: str = key(
        "off",
        choices=("off", "merger", "all"),
        help="Qwen2-VL: LoRA also on the merger, or on the merger and every vision block; text models: off",
    )
    quant: QuantSection = key(factory=QuantSection, help="the 4-bit settings of peft.method: qlora")


@dataclass
class TrainingSection:
    learning_rate: float = key(2e-4, help="peak learning rate")
    lr_scheduler: str = key(
        "cosine", choices=("cosine", "linear", "constant", "constant_with_warmup"), help="learning-rate schedule"
    )
    warmup_ratio: float = key(0.03, help="share of the steps spent warming up")
    epochs: float = key(1.0, help="passes over data.train (training.max_steps > 0 takes precedence)")
    max_steps: int = key(-1, help="optimizer steps; > 0 overrides training.epochs")
    per_device_batch_size: int = key(1, help="rows per forward pass on each device")
    grad_accum: int = key(8, help="forward passes per optimizer step (effective batch = this x batch x processes)")
    seed: int = key(42, help="seed of initialisation, dropout and shuffling")
    precision: str = key("auto", choices=PRECISIONS, help="compute precision; auto: bf16 where supported, else fp32")
    gradient_checkpointing: bool = key(True, help="recompute activations in backward (less memory, ~30% slower)")
    weight_decay: float = key(0.0, help="AdamW weight decay")
    max_grad_norm: float = key(1.0, help="gradient clipping norm")
    optim: str = key("adamw_torch", help="optimizer name as transformers' TrainingArguments takes it")
    logging_steps: int = key(1, help="log the loss every N steps")
    eval_steps: int | None = key(
        None, help="evaluate every N steps; empty: at the end of each epoch when there is eval data"
    )
    save_steps: int | None = key(None, help="checkpoint every N steps (for --resume); empty: no periodic checkpoints")
    save_total_limit: int = key(2, help="checkpoints kept (oldest deleted first)")
    dataloader_num_workers: int = key(0, help="dataloader worker processes")
    shuffle: bool = key(True, help="shuffle rows; false: file order (several processes then match one process)")
    resume: bool = key(False, help="continue from the run dir's newest complete checkpoint (CLI: train --resume)")


@dataclass
class OutputSection:
    dir: str = key("runs/{model}-{method}-{peft}", help="the run dir; {model} {method} {peft} are filled in")
    merge: bool = key(True, help="merge the adapter into its base after training (merged/, with a parity check)")
    qlora_merge: str = key(
        "dequantized",
        choices=("dequantized", "original"),
        help="QLoRA: merge onto the dequantized 4-bit base (as trained) or onto the original weights",
    )
    overwrite: bool = key(False, help="replace a finished run in output.dir")
    sample_tokens: int = key(
        128, help="after merging, greedy tokens generated from the merged model for one prompt (sample.txt); 0: off"
    )
    push_to_hub: str | None = key(None, help="OWNER/NAME: after a verified merge, upload merged/ and its card")


@dataclass
class LoggingSection:
    report_to: list[str] = key(
        factory=list, help="trackers: wandb, tensorboard, mlflow, ...; empty: metrics.jsonl only"
    )
    project: str = key("qwentune", help="tracker project name")
    run_name: str | None = key(None, help="tracker run name; empty: the run dir's name")


@dataclass
class EvalSection:
    """What `qwentune eval RECIPE_OR_RUN_DIR` scores, and (`enabled`) what training scores at its end: numbers into
    metrics.json["eval"], the table into run_dir/eval.md and the merged model card."""

    enabled: bool = key(False, help="score the tuned (and base) model at the end of training")
    data: list[str] = key(factory=list, help="eval files; empty: the recipe's data.eval")
    limit: int | None = key(None, help="only the first N scoreable rows of each eval file")
    base: bool = key(True, help="score the base model too, side by side with the tuned one")
    max_new_tokens: int = key(256, help="greedy tokens per generated reply")
    batch_size: int = key(8, help="prompts generated together (left-padded)")


@dataclass
class Recipe:
    model: ModelSection = key(factory=ModelSection, help="the base model and how it loads")
    data: DataSection = key(factory=DataSection, help="the rows: files, format, template, lengths")
    method: str = key("sft", choices=("sft", "dpo", "grpo"), help="training method")
    sft: SFTSection = key(factory=SFTSection, help="settings of method: sft")
    dpo: DPOSection = key(factory=DPOSection, help="settings of method: dpo")
    grpo: GRPOSection = key(factory=GRPOSection, help="settings of method: grpo (docs/grpo.md)")
    peft: PeftSection = key(factory=PeftSection, help="the adapter: LoRA or QLoRA")
    training: TrainingSection = key(factory=TrainingSection, help="the optimisation loop")
    output: OutputSection = key(factory=OutputSection, help="the run dir and what is saved after training")
    logging: LoggingSection = key(factory=LoggingSection, help="experiment trackers")
    eval: EvalSection = key(factory=EvalSection, help="scoring after training and for qwentune eval RECIPE")
    # Checked by trainer_fields against the installed TRL.
    trainer: dict[str, Any] = key(
        factory=dict,
        help="fields of the installed TRL SFTConfig/DPOConfig/GRPOConfig that qwentune does not set, passed through "
        "as they are (e.g. neftune_noise_alpha)",
    )
    # Where the recipe came from (not a recipe key): relative data paths resolve against its directory.
    path: Path | None = field(default=None, metadata={"internal": True}, compare=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "path"}

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()
