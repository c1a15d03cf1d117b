"""Images in Qwen2-VL rows: where a row's images are, how many `<|image_pad|>` tokens each one becomes, expanding the
single pad the chat template writes into that many, and the collator that turns the images into pixel inputs (the
model's own image processor is loaded by `qwentune.model.vision`).

The official template writes one `<|vision_start|><|image_pad|><|vision_end|>` per image part; the processor would
then repeat the pad t·h·w/merge² times (the image's patch grid, merged 2×2). We tokenize the rendering with the
exact-mask code used for text (one pad token per image, so character offsets stay true) and expand the pads on the
token ids afterwards. The count comes from the image's size alone (`ImageSettings.grid`, the processor's own
`smart_resize`), so rows are sized without decoding pixels twice; the collator checks the processor agrees.

Without torchvision (CPU machines: its PyPI wheels pull a CUDA torch) transformers cannot build `AutoProcessor` for
Qwen2-VL, but the image processor alone works through its Pillow fallback — that is all this module needs.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadRow, QwentuneError
from .canonical import image_reference, is_image_part
from .render import IGNORE_INDEX

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_COLUMNS = ("image_files", "image_sizes")  # not "images": TRL would take the rows for raw vision data


# ---------------------------------------------------------------- how many tokens an image becomes


@dataclass(frozen=True)
class ImageSettings:
    """The image processor settings that decide an image's token count (part of the data cache fingerprint)."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_pad_id: int = 151655
    vision_start_id: int = 151652
    vision_end_id: int = 151653

    def grid(self, width: int, height: int) -> tuple[int, int, int]:
        """(t, h, w) patches of one image, as the processor computes them (resize to multiples of 28 px)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        factor = self.patch_size * self.merge_size
        h, w = smart_resize(height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return 1, h // self.patch_size, w // self.patch_size

    def tokens(self, width: int, height: int) -> int:
        t, h, w = self.grid(width, height)
        return t * h * w // (self.merge_size**2)


def settings_of(processor: Any, tokenizer: Any) -> ImageSettings:
    size = processor.size
    ids = tokenizer.convert_tokens_to_ids
    return ImageSettings(
        patch_size=processor.patch_size,
        merge_size=processor.merge_size,
        temporal_patch_size=processor.temporal_patch_size,
        min_pixels=size["shortest_edge"],
        max_pixels=size["longest_edge"],
        image_pad_id=ids(IMAGE_PAD),
        vision_start_id=ids(VISION_START),
        vision_end_id=ids(VISION_END),
    )


# ---------------------------------------------------------------- images in canonical rows


def image_parts(messages: Iterable[Mapping]) -> list[Mapping]:
    """Every image part in the order the template numbers them."""
    return [
        part
        for msg in messages
        if isinstance(msg.get("content"), list)
        for part in msg["content"]
        if is_image_part(part)
    ]


def _row_messages(row: Mapping) -> list[Mapping]:
    """Every message of a canonical row: SFT `messages`, or a preference row's prompt and both completions."""
    return [*row.get("messages", []), *row.get("prompt", []), *row.get("chosen", []), *row.get("rejected", [])]


def has_images(row: Mapping) -> bool:
    return bool(image_parts(_row_messages(row)))


@dataclass(frozen=True)
class ImageFile:
    """One image of a row: where it is (an absolute path or a data: URI) and its size in pixels."""

    ref: str
    width: int
    height: int


def resolve_reference(value: Any, base_dir: str | None) -> str:
    """An absolute path (relative ones against the data file's folder), or a data: URI kept as is."""
    if isinstance(value, Mapping) and isinstance(value.get("path"), str):  # a `datasets` Image struct
        value = value["path"]
    if not isinstance(value, str) or not value.strip():
        raise BadRow("image_missing", f"an image part has no path ({value!r})")
    if value.startswith("data:image/"):
        return value
    if value.startswith(("http://", "https://")):
        raise BadRow("image_unreadable", f"{value} is a URL; download the images and give their paths")
    path = Path(value.removeprefix("file://")).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return str(path.resolve())


def open_image(ref: str):
    """The image as RGB (Pillow), or BadRow image_missing / image_unreadable / image_too_large (a header claiming
    more than Pillow's MAX_IMAGE_PIXELS, twice its warning limit: a decompression bomb is never decoded)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise QwentuneError("images need Pillow", where="data", hint="pip install 'qwentune[vl]'") from None
    try:
        if ref.startswith("data:image/"):
            source: Any = io.BytesIO(base64.b64decode(ref.split(",", 1)[1], validate=True))
        else:
            source = ref
            if not Path(ref).is_file():
                raise BadRow("image_missing", f"no image file at {ref}")
        with Image.open(source) as image:
            image.load()
            return image.convert("RGB")
    except BadRow:
        raise
    except Image.DecompressionBombError as exc:  # a header claiming more pixels than Pillow's limit: never decoded
        raise BadRow("image_too_large", f"{_short(ref)}: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadRow("image_unreadable", f"{_short(ref)}: {type(exc).__name__}: {exc}") from None


def opened_image(ref: str):
    """`open_image` after the rows were checked (the collator, chat): an image that no longer opens is a one-line
    error, not a traceback."""
    try:
        return open_image(ref)
    except BadRow as bad:
        raise QwentuneError(
            f"cannot use the image ({bad.reason}): {bad.detail}",
            where=_short(ref),
            hint="the image changed since the rows were checked; fix or replace it and run again",
        ) from None


def _short(ref: str) -> str:
    return ref[:40] + "…" if ref.startswith("data:") else ref


def row_images(row: Mapping, base_dir: str | None) -> list[ImageFile]:
    """Open (to check) and size every image of a canonical row, in template order. A preference row's images must
    be in its prompt (they are expanded there and given to both completions)."""
    if image_parts([*row.get("chosen", []), *row.get("rejected", [])]):
        raise BadRow("bad_message", "an image in a chosen/rejected completion; images belong in the prompt")
    messages = _row_messages(row)
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, list) and any(
            isinstance(p, Mapping) and (p.get("type") == "video" or "video" in p) and not is_image_part(p)
            for p in content
        ):
            raise BadRow("video_unsupported", "the row has a video part; only images are supported")
    out = []
    for part in image_parts(messages):
        ref = resolve_reference(image_reference(part), base_dir)
        image = open_image(ref)
        out.append(ImageFile(ref, image.width, image.height))
    return out


# ---------------------------------------------------------------- expanding the pads


def _runs(hits: Iterable[bool]) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive True."""
    runs: list[tuple[int, int]] = []
    for i, hit in enumerate(hits):
        if not hit:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def image_runs(ids: Sequence[int], pad_id: int) -> list[tuple[int, int]]:
    """[start, end) of each run of image pads."""
    return _runs(tid == pad_id for tid in ids)


def expand_pads(
    ids: Sequence[int], labels: Sequence[int] | None, counts: Sequence[int], settings: ImageSettings
) -> tuple[list[int], list[int] | None]:
    """`ids` (and `labels`) with the k-th single image pad repeated counts[k] times. Pads are never trained (an image
    inside an assistant turn keeps its text trained around it)."""
    singles = sum(1 for tid in ids if tid == settings.image_pad_id)
    if singles != len(counts):
        raise BadRow(
            "image_count_mismatch", f"the template rendered {singles} image pad(s) for {len(counts)} image(s)"
        )
    new_ids: list[int] = []
    new_labels: list[int] = []
    k = 0
    for i, tid in enumerate(ids):
        if tid == settings.image_pad_id:
            new_ids += [tid] * counts[k]
            new_labels += [IGNORE_INDEX] * counts[k]
            k += 1
        else:
            new_ids.append(tid)
            if labels is not None:
                new_labels.append(labels[i])
    return new_ids, (new_labels if labels is not None else None)


def expand_prompt(ids: Sequence[int], images: Sequence[str], settings: ImageSettings) -> list[int]:
    """A generation prompt's ids with each image's single pad expanded to its token count (`chat`, `eval`)."""
    counts = [settings.tokens(*opened_image(ref).size) for ref in images]
    return expand_pads(ids, None, counts, settings)[0]


def trained_spans(labels: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of trained labels."""
    return _runs(lab != IGNORE_INDEX for lab in labels)


# ---------------------------------------------------------------- the collator


class VisionCollator:
    """Pads the pre-rendered rows with TRL's own collator (SFT: DataCollatorForLanguageModeling; DPO:
    DataCollatorForPreference, whose batch is [prompt+chosen rows; prompt+rejected rows]) and adds what Qwen2-VL's
    forward needs: pixel_values and image_grid_thw from the image processor, and mm_token_type_ids (1 at image pads).
    The processor's grid must match the pads each row was rendered with, or its images changed since preprocessing."""

    def __init__(self, text_collator: Any, processor: Any, settings: ImageSettings):
        self.text_collator = text_collator
        self.processor = processor
        self.settings = settings

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        files = [list(example.get("image_files") or []) for example in examples]
        text = [{k: v for k, v in ex.items() if k not in IMAGE_COLUMNS} for ex in examples]
        batch = self.text_collator(text)
        ids = batch["input_ids"]
        batch["mm_token_type_ids"] = (ids == self.settings.image_pad_id).long()
        rows_per_example = ids.shape[0] // len(examples)  # DPO: each pair is two rows, chosen ones first
        refs = [ref for _ in range(rows_per_example) for row in files for ref in row]
        if not refs:
            return batch
        expected = [b - a for row in ids.tolist() for a, b in image_runs(row, self.settings.image_pad_id)]
        opened = {ref: opened_image(ref) for ref in dict.fromkeys(refs)}  # DPO: each image once for both rows
        pixels = self.processor(images=[opened[ref] for ref in refs], return_tensors="pt")
        grid = torch.as_tensor(pixels["image_grid_thw"])
        got = (grid.prod(-1) // self.settings.merge_size**2).tolist()
        if got != expected:
            raise ValueError(
                f"image token counts {got} from the image processor differ from the rendered rows' {expected}: "
                "the images or the processor settings changed since the rows were rendered (clear the data cache)"
            )
        batch["pixel_values"] = pixels["pixel_values"]
        batch["image_grid_thw"] = grid
        return batch


def text_only(ids: Sequence[int], settings: ImageSettings) -> list[int]:
    """`ids` without their image tokens (a text-only input for checks that run without pixels)."""
    vision = (settings.image_pad_id, settings.vision_start_id, settings.vision_end_id)
    return [tid for tid in ids if tid not in vision]
