"""Runs timm's own model test suite (``tests/test_models.py``) on the internimage_* and
flash_internimage_* families.

timm does not ship its tests in the wheel, so this fetches the sdist of the *installed* timm
version from PyPI once (``pip download --no-deps --no-binary :all: timm==X``), keeps only its
``tests/`` folder and ``pyproject.toml`` (pytest markers) under ``.cache/timm-suite/`` (git
ignored) and runs::

    python -m pytest -p internimage_timm_plugin .cache/timm-suite/timm-X/tests/test_models.py

The plugin (``tools/internimage_timm_plugin.py``) registers the family before collection,
narrows timm's model lists to the chosen variants and lists what it deselects, and why.

Usage::

    python tools/timm_suite.py                            # internimage_t (about 30 s on a CPU)
    python tools/timm_suite.py --models internimage_t,flash_internimage_t -- -x -v

Exit status: pytest's, or 2 with a message on stderr when the sdist cannot be fetched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(__file__).resolve().parent
DEFAULT_CACHE = ROOT / ".cache" / "timm-suite"
PLUGIN = "internimage_timm_plugin"


class FetchError(RuntimeError):
    """The timm sdist could not be downloaded or unpacked."""


def _download_sdist(timm_version: str, dest: Path) -> Path:
    """``pip download`` of the timm sdist into ``dest``; returns the archive path."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--no-binary", ":all:", f"timm=={timm_version}", "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(dest.glob(f"timm-{timm_version}.tar.gz"))
    if result.returncode != 0 or not archives:
        detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise FetchError(
            f"could not fetch the timm {timm_version} sdist (timm's test files) from PyPI: "
            f"`{' '.join(command)}` exited with {result.returncode}: {' | '.join(detail)}"
        )
    return archives[0]


def _extract_tests(archive: Path, timm_version: str, dest: Path) -> None:
    """Unpacks ``timm-X/tests/`` and ``timm-X/pyproject.toml`` (plain files only) into
    ``dest``; never timm's package itself, so the installed timm is the one under test."""
    top = f"timm-{timm_version}"
    with tarfile.open(archive, "r:gz") as tar:
        members = [
            m for m in tar.getmembers()
            if (m.name == f"{top}/pyproject.toml" or m.name.startswith(f"{top}/tests/"))
            and (m.isfile() or m.isdir()) and ".." not in Path(m.name).parts
        ]
        if not any(m.name == f"{top}/tests/test_models.py" for m in members):
            raise FetchError(f"{archive.name} has no {top}/tests/test_models.py")
        for member in members:
            target = dest / member.name
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)


def timm_tests(cache: Path = DEFAULT_CACHE) -> Path:
    """``tests/test_models.py`` of the installed timm version, fetched on first use."""
    timm_version = version("timm")
    test_models = cache / f"timm-{timm_version}" / "tests" / "test_models.py"
    if test_models.is_file():
        return test_models
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        archive = _download_sdist(timm_version, Path(tmp) / "sdist")
        unpacked = Path(tmp) / "unpacked"
        _extract_tests(archive, timm_version, unpacked)
        final = cache / f"timm-{timm_version}"
        shutil.rmtree(final, ignore_errors=True)
        (unpacked / f"timm-{timm_version}").rename(final)  # whole folder or nothing
    return test_models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="internimage_t",
                        help="comma-separated registered variants (default: internimage_t)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where the timm test files are kept (default: {DEFAULT_CACHE})")
    parser.add_argument("pytest_args", nargs="*",
                        help="extra pytest arguments (after --), e.g. -- -x -v")
    args = parser.parse_args(argv)
    try:
        test_models = timm_tests(args.cache)
    except (FetchError, OSError, tarfile.TarError) as error:
        print(f"timm suite: {error}\nThe suite needs network access to PyPI once; the test "
              f"files are then kept in {args.cache}.", file=sys.stderr)
        return 2
    env = dict(os.environ, INTERNIMAGE_TIMM_SUITE_MODELS=args.models)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TOOLS), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pytest", "-p", PLUGIN, "-p", "no:cacheprovider",
               str(test_models), "-q", *args.pytest_args]
    print(f"timm suite: {' '.join(command)}", flush=True)
    return subprocess.run(command, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
