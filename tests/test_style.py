"""The code base stays `ruff` clean (configuration in pyproject.toml)."""

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    repo_root = Path(__file__).resolve().parents[1]
    result = subprocess.run([ruff, "check", "."], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# Objects produced by another executor than eager PyTorch (TorchScript, fx): their kernels can
# be chosen or fused differently, so on another CPU they may differ from eager in the last bits.
_OTHER_PATHS = re.compile(r"\b(scripted|traced|loaded|compiled|extractor)\b|\bout\[")
_BIT_EQUAL = re.compile(r"torch\.equal\(|rtol=0,\s*atol=0\b")


def test_no_bit_equality_across_code_paths():
    """Bit-equality is asserted only for one code path run twice (determinism); a TorchScript
    or fx result is compared with eager within the dtype's tolerance."""
    offenders = []
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            checks = isinstance(node, ast.Assert) or (
                isinstance(node, ast.Call) and "assert" in ast.unparse(node.func))
            if checks:
                text = ast.unparse(node)
                if (_BIT_EQUAL.search(text) or "identical" in text) and _OTHER_PATHS.search(text):
                    offenders.append(f"{path.name}:{node.lineno}: {text[:100]}")
    assert not offenders, "\n".join(offenders)


def _imported_modules(path: Path) -> set[str]:
    """The absolute module names a Python file imports, at any depth (function bodies too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_library_modules_do_not_import_the_command_line():
    """The engines (train, bench, ...) are library code: the arrows run from internimage.cli
    down to the library, never back up (the CLI's CommandError stays inside internimage/cli/)."""
    package = Path(__file__).resolve().parents[1] / "internimage"
    library = [p for p in package.rglob("*.py")  # __main__.py is `python -m internimage`
               if "cli" not in p.relative_to(package).parts and p.name != "__main__.py"]
    assert len(library) > 10, library  # the walk found the package
    offenders = {}
    for path in library:
        found = sorted(n for n in _imported_modules(path)
                       if n == "internimage.cli" or n.startswith("internimage.cli."))
        if found:
            offenders[str(path.relative_to(package))] = found
        assert "CommandError" not in path.read_text(), path
    assert not offenders, offenders
    assert _imported_modules(package / "cli" / "bench.py") >= {"internimage.bench"}
