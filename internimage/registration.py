"""Registers the model families with timm on ``import internimage`` without importing timm.

``import internimage`` promises that ``timm.create_model("internimage_t")`` works, and the
``internimage`` command promises to answer ``--help`` and ``--version`` without the seconds
it takes to import timm and the models. Both hold because the registration waits for timm:
if timm is already imported, :func:`register_with_timm` imports the family modules (whose
``@register_model`` constructors register them) at once; otherwise a finder on
``sys.meta_path`` imports them as soon as timm has been imported, by anyone. A program that
calls ``timm.create_model`` has imported timm, so it finds the models registered.

The finder waits until no module of this package is half-imported (a family module that
imports timm first is finished before the families are imported), then removes itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__all__ = ["FAMILY_MODULES", "register_with_timm", "registered"]

#: The modules whose import registers a model family with timm.
FAMILY_MODULES = ("internimage.internimage", "internimage.flash_internimage")
_PACKAGE = __name__.rpartition(".")[0]


def registered() -> bool:
    """Whether the family modules have been imported (so timm knows the models)."""
    return all(name in sys.modules for name in FAMILY_MODULES)


def register_with_timm() -> None:
    """Registers the families now if timm is imported, else as soon as it is."""
    if registered() or any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        return
    if "timm" in sys.modules:
        _import_families()
    else:
        sys.meta_path.insert(0, _RegisterAfterImport())


def _import_families() -> None:
    for name in FAMILY_MODULES:
        importlib.import_module(name)


def _half_imported(except_name: str) -> bool:
    """Whether a module of this package, other than ``except_name``, is being imported."""
    for name, module in list(sys.modules.items()):
        if name == except_name or not name.startswith(_PACKAGE + "."):
            continue
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            return True
    return False


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``timm`` and this package's modules with the other finders, and after each has
    run checks whether the families can be imported now."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "timm" and not fullname.startswith(_PACKAGE + "."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRegister(spec.loader, self)
                return spec
        return None

    def after(self, name: str) -> None:
        if self not in sys.meta_path or "timm" not in sys.modules or _half_imported(name):
            return
        sys.meta_path.remove(self)
        _import_families()


class _ThenRegister(importlib.abc.Loader):
    """A loader that runs another, then tells the finder which module it finished."""

    def __init__(self, loader: Any, finder: _RegisterAfterImport) -> None:
        self._loader, self._finder = loader, finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._finder.after(module.__name__)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ...
        return getattr(self._loader, name)
