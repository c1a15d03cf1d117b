"""The model card (README.md) of a merged model or adapter: a page a person would publish on the Hub.

`build_card` is a pure function of explicit inputs: the base as the user wrote it (a hub id, or the offline model's
real name — never a machine path), method/peft and key hyperparameters, the data report summary, the eval table,
the licence, the command that reproduces the run, the trainable-token report in words. Front matter is YAML the Hub
validates (`base_model`, `library_name`, `license`, `tags`, `pipeline_tag`). `card_for_run` reads those inputs
from a run dir (recipe.yaml, data_report.json, metrics.json, merged/merge_report.json).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..model import MARKER, OFFLINE_PREFIX, is_vl
from .job import MODE_LORA, MODE_QLORA_DEQUANTIZED, MODE_QLORA_ORIGINAL, MergeJob, MergeResult

if TYPE_CHECKING:
    import torch


# The real names of the offline models (sources.OFFLINE_MODELS): their Hub repos, for `base_model`.
OFFLINE_HUB_IDS = {"qwen2.5-coder-0.5b-instruct": "Qwen/Qwen2.5-Coder-0.5B-Instruct"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Qwen repos not under Apache-2.0 (their model cards say so); everything else Qwen2/2.5/2-VL here is Apache-2.0.
_PEFT_NAMES = {"lora": "LoRA", "qlora": "QLoRA"}
_OTHER_LICENCES = {"qwen2.5-3b": "qwen-research", "qwen2.5-72b": "qwen"}


@dataclass(frozen=True)
class BaseName:
    hub_id: str | None  # for front matter `base_model` (None: not on the Hub, e.g. a local dir)
    text: str  # how the card names it


def base_name(source: str | Path) -> BaseName:
    """The base as a reader should see it: a hub id as written; `offline:x` → its Hub repo; a GGUF or a local dir →
    its file/dir name only (a qwentune cache dir → the source recorded in it). Never a machine path."""
    text = str(source).strip()
    if text.startswith(OFFLINE_PREFIX):
        name = text[len(OFFLINE_PREFIX) :]
        hub = OFFLINE_HUB_IDS.get(name)
        return BaseName(hub, f"{hub.split('/')[1] if hub else name} (offline GGUF `{text}`, dequantized)")
    if _HUB_ID.match(text) and not Path(text).expanduser().exists():
        return BaseName(text, text)
    path = Path(text).expanduser()
    marker = path / MARKER
    if marker.is_file():  # a GGUF dequantized into the cache: name what it was made from
        try:
            recorded = json.loads(marker.read_text(encoding="utf-8")).get("source")
        except (OSError, ValueError):
            recorded = None
        if isinstance(recorded, str) and recorded and recorded != text:
            return base_name(recorded)
    if path.suffix.lower() == ".gguf":
        return BaseName(None, f"GGUF file `{path.name}` (dequantized)")
    return BaseName(None, f"local model `{path.name}`")


def licence_for(base: BaseName) -> tuple[str, str | None]:
    """(front-matter `license`, `license_name` when it is "other"): Apache-2.0 for the Qwen2/2.5/2-VL models qwentune
    recipes use, except the Qwen2.5 sizes Qwen publishes under its own licences."""
    low = (base.hub_id or base.text).lower()
    for key, name in _OTHER_LICENCES.items():
        if key in low:
            return "other", name
    return "apache-2.0", None


def public_path(value: str) -> str:
    """A data file as the card shows it: relative paths as written, anything absolute or under ~ by its name."""
    if value.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\/]", value):
        return Path(value).name
    return value


def data_lines(reports: Iterable[Mapping]) -> list[str]:
    """One line per data file and split: rows kept of total, rows skipped by reason, rows truncated."""
    lines = []
    for r in reports:
        name = public_path(str(r.get("source", "?")))
        text = f"`{name}` ({r.get('split', 'train')}, format {r.get('detected_format')}): "
        text += f"{r.get('kept', 0)} of {r.get('total', 0)} {r.get('unit', 'rows')} kept"
        skipped = r.get("skipped") or {}
        if skipped:
            text += "; skipped " + ", ".join(
                f"{n} {reason}" for reason, n in sorted(skipped.items(), key=lambda x: -x[1])
            )
        if r.get("truncated"):
            text += f"; {r['truncated']} truncated to max_length"
        lines.append(f"- {text}")
    return lines


def token_lines(report: Mapping | None) -> list[str]:
    """The trainable-token report (tokens.TokenCheck.to_dict) in words."""
    if not report or not report.get("trained_special_tokens"):
        return ["- No special tokens in the trained labels needed new rows."]
    names = {r["token_id"]: r["token"] for r in report.get("rows", [])}
    shown = ", ".join(f"`{names.get(i, i)}`" for i in report["trained_special_tokens"])
    lines = [f"- Special tokens the labels train: {shown}."]
    flagged = report.get("flagged") or []
    if flagged:
        lines.append(
            "- Found untrained in the base (near-identical to many unused rows, or a short row): "
            + ", ".join(f"`{names.get(i, i)}`" for i in flagged)
            + "."
        )
    made = report.get("made_trainable") or []
    if made:
        lines.append(
            "- Made trainable (their rows of `embed_tokens` and `lm_head`, merged into this model): "
            + ", ".join(f"`{names.get(i, i)}`" for i in made)
            + "."
        )
    init = report.get("initialised_from_text") or {}
    if init:
        lines.append("- Each of those rows started from the mean of the rows of the text it stands for.")
    return lines


@dataclass
class CardInputs:
    """Everything the card says, as plain values (paths only as the user wrote them)."""

    title: str
    base: str  # as the user wrote it: hub id, offline:…, a path (shown by name only)
    method: str = "sft"  # sft | dpo | grpo
    peft: str = "lora"  # lora | qlora
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    data: list[dict] = field(default_factory=list)  # data_report.json rows
    metrics: dict[str, Any] = field(default_factory=dict)  # headline numbers: {"eval loss before": 1.2, ...}
    eval_table: str | None = None  # a markdown table, when eval ran
    trainable_tokens: dict | None = None  # tokens.TokenCheck.to_dict()
    merge: dict | None = None  # merge_report.json: mode, max_abs_diff, tolerance
    command: str | None = None  # reproduces the run
    recipe_yaml: str | None = None  # the resolved recipe, paths already made public
    adapter_only: bool = False
    vision: bool = False
    licence: str | None = None  # default: licence_for(base)


def build_card(inputs: CardInputs) -> str:
    """README.md text: Hub front matter, then the page."""
    base = base_name(inputs.base)
    kind = "LoRA adapter" if inputs.adapter_only else "merged model"
    tags = ["qwentune", inputs.peft, inputs.method, "adapter" if inputs.adapter_only else "merged"]
    front: dict[str, Any] = {}
    if base.hub_id:
        front["base_model"] = base.hub_id
    front["library_name"] = "peft" if inputs.adapter_only else "transformers"
    licence, licence_name = (inputs.licence, None) if inputs.licence else licence_for(base)
    front["license"] = licence
    if licence_name:
        front["license_name"] = licence_name
    front["pipeline_tag"] = "image-text-to-text" if inputs.vision else "text-generation"
    front["tags"] = tags
    methods = {"sft": "supervised fine-tuning (SFT)", "dpo": "preference tuning (DPO)",
               "grpo": "reinforcement learning with verifiable rewards (GRPO)"}  # fmt: skip
    method = methods.get(inputs.method, inputs.method)
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(),
        "---",
        "",
        f"# {inputs.title}",
        "",
        f"A {kind} of **{base.text}**, trained with {_PEFT_NAMES.get(inputs.peft, inputs.peft)} {method} using "
        "qwentune (chat-template masks exact to the token); "
        + (
            "the adapter loads with PEFT on the base."
            if inputs.adapter_only
            else "merged into plain safetensors that `transformers` loads (no PEFT needed)."
        ),
        "",
        "## Use it",
        "",
    ]
    if inputs.adapter_only:
        lines += ["```python", "from peft import AutoPeftModelForCausalLM", "",
                  'model = AutoPeftModelForCausalLM.from_pretrained("<this repo or dir>")', "```"]  # fmt: skip
    else:
        lines += ["```bash", "qwentune chat <this repo or dir>  # or any transformers / vLLM / TGI loader", "```"]
    if inputs.hyperparameters:
        lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in inputs.hyperparameters.items()]
    if inputs.data:
        lines += ["", "## Data", ""] + data_lines(inputs.data)
    if inputs.metrics or inputs.eval_table:
        lines += ["", "## Results", ""]
        if inputs.metrics:
            lines += ["| measure | value |", "|---|---|"] + [
                f"| {k} | {_cell(v)} |" for k, v in inputs.metrics.items()
            ]
        if inputs.eval_table:
            lines += ["", inputs.eval_table.strip()]
    lines += ["", "## Special tokens", ""] + token_lines(inputs.trainable_tokens)
    if inputs.merge and not inputs.adapter_only:
        lines += ["", "## Merge check", ""] + _merge_lines(inputs.merge)
    if inputs.command or inputs.recipe_yaml:
        lines += ["", "## Reproduce", ""]
        if inputs.recipe_yaml:
            lines += ["Save this recipe as `recipe.yaml`:", "", "```yaml", inputs.recipe_yaml.strip(), "```", ""]
        if inputs.command:
            lines += ["```bash", inputs.command, "```"]
    lines += ["", "## Licence", "", f"{licence_name or licence}, as the base model ({base.hub_id or base.text})."]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value).replace("|", "\\|")


def _merge_lines(merge: Mapping) -> list[str]:
    lines = [f"- Mode: `{merge.get('mode')}`"]
    diff, tol = merge.get("max_abs_diff"), merge.get("tolerance")
    if isinstance(diff, (int, float)):
        lines.append(
            f"- Logits of this model vs. base + adapter on the parity rows: max |difference| {diff:.3g}"
            + (f" (tolerance {tol:.3g})" if isinstance(tol, (int, float)) else "")
        )
    if merge.get("untied"):
        lines.append("- Embeddings untied on purpose (the adapter trained rows of `embed_tokens`/`lm_head`).")
    return lines


# ------------------------------------------------------------------------------------------- from a run dir


def _read(path: Path) -> Any:
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    return yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)


def _public_source(value: Any) -> Any:
    if not isinstance(value, str) or value.startswith(OFFLINE_PREFIX) or _HUB_ID.match(value):
        return value
    return public_path(value)


def public_recipe(recipe: Mapping) -> dict:
    """The resolved recipe with every path shown by name (model source, adapter, data files, tools, template)."""
    out = json.loads(json.dumps(recipe, default=str))
    model, data, output = out.get("model", {}), out.get("data", {}), out.get("output", {})
    for key in ("source", "adapter"):
        if key in model:
            model[key] = _public_source(model[key])
    for key in ("train", "eval"):
        if isinstance(data.get(key), list):
            data[key] = [_public_source(v) for v in data[key]]
    for key in ("tools", "template"):
        if isinstance(data.get(key), str):
            data[key] = public_path(data[key])
    if isinstance(out.get("dpo", {}).get("reference"), str):
        out["dpo"]["reference"] = _public_source(out["dpo"]["reference"])
    if isinstance(output.get("dir"), str):
        output["dir"] = public_path(output["dir"])
    output.pop("push_to_hub", None)
    return out


def _hyperparameters(recipe: Mapping, metrics: Mapping) -> dict[str, Any]:
    peft, training, data = recipe.get("peft", {}), recipe.get("training", {}), recipe.get("data", {})
    out: dict[str, Any] = {"method": recipe.get("method"), "peft": peft.get("method")}
    if peft.get("method") == "qlora":
        q = peft.get("quant", {})
        out["quantization"] = f"{q.get('bits')}-bit {q.get('quant_type')}, compute {q.get('compute_dtype')}"
    out |= {"LoRA r / alpha / dropout": f"{peft.get('r')} / {peft.get('alpha')} / {peft.get('dropout')}",
            "target modules": peft.get("target_modules"), "learning rate": training.get("learning_rate"),
            "scheduler": training.get("lr_scheduler")}  # fmt: skip
    steps = training.get("max_steps", -1)
    out["length"] = f"{steps} steps" if isinstance(steps, int) and steps > 0 else f"{training.get('epochs')} epochs"
    if metrics.get("effective_batch"):
        out["effective batch"] = metrics["effective_batch"]
    out["max length"] = data.get("max_length")
    out["chat template"] = public_path(str(data.get("template", "model")))
    if recipe.get("method") == "dpo":
        out["beta"] = recipe.get("dpo", {}).get("beta")
    if recipe.get("method") == "grpo":
        g = recipe.get("grpo", {})
        out["rewards"] = " + ".join(f"{w} × {n}" for n, w in (g.get("rewards") or {}).items())
        out["group size / completion tokens"] = f"{g.get('num_generations')} / {g.get('max_completion_length')}"
        out["loss / beta / temperature"] = f"{g.get('loss_type')} / {g.get('beta')} / {g.get('temperature')}"
    return out


def _headline(metrics: Mapping) -> dict[str, Any]:
    names = {"train_loss": "train loss", "eval_loss_before": "eval loss before", "eval_loss_after": "eval loss after",
             "global_step": "optimizer steps"}  # fmt: skip
    out = {label: metrics[key] for key, label in names.items() if isinstance(metrics.get(key), (int, float))}
    for when in ("before", "after"):
        for key, value in (metrics.get(f"eval_{when}") or {}).items():
            if isinstance(value, (int, float)):
                out[f"eval {key} {when}"] = value
    for key, value in ((metrics.get("grpo") or {}).get("measured") or {}).items():  # rewards, parts, zero variance
        if isinstance(value, (int, float)):
            out[f"GRPO {key}"] = value
        elif isinstance(value, list) and len(value) == 2:
            out[f"GRPO {key}, first → last step"] = f"{value[0]:.4g} → {value[1]:.4g}"
    return out


def card_for_run(run_dir: str | Path, *, adapter_only: bool = False, vision: bool | None = None) -> str:
    """The card of a training run dir, from what the run recorded (eval table: run_dir/eval.md when present;
    `vision` None: read from merged/config.json)."""
    run_dir = Path(run_dir)
    if vision is None:
        config = _read(run_dir / "merged" / "config.json")
        vision = bool(config) and is_vl(config)
    recipe = _read(run_dir / "recipe.yaml") or {}
    metrics = _read(run_dir / "metrics.json") or {}
    model = recipe.get("model", {})
    eval_md = run_dir / "eval.md"
    inputs = CardInputs(
        title=run_dir.resolve().name,
        base=str(model.get("source", "unknown")),
        method=str(recipe.get("method", "sft")),
        peft=str(recipe.get("peft", {}).get("method", "lora")),
        hyperparameters=_hyperparameters(recipe, metrics),
        data=_read(run_dir / "data_report.json") or [],
        metrics=_headline(metrics),
        eval_table=eval_md.read_text(encoding="utf-8") if eval_md.is_file() else None,
        trainable_tokens=metrics.get("trainable_tokens"),
        merge=_read(run_dir / "merged" / "merge_report.json") or metrics.get("merge"),
        command="qwentune train recipe.yaml",
        recipe_yaml=yaml.safe_dump(public_recipe(recipe), sort_keys=False, allow_unicode=True) if recipe else None,
        adapter_only=adapter_only,
        vision=vision,
    )
    return build_card(inputs)


MODE_TEXT = {
    MODE_LORA: "LoRA delta added in fp32 to the base weights",
    MODE_QLORA_DEQUANTIZED: "QLoRA: base quantized as in training (bitsandbytes 4-bit) and dequantized, LoRA delta "
    "added in fp32 — the merged model computes what was trained",
    MODE_QLORA_ORIGINAL: "QLoRA adapter merged onto the ORIGINAL full-precision base — differs from the trained "
    "(4-bit) model by the base's quantization error",
}


def write_card(out_dir: Path, job: MergeJob, result: MergeResult, dtype: torch.dtype) -> None:
    """README.md in `out_dir`. `job.card` holds what the caller knows (the sidecar's and `model_card=`): `base` as the
    user wrote it (else the base's path, shown by name), `method`, `peft`, `metrics`; the parity numbers come from
    `result` (max_abs_diff is nan when the check was skipped)."""
    title, base_name, mode, spec, card = result.output_dir.name, job.base_name, job.mode, job.spec, job.card
    untied, diff, tol = result.untied, result.max_abs_diff, result.tolerance
    card = dict(card)
    metrics = card.pop("metrics", None)
    base = str(card.pop("base", None) or base_name)
    method = str(card.pop("method", "sft"))
    peft = str(card.pop("peft", "qlora" if spec is not None else "lora"))
    settings: dict[str, Any] = {"merge": f"{mode}: {MODE_TEXT[mode]}", "dtype": str(dtype).removeprefix("torch.")}
    if spec is not None:
        settings["training quantization"] = (
            f"{spec.bits}-bit {spec.quant_type}, double quant {str(spec.double_quant).lower()}, "
            f"compute {spec.compute_dtype}"
        )
    for key, value in card.items():  # anything else the caller said (data, recipe, ...), in words
        if value is not None:
            settings[key] = ", ".join(f"{k}: {v}" for k, v in value.items()) if isinstance(value, dict) else value
    inputs = CardInputs(
        title=title,
        base=base,
        method=method,
        peft=peft,
        hyperparameters=settings,
        metrics={k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str))},
        trainable_tokens=(metrics or {}).get("trainable_tokens") if isinstance(metrics, dict) else None,
        merge={"mode": mode, "max_abs_diff": None if math.isnan(diff) else diff, "tolerance": tol, "untied": untied},
    )
    (out_dir / "README.md").write_text(build_card(inputs), encoding="utf-8")
