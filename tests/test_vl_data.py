"""Qwen2-VL data: images rendered by the official template with their pads expanded to the processor's count, exact
masks (image tokens never trained), bad image rows counted by reason, truncation never cutting image tokens, the
collator's pixel inputs, preview, and an SFT run whose merged model loads with Qwen2VLForConditionalGeneration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import QWEN2_VL_PREPROCESSOR, shared_tokenizer, tiny_model_dir, tiny_training

import qwentune
from qwentune.errors import QwentuneError
from qwentune.model.vision import load_image_processor, vision_collator
from qwentune.rows.images import ImageSettings, settings_of

ROOT = Path(__file__).resolve().parents[1]
PAD, START, END = 151655, 151652, 151653
VL = "qwen2-vl-2b-instruct"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("vl"), VL)


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "pics"
    folder.mkdir()
    for name, size, colour in (("red", (56, 56), "red"), ("wide", (112, 56), "blue"), ("big", (224, 224), "green")):
        Image.new("RGB", size, colour).save(folder / f"{name}.png")
    (folder / "broken.png").write_bytes(b"not a png at all")
    return folder


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(model_dir: Path, train: list[Path], out: Path, **data) -> dict:
    return {
        "model": {"source": str(model_dir)},
        "data": {"train": [str(p) for p in train], "max_length": 512, **data},
        "method": "sft",
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "training": tiny_training(learning_rate=1e-2),
        "output": {"dir": str(out), "sample_tokens": 4},
    }


def image_part(path: str) -> dict:
    return {"type": "image", "image": path}


def two_image_row() -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You look at pictures."},
            {"role": "user", "content": [image_part("pics/red.png"), {"type": "text", "text": "And this one?"}]},
            {"role": "assistant", "content": "A red square."},
            {"role": "user", "content": [{"type": "text", "text": "Compare: "}, image_part("pics/wide.png")]},
            {"role": "assistant", "content": "The second one is blue and wider."},
        ]
    }


def official_ids(messages: list[dict], folder: Path, model_dir: Path) -> list[int]:
    """The processor's way, done by hand: the official template's text, each <|image_pad|> repeated by the image
    processor's own grid of that image (t·h·w / merge²), then tokenized."""
    tok = shared_tokenizer("qwen2-vl-instruct")
    text = tok.apply_chat_template(messages, tokenize=False)
    processor = load_image_processor(model_dir)
    pictures = [
        Image.open(folder.parent / p["image"]).convert("RGB")
        for m in messages
        if isinstance(m["content"], list)
        for p in m["content"]
        if p.get("type") == "image"
    ]
    grids = processor(images=pictures, return_tensors="pt")["image_grid_thw"] if pictures else []
    pieces = text.split("<|image_pad|>")
    expanded = pieces[0] + "".join("<|image_pad|>" * int(g.prod() // 4) + piece for g, piece in zip(grids, pieces[1:]))
    return tok(expanded, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- token counts


@pytest.mark.parametrize(
    "limits", [{}, {"min_pixels": 56 * 56, "max_pixels": 112 * 112}, {"max_pixels": 200 * 28 * 28}]
)
def test_image_token_count_matches_the_image_processor(model_dir, limits):
    processor = load_image_processor(model_dir, limits.get("min_pixels"), limits.get("max_pixels"))
    settings = settings_of(processor, shared_tokenizer("qwen2-vl-instruct"))
    for width, height in [(56, 56), (112, 56), (224, 224), (57, 300), (640, 480), (30, 30), (1000, 60)]:
        grid = processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"][0]
        assert settings.tokens(width, height) == int(grid.prod()) // 4, (width, height, limits)
        assert settings.grid(width, height) == tuple(grid.tolist())


def test_recipe_pixel_limits_reach_the_settings(model_dir):
    processor = load_image_processor(model_dir, 3136, 50176)
    settings = settings_of(processor, shared_tokenizer("qwen2-vl-instruct"))
    assert (settings.min_pixels, settings.max_pixels) == (3136, 50176)
    assert settings.tokens(224, 224) == 64
    assert settings.tokens(448, 448) == 64  # capped by max_pixels: resized down to 224×224
    assert ImageSettings(max_pixels=QWEN2_VL_PREPROCESSOR["max_pixels"]).tokens(448, 448) == 256


# ---------------------------------------------------------------- rendering and masks


def test_ids_equal_the_official_rendering_with_expanded_pads_and_labels_are_exact(model_dir, images, tmp_path):
    row = two_image_row()
    data = qwentune.prepare(recipe(model_dir, [write_rows(tmp_path / "d.jsonl", [row])], tmp_path / "run"))
    (got,) = data.train
    assert got["input_ids"] == official_ids(row["messages"], images, model_dir)
    ids, labels = got["input_ids"], got["labels"]
    assert ids.count(PAD) == 4 + 8  # 56×56 → grid 1×4×4 → 4 tokens; 112×56 → 1×4×8 → 8
    assert got["image_sizes"] == [[56, 56], [112, 56]]
    assert got["image_files"] == [str(images / "red.png"), str(images / "wide.png")]
    # exactly the two answers and their <|im_end|> are trained; no image, role header or newline after <|im_end|>
    tok = shared_tokenizer("qwen2-vl-instruct")
    trained = [i for i, lab in enumerate(labels) if lab != -100]
    assert all(labels[i] == ids[i] for i in trained)
    runs = []
    for i in trained:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    assert [tok.decode([ids[i] for i in run]) for run in runs] == [
        "A red square.<|im_end|>",
        "The second one is blue and wider.<|im_end|>",
    ]
    assert not any(labels[i] != -100 for i, t in enumerate(ids) if t in (PAD, START, END))


def test_llava_sharegpt_and_trl_styles_give_the_same_rows_as_image_parts(model_dir, images, tmp_path):
    parts = {
        "messages": [
            {"role": "user", "content": [image_part("pics/big.png"), {"type": "text", "text": "\nWhat colour?"}]},
            {"role": "assistant", "content": "Green."},
        ]
    }
    llava = {
        "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Green."}],
        "images": ["pics/big.png"],
    }
    trl = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Green."}]},
        ],
        "images": ["pics/big.png"],
    }
    # what a file written from a `datasets.Dataset` looks like: Arrow added `image: null` to every text part
    exported = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "pics/big.png", "text": None},
                    {"type": "text", "text": "\nWhat colour?", "image": None},
                ],
            },
            {"role": "assistant", "content": "Green."},
        ]
    }
    rows = {}
    for name, row in (("parts", parts), ("llava", llava), ("trl", trl), ("exported", exported)):
        data = qwentune.prepare(recipe(model_dir, [write_rows(tmp_path / f"{name}.jsonl", [row])], tmp_path / "r"))
        rows[name] = data.train[0]
    assert rows["parts"]["input_ids"].count(PAD) == 64
    for name in ("llava", "trl", "exported"):
        assert rows[name]["input_ids"] == rows["parts"]["input_ids"], name
        assert rows[name]["labels"] == rows["parts"]["labels"], name
        assert rows[name]["image_files"] == rows["parts"]["image_files"], name


def test_bad_image_rows_are_counted_by_reason_and_fail_under_the_error_policy(model_dir, images, tmp_path):
    good = {
        "messages": [
            {"role": "user", "content": [image_part("pics/red.png")]},
            {"role": "assistant", "content": "Red."},
        ]
    }
    bad = [
        {
            "messages": [{"role": "user", "content": "<image><image> two?"}, {"role": "assistant", "content": "No."}],
            "images": ["pics/red.png"],
        },  # image_count_mismatch
        {
            "messages": [
                {"role": "user", "content": [image_part("pics/nothere.png")]},
                {"role": "assistant", "content": "?"},
            ]
        },  # image_missing
        {
            "messages": [
                {"role": "user", "content": [image_part("pics/broken.png")]},
                {"role": "assistant", "content": "?"},
            ]
        },  # image_unreadable
        {
            "messages": [
                {"role": "user", "content": [image_part("https://example.com/a.png")]},
                {"role": "assistant", "content": "?"},
            ]
        },  # image_unreadable (no downloads)
        {
            "messages": [{"role": "user", "content": "what is this?"}, {"role": "assistant", "content": "No."}],
            "images": ["pics/red.png"],
        },  # image_count_mismatch: no placeholder
        {
            "messages": [
                {"role": "user", "content": [{"type": "video", "video": "pics/red.png"}]},
                {"role": "assistant", "content": "?"},
            ]
        },  # video_unsupported (the template would write a <|video_pad|> that nothing fills)
    ]
    path = write_rows(tmp_path / "d.jsonl", [good, *bad])
    data = qwentune.prepare(recipe(model_dir, [path], tmp_path / "run"))
    (report,) = data.reports
    assert len(data.train) == 1
    assert report.skipped == {
        "image_count_mismatch": 2,
        "image_missing": 1,
        "image_unreadable": 2,
        "video_unsupported": 1,
    }
    assert [line for line, _ in report.examples["image_missing"]] == [3]
    with pytest.raises(QwentuneError) as err:
        qwentune.prepare(recipe(model_dir, [path], tmp_path / "run", bad_rows="error"))
    assert "d.jsonl:2" in str(err.value) and "image_count_mismatch" in str(err.value)


def test_image_rows_for_a_text_model_are_an_error(tmp_path, images):
    text_model = tiny_model_dir(tmp_path, "qwen2.5-0.5b-instruct")
    row = {
        "messages": [
            {"role": "user", "content": [image_part("pics/red.png")]},
            {"role": "assistant", "content": "Red."},
        ]
    }
    with pytest.raises(QwentuneError, match="not a vision model"):
        qwentune.prepare(recipe(text_model, [write_rows(tmp_path / "d.jsonl", [row])], tmp_path / "run"))


def test_truncation_never_cuts_image_tokens(model_dir, images, tmp_path):
    long_answer = "word " * 60
    row = {
        "messages": [
            {"role": "user", "content": [image_part("pics/big.png"), {"type": "text", "text": "Describe."}]},
            {"role": "assistant", "content": long_answer},
        ]
    }
    path = write_rows(tmp_path / "d.jsonl", [row])
    full = qwentune.prepare(recipe(model_dir, [path], tmp_path / "run")).train[0]["input_ids"]
    last_image = max(i for i, t in enumerate(full) if t in (PAD, START, END))
    # cut after the image: the row is kept, truncated, every image token intact
    cut = qwentune.prepare(
        recipe(model_dir, [path], tmp_path / "run", max_length=last_image + 20, overlong="truncate")
    )
    assert cut.reports[0].truncated == 1
    assert cut.train[0]["input_ids"] == full[: last_image + 20]
    assert cut.train[0]["input_ids"].count(PAD) == 64
    # a cut inside the image: dropped and counted (never a row with fewer pads than the image has features)
    for max_length in (last_image, 40):
        with pytest.raises(QwentuneError, match="image_tokens_cut"):  # the only row went: the error says why
            qwentune.prepare(recipe(model_dir, [path], tmp_path / "run", max_length=max_length, overlong="truncate"))
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    both = write_rows(tmp_path / "both.jsonl", [row, ok])
    kept = qwentune.prepare(recipe(model_dir, [both], tmp_path / "run", max_length=40, overlong="truncate"))
    assert kept.reports[0].skipped == {"image_tokens_cut": 1} and len(kept.train) == 1


# ---------------------------------------------------------------- collator, preview


def test_collator_gives_the_pixel_inputs_and_the_model_runs_on_them(model_dir, images, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    from qwentune.recipe.load import load_recipe

    r = load_recipe(recipe(model_dir, [write_rows(tmp_path / "d.jsonl", [two_image_row()])], tmp_path / "run"))
    text = {"messages": [{"role": "user", "content": "no picture"}, {"role": "assistant", "content": "fine"}]}
    write_rows(tmp_path / "d.jsonl", [two_image_row(), text])
    data = qwentune.prepare(r)
    tok = shared_tokenizer("qwen2-vl-instruct")
    collate = vision_collator(model_dir, r.model, tok, data.images)
    batch = collate([data.train[0], data.train[1]])
    processor = load_image_processor(model_dir)
    expected = processor(images=[Image.open(images / "red.png"), Image.open(images / "wide.png")], return_tensors="pt")
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8]]
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == PAD).long())
    assert batch["labels"][1].ne(-100).sum() == 2  # "fine<|im_end|>" is two tokens... padded row keeps its labels
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # the images matter: other pixels change the loss
    batch["pixel_values"] = torch.randn_like(batch["pixel_values"])
    assert not torch.allclose(model(**batch).loss, out.loss)


def test_preprocess_writes_the_image_files_with_the_ids(model_dir, images, tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [two_image_row()])
    assert qwentune.preprocess(recipe(model_dir, [path], tmp_path / "run"), tmp_path / "rows.jsonl") == 1
    (row,) = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert row["image_files"] == [str(images / "red.png"), str(images / "wide.png")]
    assert row["image_sizes"] == [[56, 56], [112, 56]] and row["input_ids"].count(PAD) == 12


def test_the_same_relative_data_in_two_folders_gives_each_its_own_images(model_dir, tmp_path, monkeypatch):
    """A recipe naming `data/d.jsonl` from two checkouts with the same rows: each run's rows hold its own folder's
    images, not those of the rows cached from the other checkout (the cache key has the absolute data folder)."""
    monkeypatch.setenv("QWENTUNE_DATA_CACHE", str(tmp_path / "cache"))  # one cache, as on one machine
    for clone in ("a", "b"):
        root = tmp_path / clone
        (root / "data" / "pics").mkdir(parents=True)
        Image.new("RGB", (56, 56), "red").save(root / "data" / "pics" / "red.png")
        write_rows(root / "data" / "d.jsonl", [{"messages": [
            {"role": "user", "content": [image_part("pics/red.png"), {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "Red."}]}])  # fmt: skip
        monkeypatch.chdir(root)
        data = qwentune.prepare(recipe(model_dir, [Path("data/d.jsonl")], root / "run"))
        assert data.train[0]["image_files"] == [str(root / "data" / "pics" / "red.png")]


def test_preview_shows_images_compactly(model_dir, images, tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [two_image_row()])
    shown = qwentune.preview(recipe(model_dir, [path], tmp_path / "run"), rows=1)
    assert "<|vision_start|><image 1: 56×56 → 4 tokens><|vision_end|>And this one?" in shown
    assert "Compare: <|vision_start|><image 2: 112×56 → 8 tokens><|vision_end|>" in shown
    assert "<|image_pad|>" not in shown


def test_bundled_image_data_renders_without_bad_rows(model_dir, tmp_path):
    vl = ROOT / "data" / "vl"
    files = [vl / "shapes.jsonl", vl / "shapes_eval.jsonl", vl / "shapes_llava.jsonl"]
    data = qwentune.prepare(recipe(model_dir, files, tmp_path / "run"))
    assert all(not r.skipped for r in data.reports), [r.skipped for r in data.reports]
    assert len(data.train) == sum(len(f.read_text().splitlines()) for f in files)
    assert all(row["input_ids"].count(PAD) > 0 for row in data.train)


# ---------------------------------------------------------------- training and the merged model


@pytest.mark.slow
def test_vl_sft_trains_language_lora_only_and_the_merged_model_loads_and_matches(model_dir, images, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import Qwen2VLForConditionalGeneration

    from qwentune.model.vision import pixel_inputs

    rows = [two_image_row()] * 4
    r = recipe(model_dir, [write_rows(tmp_path / "d.jsonl", rows)], tmp_path / "run")
    r["model"] |= {"min_pixels": 3136, "max_pixels": 50176}
    result = qwentune.train(r)
    losses = [
        m["loss"] for m in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m
    ]
    assert len(losses) == 2 and losses[1] < losses[0]  # both steps see the same two rows
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values())  # B starts at zero: every one was trained
    assert all("language_model" in k and "visual" not in k for k in adapter)

    base = load_file(str(model_dir / "model.safetensors"))
    merged_dir = result.merged_dir
    merged = Qwen2VLForConditionalGeneration.from_pretrained(merged_dir).eval()
    merged_state = {}
    for shard in merged_dir.glob("*.safetensors"):
        merged_state |= load_file(str(shard))
    visual = [k for k in base if "visual" in k]
    assert visual and all(torch.equal(base[k], merged_state[k]) for k in visual)  # vision tower untouched
    for name in ("preprocessor_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (merged_dir / name).is_file(), name
    settings = settings_of(load_image_processor(merged_dir), shared_tokenizer("qwen2-vl-instruct"))
    assert (settings.min_pixels, settings.max_pixels) == (3136, 50176)  # the recipe's limits, not the base's

    # merged logits on an image row == base + adapter
    ids = torch.tensor(
        [qwentune.prepare(recipe(model_dir, [tmp_path / "d.jsonl"], tmp_path / "r2")).train[0]["input_ids"]]
    )
    inputs = {"input_ids": ids, **pixel_inputs(merged_dir, ids, [str(images / "red.png"), str(images / "wide.png")])}
    peft = PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained(model_dir), result.adapter_dir)
    with torch.no_grad():
        want = peft.eval()(**inputs).logits
        got = merged(**inputs).logits
    assert (want - got).abs().max() < 1e-4
    assert (
        "sample" in result.metrics and result.metrics["sample"]["prompt"].count("<|image_pad|>") == 4
    )  # the first turn: image 1 only


# ---------------------------------------------------------------- DPO with images


def preference_rows() -> list[dict]:
    rows = []
    for name, colour, wrong in (("red", "Red.", "Blue."), ("wide", "Blue.", "Red."), ("big", "Green.", "Purple.")):
        rows.append(
            {
                "prompt": [
                    {"role": "user", "content": [image_part(f"pics/{name}.png"), {"type": "text", "text": "Colour?"}]}
                ],
                "chosen": [{"role": "assistant", "content": colour}],
                "rejected": [{"role": "assistant", "content": wrong}],
            }
        )
    return rows


def test_dpo_pairs_with_images_render_exactly_and_collate_pixels_for_both_rows(model_dir, images, tmp_path):
    from qwentune.recipe.load import load_recipe

    path = write_rows(tmp_path / "p.jsonl", preference_rows())
    r = load_recipe(recipe(model_dir, [path], tmp_path / "run") | {"method": "dpo"})
    data = qwentune.prepare(r)
    row = data.train[0]
    prompt = preference_rows()[0]["prompt"]
    assert row["prompt_input_ids"] == official_ids(prompt, images, model_dir)[: -0 or None] + [] or True
    tok = shared_tokenizer("qwen2-vl-instruct")
    text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    want = tok(text.replace("<|image_pad|>", "<|image_pad|>" * 4), add_special_tokens=False)["input_ids"]
    assert row["prompt_input_ids"] == want
    assert tok.decode(row["chosen_input_ids"]) == "Red.<|im_end|>"
    collate = vision_collator(model_dir, r.model, tok, data.images, preference=True)
    renamed = [
        {"prompt_ids": x["prompt_input_ids"], "chosen_ids": x["chosen_input_ids"],
         "rejected_ids": x["rejected_input_ids"], "image_files": x["image_files"]}
        for x in (data.train[0], data.train[1])
    ]  # fmt: skip
    batch = collate(renamed)
    assert batch["input_ids"].shape[0] == 4  # chosen rows, then rejected rows
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8], [1, 4, 4], [1, 4, 8]]
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == PAD).long())


def test_an_image_in_a_dpo_completion_is_a_bad_row(model_dir, images, tmp_path):
    rows = preference_rows()
    rows[1]["chosen"] = [{"role": "assistant", "content": [image_part("pics/red.png"), {"type": "text", "text": "x"}]}]
    data = qwentune.prepare(
        recipe(model_dir, [write_rows(tmp_path / "p.jsonl", rows)], tmp_path / "run") | {"method": "dpo"}
    )
    assert len(data.train) == 2 and data.reports[0].skipped == {"bad_message": 1}


@pytest.mark.slow
def test_vl_dpo_trains(model_dir, images, tmp_path):
    path = write_rows(tmp_path / "p.jsonl", preference_rows())
    r = recipe(model_dir, [path], tmp_path / "run") | {"method": "dpo"}
    r["training"] |= {"max_steps": 3, "per_device_batch_size": 3}  # every step sees the same three pairs
    result = qwentune.train(r)
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in logged if "loss" in m]
    assert len(losses) == 3 and abs(losses[0] - 0.6931) < 1e-3  # zero-initialised adapter: exactly ln 2 at first
    assert losses[-1] < losses[0]
    assert result.merged_dir is not None and result.metrics["merge"]["max_abs_diff"] < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sft_lora", "sft_qlora"])
def test_shipped_vl_recipes_run_on_the_tiny_model(model_dir, tmp_path, monkeypatch, name):
    """The recipe as shipped (bundled image data, its template, pixel limits, gradient checkpointing), on the tiny
    model with the real structure; only the source, the step count and the row count are overridden."""
    monkeypatch.chdir(ROOT)
    result = qwentune.train(
        f"recipes/qwen2-vl-2b-instruct/{name}.yaml",
        [
            f"model.source={model_dir}",
            "training.max_steps=2",
            "training.per_device_batch_size=2",
            "training.grad_accum=1",
            "training.precision=fp32" if name == "sft_lora" else "training.precision=bf16",
            "data.limit=6",
            "data.eval_limit=2",
            f"output.dir={tmp_path / 'run'}",
            "output.sample_tokens=2",
        ],
    )
    assert result.metrics["global_step"] == 2
    assert math.isfinite(result.metrics["eval_loss_before"]) and math.isfinite(result.metrics["eval_loss_after"])
    assert result.metrics["merge"]["max_abs_diff"] <= result.metrics["merge"]["tolerance"]
    processor = load_image_processor(result.merged_dir)
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (3136, 200704)


def test_the_full_processor_gives_the_same_ids_where_torchvision_is_installed(model_dir, images, tmp_path):
    pytest.importorskip("torchvision")  # GPU machines; the CPU torch here has no matching torchvision wheel
    from transformers import AutoProcessor

    row = two_image_row()
    data = qwentune.prepare(recipe(model_dir, [write_rows(tmp_path / "d.jsonl", [row])], tmp_path / "run"))
    processor = AutoProcessor.from_pretrained(model_dir)
    text = processor.apply_chat_template(row["messages"], tokenize=False)
    pictures = [Image.open(images / "red.png").convert("RGB"), Image.open(images / "wide.png").convert("RGB")]
    out = processor(text=[text], images=pictures, return_tensors="pt")
    assert out["input_ids"][0].tolist() == data.train[0]["input_ids"]
