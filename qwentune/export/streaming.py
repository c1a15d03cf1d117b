"""The streaming merge: the base's shards one tensor at a time, each with its adapter ops applied, into
output shards of the same names (peak memory about one tensor plus the adapter)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch

from ..errors import QwentuneError
from ..model import QuantSpec
from ..patches import release_host_memory
from .adapter import KeyIndex, KeyOps, check_adapter_config, load_adapter_tensors, parse_adapter
from .card import write_card
from .checkpoint import config_dtype, load_model, meta_skeleton, read_json, text_config, untie_config_dict
from .job import MODE_QLORA_DEQUANTIZED, MergeJob, MergeResult
from .outdir import staging, write_companions, write_report
from .parity import (
    check_parity_memory,
    choose_parity_rows,
    logits_of,
    parity_hold_dtype,
    parity_image_row,
    parity_on_dir,
)
from .quant import dequantize_modules_inplace, quant_roundtrip, quantized_module_names
from .shards import BaseCheckpoint, ShardReader, ShardWriter, verify_output


def _out_spec(name: str, reader: ShardReader, key: str, ops: dict, save_dtype: torch.dtype):
    """(name, dtype, shape) of an output tensor made from the checkpoint tensor `key`."""
    dtype = reader.dtype(key)
    out_dtype = save_dtype if dtype.is_floating_point else dtype
    entry = ops.get(name)
    shape = tuple(entry.replace.shape) if entry is not None and entry.replace is not None else reader.shape(key)
    return name, out_dtype, shape


def streaming_merge(job: MergeJob, target: Path) -> MergeResult:
    adapter_cfg = read_json(job.adapter_dir / "adapter_config.json")
    check_adapter_config(adapter_cfg, streaming=True)
    parsed = parse_adapter(adapter_cfg, load_adapter_tensors(job.adapter_dir))
    base_cfg = read_json(job.base_dir / "config.json")
    save_dtype = config_dtype(base_cfg)
    ckpt = BaseCheckpoint.open(job.base_dir)
    skeleton = meta_skeleton(job.base_dir)

    # tie structure, in the checkpoint's key names
    tied_pairs = dict(getattr(skeleton, "all_tied_weights_keys", None) or {})
    index = KeyIndex(ckpt.key_to_shard)
    emb_key = head_key = None
    head_virtual = False  # lm_head is not stored (the usual tied checkpoint): it is made from embed_tokens
    for target_name, source_name in tied_pairs.items():
        src = index.find(source_name)
        if src is not None:
            found = index.find(target_name)
            emb_key, head_key, head_virtual = src, found or target_name, found is None
            break
    if head_virtual:
        index = KeyIndex([*ckpt.key_to_shard, head_key])

    # ops per checkpoint key
    ops: dict[str, KeyOps] = {}

    def op(name: str, source: str) -> KeyOps:
        key = index.find(name)
        if key is None:
            raise QwentuneError(
                f"adapter module '{source}' has no tensor '{name}' in the base checkpoint",
                where=str(job.base_dir),
                hint="is this the base the adapter was trained on? (base= overrides adapter_config.json)",
            )
        entry = ops.setdefault(key, KeyOps())
        entry.sources.append(source)
        return entry

    for name, tensor in parsed.replace.items():
        op(name, name).replace = tensor
    for mod, delta in parsed.lora.items():
        op(f"{mod}.weight", mod).lora = delta
    for mod, bias in parsed.lora_bias.items():
        op(f"{mod}.bias", mod).add = bias
    for mod, (idx, values) in parsed.rows.items():
        op(f"{mod}.weight", mod).rows.append((idx, values))
    # PEFT ties a token adapter on the input embedding to lm_head unless lm_head has its own token deltas
    if emb_key and emb_key in ops and ops[emb_key].rows and not (head_key in ops and ops[head_key].rows):
        ops.setdefault(head_key, KeyOps()).rows.extend(ops[emb_key].rows)
    untied = bool(emb_key) and (emb_key in ops or head_key in ops)
    if head_virtual and not untied:
        ops.pop(head_key, None)
    make_head = head_virtual and untied

    quantized: set[str] = set()
    qnames: list[str] = []
    if job.mode == MODE_QLORA_DEQUANTIZED:
        qnames = quantized_module_names(skeleton, job.spec)
        for name in qnames:
            key = index.find(f"{name}.weight")
            if key is None:
                raise QwentuneError(f"no checkpoint tensor for quantized layer {name}", where=str(job.base_dir))
            quantized.add(key)
        for key in quantized & set(ops):
            if ops[key].replace is not None:
                raise QwentuneError(
                    f"{ops[key].sources}: a fully trained copy of a 4-bit layer cannot be merged",
                    where="adapter_model.safetensors",
                )
        job.report["quantized_modules"] = len(quantized)
    load_dtype = job.spec.weights_dtype if job.spec is not None else None
    del skeleton
    if job.parity:
        job.parity_dtype = parity_hold_dtype(job, save_dtype)
        check_parity_memory(ckpt, job.parity_dtype)

    with staging(target) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        done: set[str] = set()
        for shard in ckpt.shards:
            with ShardReader(job.base_dir / shard) as reader:
                specs = []
                for key in reader.keys():
                    if key == emb_key and make_head:
                        specs.append(_out_spec(head_key, reader, key, ops, save_dtype))
                    specs.append(_out_spec(key, reader, key, ops, save_dtype))
                with ShardWriter(tmp / shard, specs) as writer:
                    for key in reader.keys():
                        tensor = reader.get(key)
                        if key == emb_key and make_head:
                            writer.write(
                                head_key,
                                _apply(tensor, ops.get(head_key), False, job.spec, load_dtype, save_dtype, head_key),
                            )
                            done.add(head_key)
                        writer.write(
                            key, _apply(tensor, ops.get(key), key in quantized, job.spec, load_dtype, save_dtype, key)
                        )
                        done.add(key)
                        del tensor
                total += writer.nbytes
                weight_map.update(dict.fromkeys(writer.keys, shard))
            release_host_memory()  # glibc keeps freed pages: the next model would load beside them
        missing = set(ops) - done
        if missing:
            raise QwentuneError(
                f"checkpoint tensors never seen while merging: {sorted(missing)[:4]}", where=str(job.base_dir)
            )
        if ckpt.indexed or len(ckpt.shards) > 1:
            index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")

        cfg_out = copy.deepcopy(base_cfg)
        if untied:
            untie_config_dict(cfg_out)
        emb_rows = _rows_of(emb_key, ops, ckpt, job.base_dir)
        if emb_rows is not None:
            text_config(cfg_out)["vocab_size"] = emb_rows
        cfg_out.pop("quantization_config", None)
        cfg_out["dtype"] = str(save_dtype).removeprefix("torch.")
        if "torch_dtype" in cfg_out:
            cfg_out["torch_dtype"] = cfg_out["dtype"]
        (tmp / "config.json").write_text(json.dumps(cfg_out, indent=2) + "\n")
        base_gen = None
        if (job.base_dir / "generation_config.json").is_file():
            base_gen = read_json(job.base_dir / "generation_config.json")
        facts = write_companions(job, tmp, cfg_out, base_gen, [job.adapter_dir, job.base_dir])
        verify_output(tmp)
        job.report["shards"] = len(ckpt.shards)
        job.report["untied"] = untied

        specials = list(parsed.token_ids)
        del facts, parsed
        ops.clear()  # the adapter tensors are not needed any more
        release_host_memory()
        if job.parity:
            vocab = emb_rows or text_config(cfg_out).get("vocab_size") or 0
            rows = choose_parity_rows(job, int(vocab), specials)
            job.parity_image = parity_image_row(cfg_out)
            ref = _reference_logits(job, qnames, rows)
            diff, tol = parity_on_dir(job, tmp, ref, rows, save_dtype)
        else:
            diff, tol = parity_on_dir(job, tmp, [], [], save_dtype)
        result = MergeResult(target, job.mode, diff, tol, untied)
        write_card(tmp, job, result, save_dtype)
        write_report(job, tmp, result, save_dtype)
    return result


def _rows_of(emb_key: str | None, ops: dict, ckpt: BaseCheckpoint, base_dir: Path) -> int | None:
    """The embedding's row count when a saved embedding layer changed it (resized vocabulary), else None."""
    if emb_key is None or emb_key not in ops or ops[emb_key].replace is None:
        return None
    from safetensors import safe_open

    with safe_open(str(base_dir / ckpt.key_to_shard[emb_key]), "pt") as f:
        rows = f.get_slice(emb_key).get_shape()[0]
    new = ops[emb_key].replace.shape[0]
    return new if new != rows else None


def _apply(
    tensor: torch.Tensor,
    ops: KeyOps | None,
    quantized: bool,
    spec: QuantSpec | None,
    load_dtype: torch.dtype | None,
    save_dtype: torch.dtype,
    key: str,
) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    work = None
    if ops is not None and ops.replace is not None:
        if ops.replace.dim() != tensor.dim() or (ops.replace.shape[1:] != tensor.shape[1:]):
            raise QwentuneError(
                f"{key}: adapter tensor of shape {tuple(ops.replace.shape)} for a base tensor of shape "
                f"{tuple(tensor.shape)}",
                where="adapter_model.safetensors",
            )
        tensor = ops.replace
    if quantized:
        work = quant_roundtrip(tensor, spec, load_dtype)
    if ops is not None and (ops.lora is not None or ops.add is not None or ops.rows):
        work = tensor.float() if work is None else work
        if ops.lora is not None:
            delta = ops.lora.delta()
            if delta.shape != work.shape:
                raise QwentuneError(
                    f"{key}: LoRA delta of shape {tuple(delta.shape)} for a tensor of shape {tuple(work.shape)}",
                    where="adapter_model.safetensors",
                    hint="is this the base the adapter was trained on?",
                )
            if ops.lora.magnitude is not None:  # DoRA: m * (W + dW) / ||W + dW||_row
                merged = work + delta
                norm = torch.linalg.norm(merged, dim=1)
                work = (ops.lora.magnitude.float() / norm).view(-1, 1) * merged
            else:
                work = work + delta
        if ops.add is not None:
            work = work + ops.add
        for idx, values in ops.rows:
            work = work.index_copy(0, torch.tensor(idx, dtype=torch.long), values.to(work.dtype))
    result = tensor if work is None else work
    return result.to(save_dtype).contiguous()


def _reference_logits(job: MergeJob, qnames: list[str], rows: list[list[int]]) -> list[torch.Tensor]:
    """Base + adapter as a PeftModel in fp32 (on the dequantized base for qlora-dequantized)."""
    from peft import PeftModel

    model = load_model(job.base_dir, job.parity_dtype)
    if job.mode == MODE_QLORA_DEQUANTIZED:
        dequantize_modules_inplace(model, qnames, job.spec, job.spec.weights_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(model, str(job.adapter_dir))
    pm.eval()
    out = logits_of(pm, rows, job.parity_image)
    del pm, model
    release_host_memory()
    return out
