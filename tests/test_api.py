"""The notebook API stays callable: no submodule may shadow a public function of the package."""

import importlib
import pkgutil

import qwentune


def test_public_functions_are_not_shadowed_by_submodules():
    for module in pkgutil.iter_modules(qwentune.__path__):
        if module.name != "__main__":
            importlib.import_module(f"qwentune.{module.name}")
    for name in qwentune.__all__:
        assert not type(getattr(qwentune, name)).__name__ == "module", name
    for name in ("load_recipe", "prepare", "preprocess", "preview", "train", "merge"):
        assert callable(getattr(qwentune, name)), name
