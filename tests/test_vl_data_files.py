"""The bundled image dataset in data/vl/: reproducible from make_vl_data.py, valid paths, answers true to pixels."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

Image = pytest.importorskip("PIL.Image")

VL = Path(__file__).resolve().parent.parent / "data" / "vl"
JSONL = ("shapes.jsonl", "shapes_eval.jsonl", "shapes_llava.jsonl")
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURAL = {k: k + ("es" if k.endswith("s") else "s") for k in SHAPES}
NUMBERS = ("None", "One", "Two", "Three")


def _load_script():
    spec = importlib.util.spec_from_file_location("qwentune_make_vl_data", VL / "make_vl_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def read_rows(directory: Path, name: str) -> list[dict]:
    with open(directory / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


MANIFEST = json.loads((VL / "scene.json").read_text(encoding="utf-8"))
SCENES = {s["image"]: s for s in MANIFEST["scenes"]}


def pixels(path: Path) -> tuple[str, tuple[int, int], bytes]:
    with Image.open(path) as im:
        return im.mode, im.size, im.tobytes()


# ---------------------------------------------------------------------------------------------------------------------
# Rows as (images, [(question, answer), ...]) whatever the format


def turns(row: dict) -> tuple[list[str], list[tuple[str, str]]]:
    if "messages" in row:
        assert set(row) == {"messages"}
        msgs = row["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2) and msgs
        first = msgs[0]["content"]
        assert isinstance(first, list) and first[-1]["type"] == "text"
        assert all(p == {"type": "image", "image": p["image"]} for p in first[:-1]) and len(first) >= 2
        images = [p["image"] for p in first[:-1]]
        questions = [first[-1]["text"]] + [m["content"] for m in msgs[2::2]]
        assert all(isinstance(q, str) for q in questions), "images only in the first user turn"
        answers = [m["content"] for m in msgs[1::2]]
    else:
        assert set(row) == {"conversations", "images"}
        conv = row["conversations"]
        assert [m["from"] for m in conv] == ["human", "gpt"] * (len(conv) // 2) and conv
        images = row["images"]
        values = [m["value"] for m in conv[0::2]]
        assert values[0].count("<image>") == len(images), "one placeholder per image"
        assert all("<image>" not in v for v in values[1:]), "placeholders only in the first human turn"
        questions = [values[0].replace("<image>", "").strip()] + values[1:]
        answers = [m["value"] for m in conv[1::2]]
    assert all(q.strip() and a.strip() for q, a in zip(questions, answers))
    return images, list(zip(questions, answers))


# ---------------------------------------------------------------------------------------------------------------------
# Re-deriving each answer from the manifest (written independently of the generator)


def a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def cap(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def expected_single(question: str, scene: dict) -> tuple[str, str]:
    """(question kind, the one correct answer)."""
    shapes = scene["shapes"]
    kinds = [s["shape"] for s in shapes]
    colours = [s["colour"] for s in shapes]
    pairs = list(zip(colours, kinds))
    phrases = [a(f"{c} {k}") for c, k in pairs]
    if question in ("What shapes are in this picture?", "What do you see?", "What is in this image?"):
        return "caption", cap(listing(phrases))
    if question == "Describe this image.":
        return "caption", cap(f"{listing(phrases)} on {a(scene['background'])} background")
    if question in ("How many shapes are there?", "How many shapes are in this picture?"):
        return "count", NUMBERS[len(shapes)] + "."
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        kind = {v: k for k, v in PLURAL.items()}[m[1]]
        return "count_kind", NUMBERS[kinds.count(kind)] + "."
    if re.fullmatch(r"What colou?r is the background\?", question):
        return "background", cap(scene["background"])
    if m := re.fullmatch(r"What colou?r is the (\w+)\?", question):
        assert kinds.count(m[1]) == 1, f"ambiguous: {question} {kinds}"
        return "colour_of", cap(colours[kinds.index(m[1])])
    if question in ("List the shapes from left to right.", "Name the shapes from left to right."):
        assert len(shapes) >= 2
        return "order", cap(", then ".join(phrases))
    if m := re.fullmatch(r"What is the (leftmost|rightmost) shape\?", question):
        c, k = pairs[0] if m[1] == "leftmost" else pairs[-1]
        return "order", cap(f"the {c} {k}")
    if m := re.fullmatch(r"(Which shape is (\w+)\?|What is the (\w+) shape\?)", question):
        colour = m[2] or m[3]
        assert colours.count(colour) == 1, f"ambiguous: {question} {colours}"
        return "shape_of", cap(("the " if m[2] else "a ") + kinds[colours.index(colour)])
    if m := re.fullmatch(r"Is there an? (\w+)( in this picture)?\?", question):
        assert m[1] in SHAPES
        return "exists", "Yes." if m[1] in kinds else "No."
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        return "exists", "Yes." if (m[1], m[2]) in pairs else "No."
    raise AssertionError(f"unrecognised question: {question!r}")


def expected_pair(question: str, first: dict, second: dict) -> tuple[str, str]:
    n1, n2 = len(first["shapes"]), len(second["shapes"])
    k1, k2 = {s["shape"] for s in first["shapes"]}, {s["shape"] for s in second["shapes"]}
    if question == "Which picture has more shapes?":
        assert n1 != n2
        which, more, less = ("first", n1, n2) if n1 > n2 else ("second", n2, n1)
        return "pair_count", f"The {which} picture. It has {NUMBERS[more].lower()} shapes and the other has " + (
            f"{NUMBERS[less].lower()}."
        )
    m = re.fullmatch(r"Which picture has an? (\w+)\?", question)
    assert m, f"unrecognised question: {question!r}"
    assert (m[1] in k1) != (m[1] in k2), "exactly one picture has it"
    return "pair_exists", "The first picture." if m[1] in k1 else "The second picture."


def check_rows(name: str) -> Counter:
    kinds = Counter()
    for row in read_rows(VL, name):
        images, qa = turns(row)
        for path in images:
            assert (VL / path).is_file(), f"{name}: {path} missing (paths are relative to the data file)"
            assert not Path(path).is_absolute()
        scenes = [SCENES[p] for p in images]
        if len(scenes) == 2:
            assert len(qa) == 1 and images[0] != images[1]
            kind, answer = expected_pair(qa[0][0], *scenes)
            assert qa[0][1] == answer, (name, images, qa[0])
            kinds[kind] += 1
            continue
        assert len(scenes) == 1 and len(qa) <= 3
        for question, given in qa:
            kind, answer = expected_single(question, scenes[0])
            assert given == answer, (name, images, question, given, answer)
            kinds[kind] += 1
        kinds["multi_turn_rows"] += len(qa) > 1
    return kinds


# ---------------------------------------------------------------------------------------------------------------------
# Reading a shape off the pixels


def classify(img, bbox: list[int], rgb: tuple[int, ...]) -> str:
    """Which of SHAPES is drawn in bbox, from a few probe points (fractions of the box) and the filled fraction."""
    x0, y0, x1, y1 = bbox
    side = x1 - x0

    def on(u: float, v: float) -> bool:
        return img.getpixel((x0 + int(u * side), y0 + int(v * side))) == rgb

    filled = sum(img.getpixel((x, y)) == rgb for x in range(x0, x1) for y in range(y0, y1)) / side**2
    if on(0.13, 0.13):
        return "square"
    if on(0.02, 0.98) and not on(0.02, 0.02):
        return "triangle"
    if on(0.22, 0.22):
        return "circle"
    if filled < 0.4:
        return "star"
    if on(0.36, 0.06):
        return "cross"
    return "diamond"


# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("vl")
    counts = _load_script().generate(out)
    return out, counts


def test_regenerates_identically(regenerated):
    out, counts = regenerated
    for name in JSONL + ("scene.json",):
        assert (out / name).read_bytes() == (VL / name).read_bytes(), f"{name} differs: rerun make_vl_data.py"
    for name in JSONL:
        assert counts[name] == len(read_rows(VL, name))
    committed = sorted(p.name for p in (VL / "images").iterdir())
    assert committed == sorted(p.name for p in (out / "images").iterdir())
    # Pixels, not PNG bytes, so that another zlib build cannot fail this.
    for name in committed:
        assert pixels(out / "images" / name) == pixels(VL / "images" / name), f"{name} differs"


def test_files_are_small_and_images_fit_qwen2_vl():
    images = sorted((VL / "images").iterdir())
    assert len(images) == len(SCENES) == 144
    assert sum(p.stat().st_size for p in VL.rglob("*") if p.is_file()) < 1_000_000
    for path in images:
        scene = SCENES[f"images/{path.name}"]
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == (scene["width"], scene["height"])
            assert im.width % 28 == 0 and im.height % 28 == 0, "multiples of 28 px: no resizing by the processor"


def test_pixels_match_the_manifest():
    colours = {k: tuple(v) for k, v in MANIFEST["colours"].items()}
    backgrounds = {k: tuple(v) for k, v in MANIFEST["backgrounds"].items()}
    seen = Counter()
    for scene in MANIFEST["scenes"]:
        shapes = scene["shapes"]
        assert 1 <= len(shapes) <= 3
        xs = [s["bbox"][0::2] for s in shapes]
        assert all(a[1] <= b[0] for a, b in zip(xs, xs[1:])), "left to right, no horizontal overlap"
        with Image.open(VL / scene["image"]) as im:
            im = im.convert("RGB")
        bg = backgrounds[scene["background"]]
        assert im.getpixel((0, 0)) == bg
        for s in shapes:
            x0, y0, x1, y1 = s["bbox"]
            assert x1 - x0 == y1 - y0 >= 24
            assert 0 <= x0 and 0 <= y0 and x1 <= im.width and y1 <= im.height
            assert im.getpixel(tuple(s["inside"])) == colours[s["colour"]], (scene["image"], s)
            assert classify(im, s["bbox"], colours[s["colour"]]) == s["shape"], (scene["image"], s)
            seen[s["shape"]] += 1
        # Exactly the listed colours, and nothing drawn outside the boxes.
        assert {c for _, c in im.getcolors()} == {bg} | {colours[s["colour"]] for s in shapes}
        for s in shapes:
            im.paste(bg, tuple(s["bbox"]))
        assert im.getcolors() == [(im.width * im.height, bg)]
    assert set(seen) == set(SHAPES)


def test_answers_match_the_manifest():
    train, held_out, llava = (check_rows(name) for name in JSONL)
    assert sum(train.values()) - train["multi_turn_rows"] >= 150
    assert train["multi_turn_rows"] >= 20 and train["pair_count"] + train["pair_exists"] >= 10
    assert llava["multi_turn_rows"] >= 4 and llava["pair_count"] + llava["pair_exists"] >= 4
    for counts in (train, held_out, llava):
        assert {"caption", "count", "colour_of", "exists", "order"} <= set(counts), counts


def test_row_counts_splits_and_formats():
    rows = {name: read_rows(VL, name) for name in JSONL}
    assert [len(r) for r in rows.values()] == [132, 28, 40]
    used = {name: {p for row in r for p in turns(row)[0]} for name, r in rows.items()}
    splits = {name: {SCENES[p]["split"] for p in paths} for name, paths in used.items()}
    assert splits == {"shapes.jsonl": {"train"}, "shapes_eval.jsonl": {"eval"}, "shapes_llava.jsonl": {"train"}}
    assert used["shapes.jsonl"] == {p for p, s in SCENES.items() if s["split"] == "train"}, "every train image used"
    assert used["shapes_eval.jsonl"] == {p for p, s in SCENES.items() if s["split"] == "eval"}
    answers = [a for row in rows["shapes.jsonl"] for _, a in turns(row)[1] if a in ("Yes.", "No.")]
    assert 0.3 < answers.count("Yes.") / len(answers) < 0.7, "yes/no balanced"
    llava_firsts = [row["conversations"][0]["value"] for row in rows["shapes_llava.jsonl"]]
    assert any(v.startswith("<image>") for v in llava_firsts) and any(v.endswith("<image>") for v in llava_firsts)
