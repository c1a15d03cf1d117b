"""How qwentune patches a library's internals (the patches themselves are all in `internals.py`): the check that an
internal is still there with the signature and reader a patch was written for, the error that says it moved
(`LibraryChanged`), and a scoped replacement that puts back what was there."""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import types

from ..errors import QwentuneError
from ..logs import log


class LibraryChanged(QwentuneError):
    """An internal that a patch needs is missing or changed in the installed library."""


def _version(library: str) -> str:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _changed(library: str, written_for: str, problem: str) -> LibraryChanged:
    installed = _version(library)
    return LibraryChanged(
        f"{problem} in the installed {library} {installed}; qwentune's patch for it was written for "
        f"{library} {written_for}",
        where="qwentune/patches/internals.py",
        hint=f"install {library} {written_for}.x (qwentune's requirements), or update "
        f"qwentune/patches/internals.py for {library} {installed}",
    )


def _name(owner) -> str:
    return owner.__name__ if inspect.ismodule(owner) else f"{owner.__module__}.{owner.__qualname__}"


def _mentions(function, name: str) -> bool:
    """Whether `function` (or a function defined inside it) reads a global or attribute called `name`."""
    code = getattr(function, "__code__", None)
    stack = [code] if code is not None else []
    while stack:
        code = stack.pop()
        if name in code.co_names:
            return True
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return False


def _problem(owner, name: str, params: tuple = (), read_by: tuple | None = None) -> str | None:
    """What differs from what a patch needs: `owner.name` missing, taking other parameters than `params`, or no
    longer read by `read_by` ((owner, attribute) of the function that reads it); None when all is as written for."""
    where = f"{_name(owner)}.{name}"
    value = getattr(owner, name, None)
    if value is None:
        return f"{where} is missing"
    if params:
        try:
            have = tuple(inspect.signature(value).parameters)
        except (TypeError, ValueError):
            have = ()
        wanted = params[:-1] if params[-1] is ... else params
        if (have[: len(wanted)] if params[-1] is ... else have) != wanted:
            return f"{where} takes ({', '.join(have)}), not ({', '.join('...' if p is ... else p for p in params)})"
    if read_by is not None and not _mentions(getattr(*read_by, None), name):
        return f"{_name(read_by[0])}.{read_by[1]} no longer reads {name}"
    return None


_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log(message)


@contextlib.contextmanager
def _replaced(owner, name: str, value):
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


def _ours(value) -> bool:
    return getattr(value, "_qwentune_patch", False)


def _mark(value):
    value._qwentune_patch = True
    return value


__all__ = ["LibraryChanged"]
