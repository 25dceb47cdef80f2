"""What ``import internimage`` registers, without importing torch or timm itself.

``import internimage`` promises that ``timm.create_model("internimage_t")`` works and that
``torch.ops.internimage.dcnv3`` exists (a TorchScript file that calls it loads), and the
``internimage`` command promises to answer ``--help`` without the seconds it takes to import
torch, timm and the models. Both hold because each registration waits for the library it
registers with (:data:`AFTER_IMPORT`): if that library is already imported,
:func:`register` imports the modules that register at once; otherwise a finder on
``sys.meta_path`` imports them as soon as the library has been imported, by anyone. A program
that calls ``timm.create_model`` or ``torch.jit.load`` has imported timm or torch, so it finds
the models and the op registered.

The finder waits until no module of this package is half-imported (a family module that
imports timm itself is finished first), then removes itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__all__ = ["AFTER_IMPORT", "FAMILY_MODULES", "register", "registered"]

#: The modules whose import registers a model family with timm.
FAMILY_MODULES = ("internimage.internimage", "internimage.flash_internimage")
#: Library -> the modules to import once it is imported: the op library (``internimage._C``,
#: loaded by ``internimage.ops``) registers ``torch.ops.internimage.*``, the family modules
#: register the models with timm.
AFTER_IMPORT = {"torch": ("internimage.ops",), "timm": FAMILY_MODULES}
_PACKAGE = __name__.rpartition(".")[0]


def registered() -> bool:
    """Whether every registration has happened."""
    return all(name in sys.modules for names in AFTER_IMPORT.values() for name in names)


def register() -> None:
    """Registers with the libraries already imported now, with the others once they are."""
    if any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        return
    pending = {library: modules for library, modules in AFTER_IMPORT.items()
               if not all(name in sys.modules for name in modules)}
    for library in [name for name in pending if name in sys.modules]:
        _import(pending.pop(library))
    if pending:
        sys.meta_path.insert(0, _RegisterAfterImport(pending))


def _import(modules: Sequence[str]) -> None:
    for name in modules:
        importlib.import_module(name)


def _half_imported(name: str) -> bool:
    module = sys.modules.get(name)
    return getattr(getattr(module, "__spec__", None), "_initializing", False)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds the pending libraries and this package's modules with the other finders, and
    after each has been executed imports what has become ready."""

    def __init__(self, pending: dict[str, tuple[str, ...]]) -> None:
        self.pending = pending

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.pending and not fullname.startswith(_PACKAGE + "."):
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

    def after(self, finished: str) -> None:
        """``finished`` (still flagged as importing) has been executed."""
        if any(_half_imported(name) for name in list(sys.modules)
               if name != finished and name.startswith(_PACKAGE + ".")):
            return  # the outermost module of this package registers when it is done
        ready = [library for library in self.pending if library in sys.modules
                 and (library == finished or not _half_imported(library))]
        if not ready:
            return
        if len(ready) == len(self.pending) and self in sys.meta_path:
            sys.meta_path.remove(self)
        for library in ready:
            _import(self.pending.pop(library))


class _ThenRegister(importlib.abc.Loader):
    """A loader that runs another, then tells the finder which module it executed."""

    def __init__(self, loader: Any, finder: _RegisterAfterImport) -> None:
        self._loader, self._finder = loader, finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._finder.after(module.__name__)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ...
        return getattr(self._loader, name)
