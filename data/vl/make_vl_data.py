#!/usr/bin/env python3
"""Generate qwentune's bundled image dataset for Qwen2-VL: drawn shapes with computed captions and VQA answers.

Every image is drawn by this script: 1-3 simple shapes (circle, square, triangle, star, cross, diamond) in named
colours on a plain background. Every answer is computed from what was drawn, and `scene.json` records it (shape,
colour, bounding box and an inside point per shape) so that tests can check the answers against the pixels.

The output is deterministic: a fixed seed, `random.Random` instances only, no `hash()`, no clock. Shapes are
rasterised here with exact integer or IEEE float arithmetic (no drawing library, no anti-aliasing), and the PNGs are
written with `zlib` at a fixed level, so two runs give byte-identical files (for the same zlib build; the pixels are
identical everywhere).

    python data/vl/make_vl_data.py              # regenerate data/vl/ next to this script
    python data/vl/make_vl_data.py --out DIR    # write the files into DIR instead

Stdlib only (Pillow is not needed to generate, only to read the images). Licence: Apache-2.0 (same as qwentune).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import struct
import zlib
from pathlib import Path

SEED = 20250608
N_TRAIN_IMAGES = 120
N_EVAL_IMAGES = 24
N_TRAIN_PAIRS = 12  # two-image rows in shapes.jsonl
N_EVAL_PAIRS = 4  # two-image rows in shapes_eval.jsonl
N_LLAVA_SINGLE = 30
N_LLAVA_MULTI = 6
N_LLAVA_PAIRS = 4
MULTI_TURN_SHARE = 0.25

FILES = ("shapes.jsonl", "shapes_eval.jsonl", "shapes_llava.jsonl", "scene.json")

# Width × height, all multiples of 28 px so Qwen2-VL's image processor keeps them as they are (one token per 28×28).
SIZES = ((112, 112), (168, 112), (112, 168), (224, 168), (224, 224))
MARGIN = 4
MIN_SIDE = 24

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 90, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "pink": (240, 120, 180),
}
BACKGROUNDS = {
    "white": (255, 255, 255),
    "light grey": (215, 215, 215),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses", "diamond": "diamonds"}  # fmt: skip
NUMBERS = ("none", "one", "two", "three")


def _star() -> tuple[tuple[float, float], ...]:
    """A five-pointed star pointing up, in the unit square. Rounded so that libm differences cannot leak in."""
    points = []
    for i in range(10):
        angle = math.radians(-90 + 36 * i)
        r = 0.5 if i % 2 == 0 else 0.2
        points.append((round(0.5 + r * math.cos(angle), 4), round(0.5 + r * math.sin(angle), 4)))
    return tuple(points)


# Polygons in the unit square (x right, y down); scaled to each shape's s×s bounding box.
POLYGONS = {
    "square": ((0.1, 0.1), (0.9, 0.1), (0.9, 0.9), (0.1, 0.9)),
    "triangle": ((0.5, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "diamond": ((0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)),
    "cross": ((0.32, 0.0), (0.68, 0.0), (0.68, 0.32), (1.0, 0.32), (1.0, 0.68), (0.68, 0.68),
              (0.68, 1.0), (0.32, 1.0), (0.32, 0.68), (0.0, 0.68), (0.0, 0.32), (0.32, 0.32)),
    "star": _star(),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Drawing and PNG writing
# ---------------------------------------------------------------------------------------------------------------------


class Canvas:
    """An RGB image in a bytearray. Pixel (x, y) covers [x, x+1) × [y, y+1) and is filled when its centre is inside."""

    def __init__(self, width: int, height: int, rgb: tuple[int, int, int]):
        self.width, self.height = width, height
        self.buf = bytearray(bytes(rgb) * (width * height))

    def span(self, y: int, x_from: int, x_to: int, rgb: tuple[int, int, int]) -> None:
        """Fill pixels x_from..x_to-1 of row y."""
        x_from, x_to = max(x_from, 0), min(x_to, self.width)
        if x_to > x_from:
            start = 3 * (y * self.width + x_from)
            self.buf[start : start + 3 * (x_to - x_from)] = bytes(rgb) * (x_to - x_from)

    def circle(self, x0: int, y0: int, side: int, rgb: tuple[int, int, int]) -> None:
        # Exact integer test in doubled coordinates: (2x+1 - 2cx)² + (2y+1 - 2cy)² <= side².
        cx2, cy2 = 2 * x0 + side, 2 * y0 + side
        for y in range(y0, y0 + side):
            dy = 2 * y + 1 - cy2
            rest = side * side - dy * dy
            if rest < 0:
                continue
            dx = math.isqrt(rest)  # |2x+1-cx2| <= dx
            x_from = -((-(cx2 - dx - 1)) // 2)  # ceil((cx2 - dx - 1) / 2)
            x_to = (cx2 + dx - 1) // 2 + 1
            self.span(y, x_from, x_to, rgb)

    def polygon(self, points: list[tuple[float, float]], rgb: tuple[int, int, int]) -> None:
        """Even-odd scanline fill, sampling pixel centres."""
        ys = [p[1] for p in points]
        edges = list(zip(points, points[1:] + points[:1]))
        for y in range(max(0, math.floor(min(ys))), min(self.height, math.ceil(max(ys)))):
            yc = y + 0.5
            xs = sorted(
                x1 + (yc - y1) * (x2 - x1) / (y2 - y1)
                for (x1, y1), (x2, y2) in edges
                if min(y1, y2) <= yc < max(y1, y2)
            )
            for a, b in zip(xs[0::2], xs[1::2]):
                self.span(y, math.ceil(a - 0.5), math.ceil(b - 0.5), rgb)

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        stride = 3 * self.width
        raw = b"".join(b"\x00" + bytes(self.buf[y * stride : (y + 1) * stride]) for y in range(self.height))
        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
        idat = zlib.compress(raw, 9)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def draw_shape(canvas: Canvas, kind: str, x0: int, y0: int, side: int, rgb: tuple[int, int, int]) -> None:
    if kind == "circle":
        canvas.circle(x0, y0, side, rgb)
    else:
        canvas.polygon([(x0 + u * side, y0 + v * side) for u, v in POLYGONS[kind]], rgb)


def inside_point(kind: str, x0: int, y0: int, side: int) -> list[int]:
    """A pixel that is certainly inside the shape (the triangle's centroid, else the centre)."""
    return [x0 + side // 2, y0 + (2 * side) // 3 if kind == "triangle" else y0 + side // 2]


# ---------------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------------


def make_scene(rng: random.Random, name: str, split: str) -> dict:
    """1-3 shapes in equal columns, so they never overlap and left-to-right order is unambiguous."""
    width, height = rng.choice(SIZES)
    n = rng.choices((1, 2, 3), weights=(3, 4, 3))[0]
    kinds = rng.sample(SHAPES, n)
    if n >= 2 and rng.random() < 0.25:
        kinds[rng.randrange(1, n)] = kinds[0]  # two of the same kind (always in different colours)
    colours: list[str] = []
    for kind in kinds:
        taken = {c for k, c in zip(kinds, colours) if k == kind}
        colours.append(rng.choice([c for c in COLOURS if c not in taken]))
    background = rng.choice(list(BACKGROUNDS))
    column = width // n
    shapes = []
    for i, (kind, colour) in enumerate(zip(kinds, colours)):
        biggest = min(column - 2 * MARGIN, height - 2 * MARGIN, int(0.55 * min(width, height)))
        side = rng.randint(max(MIN_SIDE, biggest // 2), biggest)
        x0 = rng.randint(i * column + MARGIN, (i + 1) * column - MARGIN - side)
        y0 = rng.randint(MARGIN, height - MARGIN - side)
        shapes.append(
            {
                "shape": kind,
                "colour": colour,
                "bbox": [x0, y0, x0 + side, y0 + side],
                "inside": inside_point(kind, x0, y0, side),
            }
        )
    return {"image": f"images/{name}.png", "split": split, "width": width, "height": height,
            "background": background, "shapes": shapes}  # fmt: skip


def render(scene: dict) -> bytes:
    canvas = Canvas(scene["width"], scene["height"], BACKGROUNDS[scene["background"]])
    for s in scene["shapes"]:
        x0, y0, x1, _ = s["bbox"]
        draw_shape(canvas, s["shape"], x0, y0, x1 - x0, COLOURS[s["colour"]])
    return canvas.png()


# ---------------------------------------------------------------------------------------------------------------------
# Questions and answers
# ---------------------------------------------------------------------------------------------------------------------


def a_an(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def described(shape: dict) -> str:
    return f"{a_an(shape['colour'])} {shape['colour']} {shape['shape']}"


def join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def colour_word(rng: random.Random) -> str:
    return rng.choice(("colour", "colour", "color"))


def kinds_in(scene: dict) -> list[str]:
    return [s["shape"] for s in scene["shapes"]]


def colours_in(scene: dict) -> list[str]:
    return [s["colour"] for s in scene["shapes"]]


def q_caption(rng, scene):
    items = join([described(s) for s in scene["shapes"]])
    background = scene["background"]
    if rng.random() < 0.3:
        return "Describe this image.", sentence(f"{items} on {a_an(background)} {background} background")
    question = rng.choice(("What shapes are in this picture?", "What do you see?", "What is in this image?"))
    return question, sentence(items)


def q_count(rng, scene):
    question = rng.choice(("How many shapes are there?", "How many shapes are in this picture?"))
    return question, sentence(NUMBERS[len(scene["shapes"])])


def q_count_kind(rng, scene):
    kinds = kinds_in(scene)
    present = sorted(set(kinds), key=kinds.index)
    kind = rng.choice(present) if rng.random() < 0.7 else rng.choice([k for k in SHAPES if k not in kinds])
    return f"How many {PLURALS[kind]} are there?", sentence(NUMBERS[kinds.count(kind)])


def q_colour_of(rng, scene):
    kinds = kinds_in(scene)
    s = rng.choice([s for s in scene["shapes"] if kinds.count(s["shape"]) == 1])
    return f"What {colour_word(rng)} is the {s['shape']}?", sentence(s["colour"])


def q_shape_of(rng, scene):
    colours = colours_in(scene)
    s = rng.choice([s for s in scene["shapes"] if colours.count(s["colour"]) == 1])
    if rng.random() < 0.5:
        return f"Which shape is {s['colour']}?", sentence(f"the {s['shape']}")
    return f"What is the {s['colour']} shape?", sentence(f"a {s['shape']}")


def q_exists(rng, scene, yes: bool):
    kinds = kinds_in(scene)
    if rng.random() < 0.5:  # the kind only
        kind = rng.choice(kinds) if yes else rng.choice([k for k in SHAPES if k not in kinds])
        suffix = rng.choice(("", " in this picture"))
        return f"Is there {a_an(kind)} {kind}{suffix}?", sentence("yes" if kind in kinds else "no")
    pairs = [(s["colour"], s["shape"]) for s in scene["shapes"]]
    if yes:
        colour, kind = rng.choice(pairs)
    else:  # often a shape that is there, in a colour it is not
        kind = rng.choice(kinds) if rng.random() < 0.7 else rng.choice(SHAPES)
        colour = rng.choice([c for c in COLOURS if (c, kind) not in pairs])
    return f"Is there {a_an(colour)} {colour} {kind}?", sentence("yes" if (colour, kind) in pairs else "no")


def q_order(rng, scene):
    shapes = scene["shapes"]
    roll = rng.random()
    if roll < 0.5:
        question = rng.choice(("List the shapes from left to right.", "Name the shapes from left to right."))
        return question, sentence(", then ".join(described(s) for s in shapes))
    side, s = ("leftmost", shapes[0]) if roll < 0.75 else ("rightmost", shapes[-1])
    return f"What is the {side} shape?", sentence(f"the {s['colour']} {s['shape']}")


def q_background(rng, scene):
    return f"What {colour_word(rng)} is the background?", sentence(scene["background"])


def applicable(scene: dict) -> list[str]:
    kinds, colours = kinds_in(scene), colours_in(scene)
    out = ["caption", "count", "count_kind", "exists", "background"]
    if any(kinds.count(k) == 1 for k in kinds):
        out.append("colour_of")
    if any(colours.count(c) == 1 for c in colours):
        out.append("shape_of")
    if len(kinds) >= 2:
        out.append("order")
    return out


QUESTIONS = {
    "caption": q_caption,
    "count": q_count,
    "count_kind": q_count_kind,
    "colour_of": q_colour_of,
    "shape_of": q_shape_of,
    "exists": q_exists,  # called with a wanted answer: see Picker.qa
    "order": q_order,
    "background": q_background,
}
# Relative weights: background questions are easy and few.
WEIGHTS = {"caption": 1.0, "count": 0.8, "count_kind": 0.8, "colour_of": 1.0, "shape_of": 0.8, "exists": 1.0,
           "order": 1.0, "background": 0.3}  # fmt: skip


class Picker:
    """Picks question kinds so that the mix follows WEIGHTS: the applicable kind furthest behind its share wins."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.counts = {k: 0 for k in QUESTIONS}
        self.yes_next = rng.random() < 0.5  # yes/no questions alternate between the two answers

    def pick(self, scene: dict, exclude: tuple[str, ...] = ()) -> str:
        options = [k for k in applicable(scene) if k not in exclude]
        self.rng.shuffle(options)  # random tie-break
        kind = min(options, key=lambda k: self.counts[k] / WEIGHTS[k])
        self.counts[kind] += 1
        return kind

    def qa(self, scene: dict, n: int) -> list[tuple[str, str]]:
        kinds: list[str] = []
        for _ in range(n):
            kinds.append(self.pick(scene, tuple(kinds)))
        out = []
        for kind in kinds:
            if kind == "exists":
                out.append(q_exists(self.rng, scene, self.yes_next))
                self.yes_next = not self.yes_next
            else:
                out.append(QUESTIONS[kind](self.rng, scene))
        return out


def q_pair(rng: random.Random, a: dict, b: dict, kind: str) -> tuple[str, str] | None:
    """A question of `kind` ("count" or "exists") about two pictures, or None when the pair has no unambiguous one."""
    na, nb = len(a["shapes"]), len(b["shapes"])
    only = sorted(set(kinds_in(a)) ^ set(kinds_in(b)), key=SHAPES.index)
    if kind == "count" and na != nb:
        more, less, which = (na, nb, "first") if na > nb else (nb, na, "second")
        return "Which picture has more shapes?", (
            f"The {which} picture. It has {NUMBERS[more]} shapes and the other has {NUMBERS[less]}."
        )
    if kind == "exists" and only:
        shape = rng.choice(only)
        which = "first" if shape in kinds_in(a) else "second"
        return f"Which picture has {a_an(shape)} {shape}?", f"The {which} picture."
    return None


def pairs(rng: random.Random, scenes: list[dict], n: int) -> list[tuple[dict, dict, tuple[str, str]]]:
    """n two-picture questions, alternating "which has more shapes?" and "which has a <shape>?"."""
    out = []
    while len(out) < n:
        a, b = rng.sample(scenes, 2)
        qa = q_pair(rng, a, b, ("count", "exists")[len(out) % 2])
        if qa is not None:
            out.append((a, b, qa))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------------


def messages_row(images: list[str], qa: list[tuple[str, str]]) -> dict:
    """OpenAI/Qwen style: the images are parts of the first user turn only."""
    msgs = []
    for i, (question, answer) in enumerate(qa):
        if i == 0:
            parts = [{"type": "image", "image": path} for path in images]
            msgs.append({"role": "user", "content": parts + [{"type": "text", "text": question}]})
        else:
            msgs.append({"role": "user", "content": question})
        msgs.append({"role": "assistant", "content": answer})
    return {"messages": msgs}


def llava_row(images: list[str], qa: list[tuple[str, str]], placeholder_last: bool = False) -> dict:
    """LLaVA/ShareGPT style: one `<image>` per image in the first human turn, and an `images` list."""
    conv = []
    for i, (question, answer) in enumerate(qa):
        if i == 0:
            tags = "\n".join(["<image>"] * len(images))
            question = f"{question}\n{tags}" if placeholder_last else f"{tags}\n{question}"
        conv.append({"from": "human", "value": question})
        conv.append({"from": "gpt", "value": answer})
    return {"conversations": conv, "images": images}


def build(seed: int = SEED) -> tuple[list[dict], dict[str, list[dict]]]:
    """The scenes (train then eval) and the rows of each jsonl file."""
    rng = random.Random(seed)
    scenes = [make_scene(rng, f"{i + 1:04d}", "train" if i < N_TRAIN_IMAGES else "eval")
              for i in range(N_TRAIN_IMAGES + N_EVAL_IMAGES)]  # fmt: skip
    train, held_out = scenes[:N_TRAIN_IMAGES], scenes[N_TRAIN_IMAGES:]

    picker = Picker(random.Random(seed + 1))
    train_rows = []
    for scene in train:
        turns = rng.choice((2, 3)) if rng.random() < MULTI_TURN_SHARE else 1
        train_rows.append(messages_row([scene["image"]], picker.qa(scene, turns)))
    for a, b, qa in pairs(rng, train, N_TRAIN_PAIRS):
        train_rows.insert(rng.randrange(len(train_rows) + 1), messages_row([a["image"], b["image"]], [qa]))

    picker = Picker(random.Random(seed + 2))
    eval_rows = [messages_row([scene["image"]], picker.qa(scene, 1)) for scene in held_out]
    for a, b, qa in pairs(rng, held_out, N_EVAL_PAIRS):
        eval_rows.append(messages_row([a["image"], b["image"]], [qa]))

    picker = Picker(random.Random(seed + 3))
    llava_rows = []
    chosen = rng.sample(train, N_LLAVA_SINGLE + N_LLAVA_MULTI)
    for i, scene in enumerate(chosen):
        turns = 1 if i < N_LLAVA_SINGLE else rng.choice((2, 3))
        llava_rows.append(llava_row([scene["image"]], picker.qa(scene, turns), placeholder_last=i % 6 == 5))
    for a, b, qa in pairs(rng, train, N_LLAVA_PAIRS):
        llava_rows.append(llava_row([a["image"], b["image"]], [qa]))
    rng.shuffle(llava_rows)

    return scenes, {"shapes.jsonl": train_rows, "shapes_eval.jsonl": eval_rows, "shapes_llava.jsonl": llava_rows}


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def scene_json(scenes: list[dict]) -> str:
    """The manifest: colour and background RGB values, then one scene per line."""
    lines = [
        "{",
        f' "colours": {dumps(COLOURS)},',
        f' "backgrounds": {dumps(BACKGROUNDS)},',
        ' "scenes": [',
        ",\n".join("  " + dumps(s) for s in scenes),
        " ]",
        "}",
    ]
    return "\n".join(lines) + "\n"


def generate(out_dir: Path, seed: int = SEED) -> dict[str, int]:
    """Write images/, the jsonl files and scene.json into out_dir; returns the row count of each jsonl file."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    scenes, files = build(seed)
    for scene in scenes:
        (out_dir / scene["image"]).write_bytes(render(scene))
    for name, rows in files.items():
        with open(out_dir / name, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(dumps(row) + "\n")
    with open(out_dir / "scene.json", "w", encoding="utf-8", newline="\n") as f:
        f.write(scene_json(scenes))
    return {name: len(rows) for name, rows in files.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output directory")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for name, n in generate(args.out, args.seed).items():
        print(f"{name}: {n} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
