"""One error type for everything a user can get wrong: what, where, and a hint. The CLI turns it into exit code 2."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class QwentuneError(Exception):
    """A user-facing error: `where` names the file/row/key, `hint` says what to do."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" (hint: {self.hint})"
        return text.translate(_LINE_BREAKS)  # one line, whatever the user's text held


# Characters str.splitlines() breaks at, shown escaped so an error about user text stays one line.
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A 'did you mean X?' hint for a misspelt name, or None when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


class BadRow(Exception):
    """A data row that cannot be trained on exactly. `reason` is a short slug used for counting
    (e.g. 'empty', 'no_assistant_turn', 'bad_role_order', 'invalid_tool_json', 'mask_verification_failed',
    'over_length'); `detail` says what was wrong in words."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def json_error_text(error: json.JSONDecodeError) -> str:
    """A JSON parse error in words with its position. json's `msg` may end in 'at' ('Invalid control character
    at'), so the position is phrased to follow either way: 'at column 18', 'at line 3 column 2'."""
    msg = error.msg.removesuffix(" at")
    where = f"line {error.lineno} column {error.colno}" if error.lineno > 1 else f"column {error.colno}"
    return f"{msg} at {where}"


def read_json_file(path: str | Path, *, hint: str) -> Any:
    """A JSON file the user supplied (a model's config.json, a tools file): a QwentuneError naming the file and line
    when it cannot be read, is not UTF-8, or is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QwentuneError(
            f"not valid JSON: {e.msg} (column {e.colno})", where=f"{path}:{e.lineno}", hint=hint
        ) from None
    except UnicodeDecodeError as e:
        raise QwentuneError(
            f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})", where=str(path), hint=hint
        ) from None
    except OSError as e:
        raise QwentuneError(f"cannot read: {e.strerror or e}", where=str(path), hint=hint) from None
