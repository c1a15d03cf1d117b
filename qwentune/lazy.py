"""What a subpackage lets the floors above it use, imported on first use.

Each subpackage's `__init__` names its exports and the module each lives in; `from qwentune.data import
prepare_data` then loads data/pipeline.py alone (so `import qwentune` and `qwentune estimate` stay free of torch).
Nothing is cached in the package: a name is read from its module at each import, so a caller that imports a name
when it runs sees what that module holds then (a test's monkeypatch included) — as a direct import would.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module


def exports(package: str, by_module: dict[str, tuple[str, ...]]) -> tuple[list[str], Callable, Callable]:
    """`__all__`, `__getattr__` and `__dir__` for `package`, from {module: names it exports}."""
    where = {name: module for module, names in by_module.items() for name in names}
    clash = sorted(set(where) & set(by_module))
    if clash:  # importing the module would replace the exported name with the module object
        raise ImportError(f"{package} exports names that are also its modules: {clash}")

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{where[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(where)

    return sorted(where), __getattr__, __dir__
