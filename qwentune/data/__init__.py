"""Datasets, from files to the mapped rows training reads: where rows come from (`sources`, `lines`), the mapped
step that runs `rows/` in `Dataset.map` workers and caches its output (`mapped`), the report of every row kept or
skipped (`report`), the pipeline that ties them (`pipeline`) and `qwentune preview` (`highlight`). Imports rows/
and recipe/.
"""

from ..lazy import exports

__all__, __getattr__, __dir__ = exports(
    __name__,
    {
        "eval_parts": ("eval_callbacks", "per_source"),
        "highlight": ("preview",),
        "pipeline": ("PreparedData", "default_tools", "prepare_data"),
        "raw": ("read_split",),
        "sources": ("read_source", "resolve_sources", "take_rows"),
        "streamed": ("stream_callbacks",),
    },
)
