"""The flat layout's module paths (``metagrad.functional``, ``metagrad.presets``, ...), kept
importable for one release: each old name loads the module at its new path, with a
``DeprecationWarning`` that names the new path."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED: dict[str, str] = {
    "metagrad.attention": "metagrad.nn.attention",
    "metagrad.backends": "metagrad.backward",
    "metagrad.comm": "metagrad.parallel.comm",
    "metagrad.config": "metagrad.training.config",
    "metagrad.convert": "metagrad.nn.convert",
    "metagrad.corpus": "metagrad.data.corpus",
    "metagrad.diagnostics": "metagrad.meta.diagnostics",
    "metagrad.distributed": "metagrad.parallel.distributed",
    "metagrad.emulated": "metagrad.backward.emulated",
    "metagrad.formats": "metagrad.quant.formats",
    "metagrad.functional": "metagrad.nn.functional",
    "metagrad.hyper": "metagrad.meta.hyper",
    "metagrad.int8": "metagrad.backward.int8",
    "metagrad.layers": "metagrad.nn.layers",
    "metagrad.optim": "metagrad.meta.optim",
    "metagrad.presets": "metagrad.quant.presets",
    "metagrad.products": "metagrad.backward.products",
    "metagrad.reproduce": "metagrad.training.reproduce",
    "metagrad.scaling": "metagrad.quant.scaling",
    "metagrad.tasks": "metagrad.training.tasks",
    "metagrad.train": "metagrad.training.trainer",
    "metagrad.transforms": "metagrad.quant.transforms",
}
"""Old module path -> new one (submodules of an old package path follow it)."""


def new_path(name: str) -> str | None:
    """Where the module ``name`` of the flat layout lives now (None: it did not move)."""
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and hands back the module at its new path."""

    def find_spec(self, fullname, path, target=None):
        if new_path(fullname) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec) -> ModuleType:
        new = new_path(spec.name)
        warnings.warn(
            f"{spec.name} moved to {new}; import it from there (the old path will be removed)",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module at the new path is loaded already."""


def install() -> None:
    """Make the old paths importable (once per process)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
