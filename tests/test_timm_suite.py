"""timm's own model test suite (its tests/test_models.py) passes for internimage_t,
flash_internimage_t and flash_internimage_s, in one run.

``tools/timm_suite.py`` fetches the test files of the installed timm version from PyPI on first
use (cached in ``.cache/timm-suite/``); without network access this test fails, never skips.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODELS = ("internimage_t", "flash_internimage_t", "flash_internimage_s")
# timm tests that must run and pass for each model (the plugin lists what it deselects)
EXPECTED = {
    "test_model_forward", "test_model_backward", "test_model_default_cfgs",
    "test_model_forward_features", "test_model_forward_intermediates",
    "test_model_forward_intermediates_features", "test_model_forward_fx",
    "test_model_backward_fx", "test_model_forward_torchscript",
    "test_model_forward_fx_torchscript",
}


def test_timm_model_suite_passes_for_both_families() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "timm_suite.py"), "--models", ",".join(MODELS),
         "--", "-rA"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"timm's test suite failed:\n{output[-6000:]}"
    # e.g. "PASSED .../test_models.py::test_model_backward[2-flash_internimage_s]"
    passed = set(re.findall(r"^PASSED \S*::(\w+)\[(?:\d+-)?([\w]+)(?:\.\w+)?\]", output,
                            flags=re.MULTILINE))
    for model in MODELS:
        missing = {test for test in EXPECTED if (test, model) not in passed}
        assert not missing, (f"timm tests that did not run and pass for {model}: "
                             f"{sorted(missing)}\n{output[-3000:]}")
    assert not re.search(r"^(FAILED|ERROR) ", output, flags=re.MULTILINE), output[-3000:]
