"""Start-up of the `internimage` command: `--help` (of the command and of every subcommand)
imports neither torch nor timm nor the models, `--version` only torch and the extension; and
the lazy `import internimage` still registers both families with timm, whatever the import
order. Checked through `sys.modules` in fresh interpreters (structure, not time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from internimage.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "timm", "internimage.internimage", "internimage.flash_internimage",
         "internimage.dcnv3", "internimage.dcnv4", "internimage.ops", "internimage._C"]


def modules_after(code: str) -> dict[str, bool]:
    """Runs ``code`` in a fresh interpreter; which of HEAVY it left imported."""
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_help_of_the_command_and_every_subcommand_imports_nothing_heavy() -> None:
    helps = [["--help"]] + [[command, "--help"] for command in COMMANDS]
    code = ("import contextlib, io\nfrom internimage.cli import main\n"
            f"for argv in {helps!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        try:\n            main(argv)\n        except SystemExit as exit:\n"
            "            assert exit.code == 0, (argv, exit.code)\n"
            "    assert 'usage: internimage' in out.getvalue(), argv")
    loaded = modules_after(code)
    assert not any(loaded.values()), loaded


def test_version_imports_torch_and_the_extension_only() -> None:
    code = ("import contextlib, io\nfrom internimage.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        main(['--version'])\n    except SystemExit:\n        pass\n"
            "assert out.getvalue().startswith('internimage '), out.getvalue()")
    loaded = modules_after(code)
    assert loaded["torch"] and loaded["internimage.ops"] and loaded["internimage._C"], loaded
    assert not any(loaded[m] for m in HEAVY[1:6]), loaded


@pytest.mark.parametrize("first", [
    "import internimage",  # the package, then timm
    "import internimage.flash_internimage",  # a family module first (as hubconf.py does)
])
def test_import_internimage_registers_both_families_with_timm(first: str) -> None:
    code = (f"{first}\nimport timm\n"
            "assert timm.is_model('internimage_t') and timm.is_model('flash_internimage_t')\n"
            "assert len(timm.list_models(['internimage_*', 'flash_internimage_*'])) == 12\n"
            "import internimage\nassert internimage.InternImage.__name__ == 'InternImage'\n"
            "assert all(getattr(internimage, name) is not None for name in internimage.__all__)")
    loaded = modules_after(code)
    assert loaded["internimage.internimage"] and loaded["internimage.flash_internimage"]


def test_timm_imported_first_registers_at_import() -> None:
    import timm

    import internimage

    assert internimage.registration.registered()
    assert set(internimage.__all__) == {*internimage._EXPORTS, "__version__"}
    assert timm.is_model("internimage_t") and timm.is_model("flash_internimage_t")
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        internimage.nonexistent  # noqa: B018
