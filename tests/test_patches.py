"""qwentune/patches/internals.py: each reach into TRL/PEFT internals works on the installed versions, is undone when
its block ends (normally, on an error, and after an in-process `qwentune.train`), and fails loudly when the internal
it needs is missing or changed (the lean CPU fold, speed only, falls back to TRL's own and says so once)."""

from __future__ import annotations

import copy
import dataclasses
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model_dir, tiny_training
from transformers import AutoModelForCausalLM

import qwentune
from qwentune.model.loading import lora_config
from qwentune.patches import internals as patches
from qwentune.patches import machinery as patching

ROOT = Path(__file__).resolve().parents[1]
TC, ETC, IMS, IM_END = 151657, 151658, 151644, 151645  # <tool_call> </tool_call> <|im_start|> <|im_end|>


def trl_attributes() -> dict[str, object]:
    """Every TRL module attribute a patch replaces, as it is now."""
    import trl.kernels.chunked_logprob as chunked
    import trl.trainer.utils as trl_utils

    return {
        "trl.trainer.utils._use_triton": trl_utils._use_triton,
        "trl.trainer.utils._ChunkedLogProbFunction": trl_utils._ChunkedLogProbFunction,
        "trl.kernels.chunked_logprob._forward_tile": chunked._forward_tile,
        "trl.kernels.chunked_logprob._backward_tile": chunked._backward_tile,
    }


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert after[name] is before[name], name


def trainable_token_model(tmp_path: Path):
    """A tiny PEFT model whose output layer has trainable token rows (PEFT's TrainableTokensWrapper), with TRL's
    fused head added as SFTTrainer/DPOTrainer add it."""
    from peft import get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path), dtype=torch.float32)
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))  # exactly as SFTTrainer does
    recipe = qwentune.load_recipe({"model": {"source": "x"}, "data": {"train": [str(ROOT / "data/tool_calls.jsonl")]}})
    return get_peft_model(base, lora_config(recipe.peft, base, [TC, ETC]))


# --- peft_output_bias (PEFT 0.21) ------------------------------------------------------------------------------------


def test_peft_output_bias_lets_trls_fused_head_run_on_trainable_tokens(tmp_path):
    """SFTTrainer/DPOTrainer add TRL's fused LM head to the base, then call the PeftModel with fused_lm_head=True;
    the head reads `lm_head.bias`, which PEFT's TrainableTokensWrapper does not have. Inside the block it has; after
    it, the wrapper is as PEFT made it."""
    from peft.utils.other import TrainableTokensWrapper

    peft_model = trainable_token_model(tmp_path)
    head = peft_model.get_output_embeddings()
    assert isinstance(head, TrainableTokensWrapper)
    ids = torch.tensor([[IMS, 77091, 198, TC, 4913, ETC, IM_END]])
    labels = torch.tensor([[-100, -100, -100, TC, 4913, ETC, IM_END]])

    with pytest.raises(AttributeError, match="bias"):
        peft_model(input_ids=ids, labels=labels, fused_lm_head=True)

    with patches.peft_output_bias(peft_model):
        fused = peft_model(input_ids=ids, labels=labels, fused_lm_head=True)
        plain = peft_model(input_ids=ids, labels=labels)  # the unfused forward: full logits + the model's own loss
        torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-5)
        fused.loss.backward()
        delta = peft_model.get_input_embeddings().token_adapter.trainable_tokens_delta["default"]
        assert delta.grad is not None and bool((delta.grad.abs().sum(dim=1) > 0).all())  # both rows get a gradient
    assert "bias" not in head.__dict__ and not hasattr(head, "bias")


def test_peft_output_bias_fails_loudly_when_peft_moved_its_wrapper(tmp_path, monkeypatch):
    import peft.utils.other

    peft_model = trainable_token_model(tmp_path)
    monkeypatch.delattr(peft.utils.other, "TrainableTokensWrapper")
    with pytest.raises(patches.LibraryChanged, match=r"TrainableTokensWrapper is missing .* written for peft 0\.21"):
        with patches.peft_output_bias(peft_model):
            pass


def test_one_trainer_block_restores_everything_when_training_raises(tmp_path):
    peft_model = trainable_token_model(tmp_path)
    head = peft_model.get_output_embeddings()
    before = trl_attributes()
    with pytest.raises(RuntimeError, match="boom"):
        with patches.trl_for_sft(peft_model):
            assert all(trl_attributes()[name] is not before[name] for name in before)  # every patch is in place
            assert head.bias is None
            raise RuntimeError("boom")
    assert_same(before, trl_attributes())
    assert not hasattr(head, "bias")


# --- compact_head_on_cpu (TRL 1.16) ----------------------------------------------------------------------------------


def test_compact_head_on_cpu_projects_only_trained_positions_then_restores(tmp_path, monkeypatch):
    """TRL's fused forward still asks `_use_triton` whether to project only the trained positions: inside the block
    the head function sees the 3 trained positions of 2 × 8, outside it all 14 (shifted) positions."""
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path), dtype=torch.float32)
    add_fused_lm_head(model)
    ids = torch.randint(0, 151000, (2, 8))
    labels = torch.full_like(ids, -100)
    labels[0, 5:] = ids[0, 5:]  # 3 trained positions (the first label is never predicted)
    shipped = trl_utils._ChunkedLogProbFunction
    rows: list[int] = []

    class Counting:  # TRL's own head function, counting the positions it is given
        @staticmethod
        def apply(hidden, *args):
            rows.append(hidden.shape[0])
            return shipped.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Counting)
    original = trl_utils._use_triton
    with patches.compact_head_on_cpu():
        compact = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
    assert trl_utils._use_triton is original
    full = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
    assert rows == [3, 14]
    torch.testing.assert_close(compact, full)


@pytest.mark.parametrize("change", ["missing", "signature", "not_read"])
def test_compact_head_on_cpu_fails_loudly_when_trl_changed(monkeypatch, change):
    import trl.trainer.utils as trl_utils

    if change == "missing":
        monkeypatch.delattr(trl_utils, "_use_triton")
        expected = r"trl\.trainer\.utils\._use_triton is missing"
    elif change == "signature":
        monkeypatch.setattr(trl_utils, "_use_triton", lambda device, backend: False)
        expected = r"_use_triton takes \(device, backend\), not \(device\)"
    else:
        monkeypatch.setattr(trl_utils, "add_fused_lm_head", lambda model: None)
        expected = r"add_fused_lm_head.* no longer reads _use_triton"
    before = getattr(trl_utils, "_use_triton", None)
    with pytest.raises(patches.LibraryChanged, match=expected + r".* written for trl 1\.16"):
        with patches.compact_head_on_cpu():
            pass
    assert getattr(trl_utils, "_use_triton", None) is before


# --- lean_cpu_fold (TRL 1.16, speed only) ----------------------------------------------------------------------------


def test_lean_cpu_fold_installs_on_the_installed_trl_and_restores():
    import trl.kernels.chunked_logprob as chunked

    before = trl_attributes()
    with patches.lean_cpu_fold():
        inside = trl_attributes()
        assert inside["trl.trainer.utils._ChunkedLogProbFunction"].__qualname__.endswith("NarrowTilesOnCPU")
        assert chunked._forward_tile is not before["trl.kernels.chunked_logprob._forward_tile"]
        assert chunked._backward_tile is not before["trl.kernels.chunked_logprob._backward_tile"]
        with patches.lean_cpu_fold():  # nested: already installed, nothing wrapped twice
            assert_same(inside, trl_attributes())
        assert_same(inside, trl_attributes())
    assert_same(before, trl_attributes())


@pytest.mark.parametrize("change", ["missing", "signature", "not_read"])
def test_lean_cpu_fold_falls_back_to_trls_own_fold_and_says_so_once(monkeypatch, capsys, change):
    import trl.kernels.chunked_logprob as chunked

    monkeypatch.setattr(patching, "_said", set())
    if change == "missing":
        monkeypatch.delattr(chunked, "_backward_tile")
        expected = "trl.kernels.chunked_logprob._backward_tile is missing"
    elif change == "signature":
        monkeypatch.setattr(chunked, "_forward_tile", lambda tile, targets, **flags: None)
        expected = "_forward_tile takes (tile, targets, flags), not (tile, tile_stride,"
    else:
        monkeypatch.setattr(chunked.ChunkedLogProbFunction, "forward", staticmethod(lambda ctx, *args: None))
        expected = "no longer reads _forward_tile"
    before = trl_attributes() if change != "missing" else None
    for _ in range(2):
        with patches.lean_cpu_fold():
            if before is not None:
                assert_same(before, trl_attributes())  # TRL's own fold runs
    err = capsys.readouterr().err
    assert err.count(expected) == 1, err
    assert "written for TRL 1.16" in err and "TRL's own CPU fold runs instead" in err


# --- pretokenized_dpo_trainer (TRL 1.16) -----------------------------------------------------------------------------


def test_pretokenized_dpo_trainer_keeps_our_rows_on_the_installed_trl():
    from datasets import Dataset
    from trl import DPOTrainer

    trainer_class = patches.pretokenized_dpo_trainer()
    assert issubclass(trainer_class, DPOTrainer)
    rows = Dataset.from_dict({"prompt_ids": [[1, 2]], "chosen_ids": [[3]], "rejected_ids": [[4]]})
    assert trainer_class._prepare_dataset(None, rows, None, None, "train") is rows


@pytest.mark.parametrize(
    "internal,change",
    [(name, change) for name in ("_prepare_dataset", "_precompute_ref_logps") for change in ("missing", "signature")]
    + [("_prepare_dataset", "not_called")],
)
def test_pretokenized_dpo_trainer_fails_loudly_when_trl_changed(monkeypatch, internal, change):
    from trl import DPOTrainer

    if change == "missing":
        monkeypatch.delattr(DPOTrainer, internal)
        expected = rf"DPOTrainer\.{internal} is missing"
    elif change == "signature":
        monkeypatch.setattr(DPOTrainer, internal, lambda self, dataset, **kwargs: dataset)
        expected = rf"DPOTrainer\.{internal} takes \(self, dataset, kwargs\)"
    else:
        monkeypatch.setattr(DPOTrainer, "__init__", lambda self, *args, **kwargs: None)
        expected = rf"no longer reads {internal}"
    with pytest.raises(patches.LibraryChanged, match=expected + r".* written for trl 1\.16"):
        patches.pretokenized_dpo_trainer()
    with pytest.raises(patches.LibraryChanged):  # and so does the DPO block, before it changes anything
        with patches.trl_for_dpo(None):
            pass


# --- trl_dpo_loss_types (TRL 1.16: read from DPOConfig's help text) -------------------------------------------------


def test_dpo_loss_types_are_read_from_the_installed_trl_else_1_16s_said_once(monkeypatch, capsys):
    from trl import DPOConfig

    assert patches.trl_dpo_loss_types() == patches.TRL_DPO_LOSSES  # TRL 1.16 documents exactly these
    monkeypatch.setattr(patching, "_said", set())
    field = copy.copy(DPOConfig.__dataclass_fields__["loss_type"])
    field.metadata = types.MappingProxyType({"help": "The loss."})
    monkeypatch.setitem(DPOConfig.__dataclass_fields__, "loss_type", field)
    assert {f.name: f for f in dataclasses.fields(DPOConfig)}["loss_type"] is field
    assert patches.trl_dpo_loss_types() == patches.TRL_DPO_LOSSES
    assert patches.trl_dpo_loss_types() == patches.TRL_DPO_LOSSES
    assert capsys.readouterr().err.count("loss_type help names no loss types") == 1


# --- after training in process, TRL is as shipped --------------------------------------------------------------------


def untrained_im_end_model(tmp_path: Path) -> Path:
    """A tiny model whose <|im_end|> rows are 10× too short: the token check flags it and the output layer gets a
    trainable token row (PEFT's TrainableTokensWrapper), so training needs `peft_output_bias` too."""
    model_dir = tiny_model_dir(tmp_path)
    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    for key in state:
        if "embed_tokens" in key or "lm_head" in key:
            state[key][IM_END] *= 0.1
    save_file(state, str(path), metadata={"format": "pt"})
    return model_dir


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_training_in_process_leaves_trl_as_shipped(tmp_path, method):
    data = "data/instructions.jsonl" if method == "sft" else "data/preferences.jsonl"
    recipe = {
        "model": {"source": str(untrained_im_end_model(tmp_path))},
        "data": {"train": [str(ROOT / data)], "limit": 4, "max_length": 256},
        "method": method,
        "peft": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "training": tiny_training(max_steps=1),
        "output": {"dir": str(tmp_path / "run"), "merge": False},
    }
    before = trl_attributes()
    result = qwentune.train(recipe)
    assert result.metrics["global_step"] == 1
    assert result.metrics["trainable_tokens"]["made_trainable"] == [IM_END]  # the PEFT wrapper was trained through
    assert_same(before, trl_attributes())


# --- transformers' GGUF loader ---------------------------------------------------------------------------------------


def _small_gguf(path: Path, value: int) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("test.value", value)
    writer.add_string("test.pad", "x" * value)  # another value, another size: a rewrite is seen even at equal mtimes
    writer.add_tensor("t", np.arange(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_one_gguf_read_shares_one_reader_per_unchanged_file_and_puts_gguf_back(tmp_path):
    import gguf
    from transformers import modeling_gguf_pytorch_utils as loader

    from qwentune.patches.machinery import _problem

    # what the patch relies on: transformers' loader still makes its reader through `gguf.GGUFReader` when called
    assert _problem(gguf, "GGUFReader", read_by=(loader, "load_gguf_checkpoint")) is None
    original = gguf.GGUFReader
    path = _small_gguf(tmp_path / "a.gguf", 1)
    with patches.one_gguf_read():
        first, again = gguf.GGUFReader(str(path)), gguf.GGUFReader(path)
        assert first is again and isinstance(first, original)
        assert int(first.fields["test.value"].parts[-1][0]) == 1
        other = gguf.GGUFReader(_small_gguf(tmp_path / "b.gguf", 2))
        assert other is not first
        _small_gguf(path, 3)  # rewritten: a new reader, not the stale one
        rewritten = gguf.GGUFReader(path)
        assert int(rewritten.fields["test.value"].parts[-1][0]) == 3
        moved = path.rename(tmp_path / "moved.gguf")  # the atomic save renames the file it checked: same file
        assert gguf.GGUFReader(moved) is rewritten
    assert gguf.GGUFReader is original
    assert gguf.GGUFReader(moved) is not gguf.GGUFReader(moved)


# --- PEFT's LoRA input cast ------------------------------------------------------------------------------------------


def test_lora_input_cast_off_keeps_outputs_and_gradients_drops_the_copies_and_restores(tmp_path):
    """Under CPU autocast the same outputs and gradients without the cast (autocast casts the fp32 copy straight back
    to bf16), fewer saved bytes, the flag back on after; fine with trainable token rows (PEFT's own helper raises)."""
    import itertools

    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path), dtype=torch.bfloat16)
    recipe = qwentune.load_recipe({"model": {"source": "x"}, "data": {"train": "x.jsonl"}, "peft": {"dropout": 0.0}})
    model = get_peft_model(base, lora_config(recipe.peft, base, [TC, ETC]))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    ids = torch.tensor([[IMS, 872, TC, 13, 42, ETC, IM_END]])

    def run() -> tuple[torch.Tensor, dict, int]:
        held = {p.untyped_storage().data_ptr() for p in itertools.chain(model.parameters(), model.buffers())}
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in held:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits.float()
        logits.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return logits.detach(), grads, sum(saved.values())

    cast_logits, cast_grads, cast_bytes = run()
    with patches.lora_input_cast_off(model):
        assert not any(layer.cast_input_dtype_enabled for layer in layers)
        logits, grads, saved_bytes = run()
    assert all(layer.cast_input_dtype_enabled for layer in layers)
    torch.testing.assert_close(logits, cast_logits, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], cast_grads[name], rtol=1e-2, atol=1e-4, msg=name)
    assert saved_bytes < cast_bytes
    with patches.lora_input_cast_off(model, active=False):  # fp32 training: the casts stay
        assert all(layer.cast_input_dtype_enabled for layer in layers)
