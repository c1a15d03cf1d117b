"""Qwen2-VL: adapter targets by peft.train_vision, QLoRA that leaves the vision tower unquantized, a training step
with an image, and the merged checkpoint (loads as Qwen2VLForConditionalGeneration, matches base+adapter on an
image row, carries the image processor with the recipe's pixel limits and the official template).

A tiny Qwen2-VL built from config (qwentune.model.shapes: real structure and vocabulary, toy widths); images are made
here with Pillow and processed by transformers' Pillow image processor (no torchvision needed)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from merge_oracle import merge_model_in_memory
from recipe_models import adapter_from_recipe, base_from_recipe
from tiny_models import template_text, tiny_model_dir

from qwentune.errors import QwentuneError
from qwentune.export.merge import merge_adapter
from qwentune.export.sidecar import write_train_sidecar
from qwentune.model.loading import lora_targets
from qwentune.recipe.load import load_recipe

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
Image = pytest.importorskip("PIL.Image")

ROOT = Path(__file__).resolve().parents[1]
VL = "qwen2-vl-2b-instruct"
IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD = 151644, 151645, 151652, 151653, 151655
LM_PARTS = [f"self_attn.{n}_proj" for n in "qkvo"] + [f"mlp.{n}_proj" for n in ("gate", "up", "down")]
LM_LINEARS = {part.rsplit(".", 1)[1] for part in LM_PARTS}
BLOCK_LINEARS = {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
TEMPLATE = template_text("qwen2-vl-instruct")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def recipe(model_dir: Path, **peft_keys):
    return load_recipe(
        {
            "model": {"source": str(model_dir)},
            "data": {"train": [str(ROOT / "data" / "tool_calls.jsonl")]},
            "peft": {"r": 4, "alpha": 8, "dropout": 0.0, **peft_keys},
            "training": {"precision": "fp32"},
        }
    )


def adapted(model_dir: Path, **peft_keys):
    """Base loaded and wrapped exactly as training does (k-bit preparation, gradient checkpointing, PEFT)."""
    r = recipe(model_dir, **peft_keys)
    base = base_from_recipe(r, model_dir)
    torch.manual_seed(0)  # LoRA A's random init: the same whatever ran before in this process
    return adapter_from_recipe(r, base)


def lora_modules(pm) -> set[str]:
    """Module names (without PEFT's prefix) that carry a LoRA adapter."""
    return {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}


def image_inputs(model_dir: Path, size=(56, 84), seed=0) -> dict:
    """One user turn with an image and an assistant answer: ids with one <|image_pad|> per merged patch
    (t*h*w/4 of the processor's grid), the processor's pixel values, and labels on the answer only."""
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy()
    out = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
    pads = int(out["image_grid_thw"].prod()) // 4
    prompt = [IM_START, 872, 198, VISION_START] + [IMAGE_PAD] * pads + [VISION_END, 3838, 374, 419, 30, IM_END, 198]
    answer = [IM_START, 77091, 198, 32, 2518, 9334, 13, IM_END]
    ids = torch.tensor([prompt + answer])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": out["pixel_values"],
        "image_grid_thw": out["image_grid_thw"],
        "mm_token_type_ids": (ids == IMAGE_PAD).long(),
        "labels": torch.tensor([[-100] * (len(prompt) + 3) + answer[3:]]),
    }


def randomize(pm, seed=1, scale=0.1):
    """Random non-zero values for every LoRA tensor, so the adapter changes what the model computes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)
    return pm


@torch.no_grad()
def logits(model, inputs: dict) -> torch.Tensor:
    return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[0].float()


# ------------------------------------------------------------------------------------------------ recipe


def test_train_vision_recipe_key(tmp_path):
    base = {"model": {"source": "x"}, "data": {"train": ["a.jsonl"]}}
    assert load_recipe(base).peft.train_vision == "off"
    assert load_recipe({**base, "peft": {"train_vision": False}}).peft.train_vision == "off"  # YAML's bare `off`
    path = tmp_path / "r.yaml"
    path.write_text("model: {source: x}\ndata: {train: a.jsonl}\npeft:\n  train_vision: off\n")
    assert load_recipe(path).peft.train_vision == "off"
    assert load_recipe(base, ["peft.train_vision=merger"]).peft.train_vision == "merger"
    with pytest.raises(QwentuneError, match="'peft.train_vision' must be one of off, merger, all"):
        load_recipe({**base, "peft": {"train_vision": "vision"}})


def test_train_vision_refused_on_a_text_model(tmp_path):
    text_dir = tiny_model_dir(tmp_path)
    r = recipe(text_dir, train_vision="all")
    with pytest.raises(QwentuneError, match="no vision tower"):
        base_from_recipe(r, text_dir)
    from qwentune.training.validate import _vision_lines

    with pytest.raises(QwentuneError, match="train_vision"):
        _vision_lines(r, text_dir)
    assert _vision_lines(recipe(text_dir), text_dir) == []


# ------------------------------------------------------------------------------------------------ adapter targets


@pytest.mark.parametrize(
    "train_vision, vision_expected",
    [
        ("off", set()),
        ("merger", {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2"}),
        (
            "all",
            {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2"}
            | {f"model.visual.blocks.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS},
        ),
    ],
)
def test_lora_targets_by_train_vision(tmp_path, train_vision, vision_expected):
    model_dir = tiny_model_dir(tmp_path, VL)
    pm = adapted(model_dir, train_vision=train_vision)
    language = {f"model.language_model.layers.{i}.{part}" for i in range(2) for part in LM_PARTS}
    assert lora_modules(pm) == language | vision_expected
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen_vision = [n for n, p in pm.named_parameters() if ".visual." in n and "lora_" not in n]
    assert frozen_vision and not any(pm.get_parameter(n).requires_grad for n in frozen_vision)
    assert any(".visual." in n for n in trainable) == (train_vision != "off")


def test_explicit_target_modules_stay_in_the_language_model(tmp_path):
    model_dir = tiny_model_dir(tmp_path, VL)
    pm = adapted(model_dir, target_modules=["q_proj", "v_proj"], train_vision="merger")
    assert lora_modules(pm) == {
        f"model.language_model.layers.{i}.self_attn.{name}" for i in range(2) for name in ("q_proj", "v_proj")
    } | {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2"}
    with pytest.raises(QwentuneError, match=r"vision-tower modules \['qkv'\]"):
        lora_targets(recipe(model_dir, target_modules=["q_proj", "qkv"]).peft, pm.get_base_model())


# ------------------------------------------------------------------------------------------------ QLoRA


def test_qlora_leaves_the_vision_tower_and_head_unquantized(tmp_path):
    import bitsandbytes as bnb

    model_dir = tiny_model_dir(tmp_path, VL)
    pm = adapted(model_dir, method="qlora")
    inner = pm.get_base_model()
    assert inner.config.quantization_config.llm_int8_skip_modules == ["lm_head", "model.visual"]
    for name, module in inner.named_modules():
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if name.startswith("model.language_model.layers.") and name.rsplit(".", 1)[-1] in LM_LINEARS:
            assert isinstance(base, bnb.nn.Linear4bit), name
        elif name.startswith("model.visual") or name == "lm_head":
            assert not isinstance(base, bnb.nn.Linear4bit), name
    vision = [p for n, p in inner.named_parameters() if n.startswith("model.visual.")]
    assert vision and all(p.dtype == torch.bfloat16 for p in vision)  # the compute dtype, not upcast to fp32
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in inner.model.visual.modules())


# ------------------------------------------------------------------------------------------------ a training step


def _train_step(pm, inputs: dict) -> dict[str, dict[str, torch.Tensor]]:
    """One forward/backward/AdamW step; the parameters before it, by kind."""
    pm.train()
    before = {
        "lora": {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_B" in n},
        "vision": {n: p.detach().clone() for n, p in pm.named_parameters() if ".visual." in n and "lora_" not in n},
    }
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    loss = pm(**inputs).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for n, p in pm.named_parameters() if n in before["vision"])
    optimizer.step()
    return before


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_training_step_moves_lora_not_the_vision_tower(tmp_path, method):
    model_dir = tiny_model_dir(tmp_path, VL)
    pm = adapted(model_dir, method=method)
    inputs = image_inputs(model_dir)
    assert int((inputs["input_ids"] == IMAGE_PAD).sum()) == 6  # 56x84 px -> grid 1x6x4 -> 24 patches / 4
    before = _train_step(pm, inputs)
    params = dict(pm.named_parameters())
    assert before["lora"] and all(not torch.equal(params[n], v) for n, v in before["lora"].items())
    assert before["vision"] and all(torch.equal(params[n], v) for n, v in before["vision"].items())


def test_training_step_with_train_vision_all_moves_vision_lora(tmp_path):
    model_dir = tiny_model_dir(tmp_path, VL)
    pm = adapted(model_dir, train_vision="all")
    before = _train_step(pm, image_inputs(model_dir))
    params = dict(pm.named_parameters())
    vision_lora = {n: v for n, v in before["lora"].items() if ".visual." in n}
    assert len(vision_lora) == 10 and all(not torch.equal(params[n], v) for n, v in vision_lora.items())
    assert all(torch.equal(params[n], v) for n, v in before["vision"].items())


# ------------------------------------------------------------------------------------------------ merged checkpoint


PIXELS = {"min_pixels": 784, "max_pixels": 3136}  # 28x28 .. 56x56 px: a 112x112 image shrinks to a 4x4 patch grid


def _check_merged(out: Path, reference, inputs: dict, *, tol: float) -> None:
    """Loads as Qwen2VLForConditionalGeneration and matches `reference` on the image row; processor files, pixel
    limits, tokenizer and template are there."""
    merged = transformers.Qwen2VLForConditionalGeneration.from_pretrained(out).eval()
    assert float((logits(merged, inputs) - logits(reference, inputs)).abs().max()) < tol
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (784, 3136)
    saved = json.loads((out / "preprocessor_config.json").read_text())
    assert saved["min_pixels"] == 784 and saved["size"] == {"shortest_edge": 784, "longest_edge": 3136}
    grid = processor(images=[Image.new("RGB", (112, 112), (10, 200, 30))], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4]]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == TEMPLATE
    report = json.loads((out / "merge_report.json").read_text())
    assert report["parity"]["image_rows"] == 1 and report["image_processor"] == PIXELS


@pytest.mark.parametrize("train_vision", ["off", "merger", "all"])
def test_merged_vl_matches_base_plus_adapter_on_an_image(tmp_path, train_vision):
    model_dir = tiny_model_dir(tmp_path, VL)
    pm = randomize(adapted(model_dir, train_vision=train_vision)).eval()
    pm.save_pretrained(tmp_path / "adapter")
    inputs = image_inputs(model_dir)
    base = transformers.Qwen2VLForConditionalGeneration.from_pretrained(model_dir).eval()
    assert float((logits(base, inputs) - logits(pm, inputs)).abs().max()) > 1e-2  # the adapter matters
    result = merge_adapter(
        tmp_path / "adapter", tmp_path / "out", base=model_dir, chat_template=TEMPLATE, image_processor=PIXELS
    )
    assert result.max_abs_diff < 1e-4
    _check_merged(tmp_path / "out", pm, inputs, tol=1e-4)
    if train_vision == "off":
        with pytest.raises(QwentuneError, match="min_pixels 5000 > max_pixels 100"):
            merge_adapter(
                tmp_path / "adapter", tmp_path / "bad", image_processor={"min_pixels": 5000, "max_pixels": 100}
            )
        assert not (tmp_path / "bad").exists()
    if train_vision == "all":  # the vision LoRA was merged into the vision weights
        merged = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "out")
        w = "model.visual.blocks.0.attn.qkv.weight"
        assert not torch.equal(merged.get_parameter(w), base.get_parameter(w))
    in_memory = merge_model_in_memory(pm, tmp_path / "in_memory", base=model_dir, image_processor=PIXELS)
    a = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "out").state_dict()
    b = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "in_memory").state_dict()
    assert in_memory.max_abs_diff < 1e-4 and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_qlora_vl_merge_dequantizes_the_language_model_only(tmp_path):
    model_dir = tiny_model_dir(tmp_path, VL)
    pm4 = randomize(adapted(model_dir, method="qlora", train_vision="merger")).eval()
    pm4.save_pretrained(tmp_path / "adapter")
    write_train_sidecar(  # as the trainer writes it: the merge takes the template and pixel limits from here
        tmp_path / "adapter",
        quantization={"compute_dtype": "bfloat16"},
        chat_template=TEMPLATE,
        image_processor={**PIXELS, "unset": None},
    )
    inputs = image_inputs(model_dir)
    result = merge_adapter(tmp_path / "adapter", tmp_path / "out", base=model_dir)
    assert result.mode == "qlora-dequantized" and result.max_abs_diff < result.tolerance
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["quantized_modules"] == 14  # 2 layers x 7 language-model linears; no vision, no lm_head
    scale = float(logits(pm4, inputs).abs().max())
    _check_merged(tmp_path / "out", pm4, inputs, tol=0.05 * scale)  # vs the real 4-bit model's bf16 matmuls

    base = transformers.Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    merged = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "out")
    for name, p in base.named_parameters():
        if name.startswith("model.visual.blocks."):  # unquantized in training, no LoRA: kept bit for bit
            assert torch.equal(merged.get_parameter(name), p), name
    q = "model.language_model.layers.0.self_attn.k_proj.weight"  # 4-bit in training: dequantized
    assert not torch.equal(merged.get_parameter(q), base.get_parameter(q))

    in_memory = merge_model_in_memory(pm4, tmp_path / "in_memory", base=model_dir, image_processor=PIXELS)
    assert in_memory.mode == "qlora-dequantized"
    b = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "in_memory").state_dict()
    assert all(torch.equal(v, b[k]) for k, v in merged.state_dict().items())


def test_merged_vl_loads_with_auto_processor(tmp_path):
    pytest.importorskip("torchvision", reason="transformers 5.23 builds no Qwen2-VL processor without torchvision")
    model_dir = tiny_model_dir(tmp_path, VL)
    pm = randomize(adapted(model_dir))
    pm.save_pretrained(tmp_path / "adapter")
    merge_adapter(
        tmp_path / "adapter", tmp_path / "out", base=model_dir, chat_template=TEMPLATE, image_processor=PIXELS
    )
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "out")
    assert processor.chat_template == TEMPLATE
    assert processor.image_processor.size["longest_edge"] == 3136
