"""One error type for everything a user can get wrong: what, where, and a hint. The CLI turns it into exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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
        return text


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
