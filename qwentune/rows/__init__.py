"""One row at a time, from any format to exact ids and masks: the canonical row (`canonical`), formats converted
to it (`formats`), the official chat template (`template`), turn checks (`turns`), rendering with exact loss masks
(`render`), fitting into max_length (`fit`) and Qwen2-VL images in rows (`images`). Pure per-row functions, no
files and no datasets: imports recipe/ and the bottom floor only.
"""

from ..lazy import exports

__all__, __getattr__, __dir__ = exports(
    __name__,
    {
        "canonical": ("image_reference", "is_image_part", "needs_tools", "normalize_tools"),
        "fit": ("LENGTH_REASONS", "fit_image_row", "fit_pair", "fit_row", "length_bound"),
        "formats": ("DETECT_ROWS", "FORMATS", "convert", "detect_format", "detect_source_format"),
        "images": (
            "IMAGE_COLUMNS",
            "ImageFile",
            "ImageSettings",
            "VisionCollator",
            "expand_pads",
            "expand_prompt",
            "has_images",
            "image_parts",
            "image_runs",
            "opened_image",
            "row_images",
            "settings_of",
            "text_only",
            "trained_spans",
        ),
        "render": ("IGNORE_INDEX", "render_batch", "render_preference_batch"),
        "template": ("BUILTIN_TEMPLATES", "ChatTemplate", "load_template"),
    },
)
