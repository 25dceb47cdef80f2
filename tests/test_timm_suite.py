"""timm's own model test suite (its tests/test_models.py) passes for internimage_t.

``tools/timm_suite.py`` fetches the test files of the installed timm version from PyPI on first
use (cached in ``.cache/timm-suite/``); without network access this test fails, never skips.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# timm tests that must run and pass for the family (the plugin lists what it deselects)
EXPECTED = {
    "test_model_forward", "test_model_backward", "test_model_default_cfgs",
    "test_model_forward_features", "test_model_forward_intermediates",
    "test_model_forward_intermediates_features", "test_model_forward_fx",
    "test_model_backward_fx", "test_model_forward_torchscript",
    "test_model_forward_fx_torchscript",
}


def test_timm_model_suite_passes_for_internimage_t() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "timm_suite.py"), "--models", "internimage_t",
         "--", "-rA"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"timm's test suite failed:\n{output[-6000:]}"
    passed = set(re.findall(r"^PASSED \S*::(\w+)\[", output, flags=re.MULTILINE))
    missing = EXPECTED - passed
    assert not missing, f"timm tests that did not run and pass: {sorted(missing)}\n{output[-3000:]}"
    assert not re.search(r"^(FAILED|ERROR) ", output, flags=re.MULTILINE), output[-3000:]
