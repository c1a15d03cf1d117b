"""The training tool catalog: 34 tools across domains and argument types (enum, integer, number, boolean, array,
nested object, optional arguments). Every value is synthetic. The held-out eval tools live in `eval_catalog.py` and
share no name or schema with these.
"""

from __future__ import annotations

from .catalog_core import CORE_TOOLS
from .catalog_more import MORE_TOOLS
from .schema import Tool

TRAIN_TOOLS: list[Tool] = CORE_TOOLS + MORE_TOOLS
TRAIN_BY_NAME = {t.name: t for t in TRAIN_TOOLS}
assert len(TRAIN_BY_NAME) == len(TRAIN_TOOLS)
