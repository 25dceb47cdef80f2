"""pytest plugin that points timm's own ``tests/test_models.py`` at the internimage_* and
flash_internimage_* families.

timm's test module builds its model lists when it is imported, so the families must be
registered before collection: loading this plugin (``-p internimage_timm_plugin``) imports
``internimage`` first. It also narrows the lists to the models named in
``INTERNIMAGE_TIMM_SUITE_MODELS`` (comma separated, default ``internimage_t``), adds the
families to the module list of timm's ``forward_intermediates`` tests, and deselects every
test that is not parametrized with one of those models plus the tests in ``DESELECT``.

Run it through ``tools/timm_suite.py``, which fetches the matching timm test files.
"""

from __future__ import annotations

import os

import pytest
import timm

import internimage  # noqa: F401  (registers internimage_* and flash_internimage_* with timm)

# timm's module names of the two model files (internimage.py, flash_internimage.py)
MODEL_MODULES = ["internimage", "flash_internimage"]
MODELS = tuple(
    name.strip()
    for name in os.environ.get("INTERNIMAGE_TIMM_SUITE_MODELS", "internimage_t").split(",")
    if name.strip()
)

# test function -> why it is deselected. Delete an entry once the reason is gone.
DESELECT = {
    # --- need the Hugging Face hub (the weights are downloaded); CI has no hub access.
    "test_model_load_pretrained": "downloads pretrained weights from the Hugging Face hub",
    "test_model_features_pretrained": "downloads pretrained weights from the Hugging Face hub",
}

_list_models = timm.list_models
_list_pretrained = timm.list_pretrained


def _ours(names: list[str]) -> list[str]:
    return [name for name in names if name.split(".")[0] in MODELS]


def list_models(filter="", module="", *args, **kwargs) -> list[str]:
    """timm.list_models restricted to MODELS; a module list (timm's FEAT_INTER_FILTERS)
    gains these families, so the forward_intermediates tests cover them."""
    if module and not isinstance(module, str):
        module = [*module, *MODEL_MODULES]
    return _ours(_list_models(filter, module, *args, **kwargs))


def list_pretrained(*args, **kwargs) -> list[str]:
    return _ours(_list_pretrained(*args, **kwargs))


# Replaced before timm's test module runs ``from timm import list_models, list_pretrained``.
timm.list_models = list_models
timm.list_pretrained = list_pretrained


def pytest_configure(config: pytest.Config) -> None:
    registered = _list_models(module=MODEL_MODULES)
    unknown = [name for name in MODELS if name not in registered]
    if unknown or not MODELS:
        raise pytest.UsageError(
            f"INTERNIMAGE_TIMM_SUITE_MODELS must name registered {' / '.join(MODEL_MODULES)} "
            f"models, got {list(MODELS)} (unknown: {unknown}); registered: {registered}"
        )
    # timm marks tests with pytest-timeout's marker; register it in case that plugin is absent
    config.addinivalue_line("markers", "timeout(seconds): per-test timeout (pytest-timeout)")


def _model_name(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    name = callspec.params.get("model_name") if callspec is not None else None
    return name if isinstance(name, str) else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, dropped, listed = [], [], []
    for item in items:
        name = _model_name(item)
        if name is None or name.split(".")[0] not in MODELS:
            dropped.append(item)
        elif item.originalname in DESELECT:
            listed.append(item)
        else:
            keep.append(item)
    config.stash[_LISTED] = [item.nodeid for item in listed]
    if dropped or listed:
        config.hook.pytest_deselected(items=dropped + listed)
        items[:] = keep


_LISTED = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    listed = config.stash.get(_LISTED, [])
    terminalreporter.section(f"internimage timm suite ({', '.join(MODELS)})")
    for nodeid in listed:
        function = nodeid.split("::")[-1].split("[")[0]
        terminalreporter.write_line(f"deselected {nodeid}: {DESELECT[function]}")
