"""`merge_adapter`: merge a LoRA / QLoRA adapter into its base and save a checkpoint plain `transformers` loads.

Modes (`MergeResult.mode`): ``"lora"`` (delta added in fp32, saved in the base's dtype); ``"qlora-dequantized"``
(the default for QLoRA: onto the base as the 4-bit layers saw it, see `quant`); ``"qlora-original-base"`` (onto the
full-precision base; differs from the trained model by the base's 4-bit error). Tied embeddings are untied
deliberately when the adapter touches either matrix. ``streaming=False`` loads base + adapter as a `PeftModel` and
uses PEFT's merge one layer at a time in fp32 (with the tie fixed first: peft's own merge_and_unload leaks LoRA on a
tied lm_head/embed_tokens into the other matrix)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import QwentuneError
from ..model import QuantSpec, resolve_model
from ..patches import release_host_memory
from .adapter import check_adapter_config
from .card import write_card
from .checkpoint import config_dtype, load_model, read_json, untie_config_dict
from .job import MODE_QLORA_DEQUANTIZED, MergeJob, MergeResult, check_qlora_merge, mode_for
from .outdir import prepare_target, staging, write_companions, write_report
from .parity import HALF, choose_parity_rows, logits_of, parity_hold_dtype, parity_image_row, parity_on_dir
from .quant import dequantize_modules_inplace, quantized_module_names
from .shards import verify_output
from .sidecar import image_processor_settings, read_train_sidecar
from .streaming import streaming_merge


def resolve_base(source: str | Path) -> Path:
    """A base-model reference (local dir, hub id, .gguf, offline:…) → a local directory, via the one model resolver."""
    return resolve_model(str(source)).path


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    base: str | Path | None = None,
    qlora_merge: str = "dequantized",
    quantization: QuantSpec | dict | None = None,
    parity_input_ids: list[list[int]] | None = None,
    chat_template: str | None = None,
    tokenizer_source: Path | None = None,
    generation_eos_ids: list[int] | None = None,
    model_card: dict | None = None,
    tolerance: float | None = None,
    streaming: bool = True,
    check_parity: bool = True,
    image_processor: dict | None = None,
    adapter_label: str | None = None,
) -> MergeResult:
    """Merge the adapter saved in `adapter_dir` into its base and write a plain checkpoint to `output_dir`.

    `quantization` (or the sidecar's ``quantization`` block) marks a QLoRA adapter; `qlora_merge` is then
    ``"dequantized"`` (merge onto the base as the 4-bit layers saw it) or ``"original"`` (onto the full-precision
    base). `check_parity=False` skips the parity check (it loads base + adapter, then the result, one at a time,
    held in the base's dtype and computed in fp32) — for models that do not fit in memory even once.
    `image_processor` (Qwen2-VL): settings such as ``{"min_pixels": ..., "max_pixels": ...}`` written into the
    merged dir's image-processor config (None values are left out; the pixel limits also go into ``size``).
    `adapter_label`: how merge_report.json names the adapter (default: its dir)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise QwentuneError(
            "no adapter_config.json here",
            where=str(adapter_dir),
            hint="pass the directory written by PeftModel.save_pretrained (the training run's adapter output)",
        )
    check_qlora_merge(qlora_merge)
    sidecar = read_train_sidecar(adapter_dir)
    spec = QuantSpec.from_dict(quantization) if quantization is not None else sidecar.get("quantization")
    chat_template = chat_template if chat_template is not None else sidecar.get("chat_template")
    card = {**sidecar.get("model_card", {}), **(model_card or {})}
    if image_processor is None:
        image_processor = sidecar.get("image_processor")
    adapter_cfg = read_json(adapter_dir / "adapter_config.json")
    base_ref = base if base is not None else adapter_cfg.get("base_model_name_or_path")
    if not base_ref:
        raise QwentuneError(
            "adapter_config.json names no base model", where=str(adapter_dir), hint="pass base=<local model dir>"
        )
    base_dir = resolve_base(base_ref)
    mode = mode_for(spec, qlora_merge)
    job = MergeJob(
        adapter_dir=adapter_dir,
        base_dir=base_dir,
        base_name=str(base_ref),
        mode=mode,
        spec=spec,
        parity_rows=parity_input_ids,
        chat_template=chat_template,
        tokenizer_source=Path(tokenizer_source) if tokenizer_source is not None else None,
        eos_ids=generation_eos_ids,
        card=card,
        tolerance=tolerance,
        parity=check_parity,
        streaming=streaming,
        adapter_label=adapter_label,
        image_processor=image_processor_settings(image_processor),
    )
    target = prepare_target(output_dir, forbidden=[adapter_dir, base_dir])
    if streaming:
        return streaming_merge(job, target)
    return _load_and_merge_in_memory(job, target)


def _load_and_merge_in_memory(job: MergeJob, target: Path) -> MergeResult:
    """merge_adapter(streaming=False): base + PeftModel, then PEFT's merge one layer at a time in fp32."""
    from peft import PeftModel

    check_adapter_config(read_json(job.adapter_dir / "adapter_config.json"), streaming=False)
    save_dtype = config_dtype(read_json(job.base_dir / "config.json"))
    model = load_model(job.base_dir, parity_hold_dtype(job, save_dtype))
    if job.mode == MODE_QLORA_DEQUANTIZED:
        names = quantized_module_names(model, job.spec)
        dequantize_modules_inplace(model, names, job.spec, job.spec.weights_dtype)
        job.report["quantized_modules"] = len(names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(model, str(job.adapter_dir))
    return merge_peft_model(job, pm, pm.active_adapter, target, max_shard_size="2GB")


def merge_peft_model(job: MergeJob, pm: Any, adapter_name: str, target: Path, *, max_shard_size) -> MergeResult:
    inner = pm.get_base_model()
    base_cfg = read_json(job.base_dir / "config.json") if job.base_dir else inner.config.to_dict()
    save_dtype = config_dtype(base_cfg) if job.base_dir else inner.dtype
    job.parity_dtype = save_dtype if save_dtype in HALF else torch.float32
    pm.eval()
    vocab = innermost(inner.get_input_embeddings()).weight.shape[0]
    rows = choose_parity_rows(job, vocab, _trained_token_ids_in_memory(pm, adapter_name)) if job.parity else []
    job.parity_image = parity_image_row(base_cfg) if job.parity else None
    ref = logits_of(pm, rows, job.parity_image) if job.parity else []
    untied = _untie_in_memory(inner)
    merged = _merge_layers_fp32(pm, adapter_name)
    if untied:
        _set_untied(merged.config)
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config
    base_gen = None
    if job.base_dir is not None and (job.base_dir / "generation_config.json").is_file():
        base_gen = read_json(job.base_dir / "generation_config.json")
    elif getattr(merged, "generation_config", None) is not None:
        base_gen = merged.generation_config.to_diff_dict()
    with staging(target) as tmp:
        merged.to(save_dtype)
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        cfg_dict = read_json(tmp / "config.json")
        if untied:
            untie_config_dict(cfg_dict)
        cfg_dict["dtype"] = str(save_dtype).removeprefix("torch.")
        cfg_dict.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
        del merged
        release_host_memory()  # glibc keeps freed pages: the next model would load beside them
        write_companions(job, tmp, cfg_dict, base_gen, [job.adapter_dir, job.base_dir])
        verify_output(tmp)
        diff, tol = parity_on_dir(job, tmp, ref, rows, save_dtype)
        result = MergeResult(target, job.mode, diff, tol, untied)
        write_card(tmp, job, result, save_dtype)
        write_report(job, tmp, result, save_dtype)
    return result


def _merge_layers_fp32(pm: Any, adapter_name: str) -> Any:
    """PEFT's merge, layer by layer with that layer's base weights upcast to fp32 (then cast back), then unload.

    Same arithmetic as merging an fp32 copy of the model (what the streaming merge computes), at the memory of the
    16-bit model plus one layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in list(pm.modules()):
            if not isinstance(module, BaseTunerLayer):
                continue
            base = module.get_base_layer()
            held = [(p, p.data) for p in base.parameters(recurse=False) if p.dtype in HALF]
            for p, _ in held:
                p.data = p.data.float()
            module.merge(safe_merge=True, adapter_names=[adapter_name])
            for p, original in held:  # back into the original storage: no second copy of the model
                original.copy_(p.data)
                p.data = original
        return pm.merge_and_unload(progressbar=False, adapter_names=[adapter_name])


def _trained_token_ids_in_memory(pm: Any, adapter_name: str) -> list[int]:
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    ids: list[int] = []
    for module in pm.modules():
        if isinstance(module, TrainableTokensLayer):
            ids += list(module.token_indices.get(adapter_name, []))
    return sorted(set(ids))


def innermost(module: Any) -> Any:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    while True:
        if isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        elif isinstance(module, TrainableTokensWrapper):
            module = module.token_adapter
        elif isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        else:
            return module


def _untie_in_memory(inner: Any) -> bool:
    """Give lm_head its own weight before merging when the adapter touches a tied embedding. True if untied."""
    emb, out = inner.get_input_embeddings(), inner.get_output_embeddings()
    if emb is None or out is None:
        return False
    emb0, out0 = innermost(emb), innermost(out)
    if getattr(out0, "weight", None) is None or out0.weight is not emb0.weight:
        return False
    if emb is emb0 and out is out0:
        return False  # tied, untouched: keep the tie
    out0.weight = torch.nn.Parameter(out0.weight.detach().clone(), requires_grad=False)
    return True


def _set_untied(config: Any) -> None:
    config.tie_word_embeddings = False
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        text.tie_word_embeddings = False
