"""Docs are tests: every ```python and ```bash block of README.md and docs/*.md runs here.

A block may carry markers: HTML comments on the lines right before its opening fence, visible
in the Markdown source.

* ``<!-- test: skip: REASON -->``: the block is not run (it needs a GPU, the network, a
  downloaded checkpoint or data, or it is the CI command that runs this suite). It is
  reported as a skipped test with its reason (``pytest -rs`` lists them; pyproject.toml
  turns that on).
* ``<!-- test: shorten: "OLD" -> "NEW" -->`` (or with single quotes): the block runs with
  every OLD replaced by NEW (repeatable), to keep a long run short. OLD must occur in the
  block.

The python blocks of one file run in order in one interpreter, so a block sees the names of
the blocks before it (skipped blocks included in the undefined-name check, not in the run).
The bash blocks of one file run in order in one temporary folder with ``bash -euo
pipefail``, with this interpreter's ``internimage`` and ``torchrun`` first on PATH and the
repository on PYTHONPATH. Both run with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LANGUAGES = ("python", "bash")

_MARKER = re.compile(r"^<!--\s*test:\s*(.*?)\s*-->$")
_SHORTEN = re.compile(r"""^shorten:\s*(["'])(.*?)\1\s*->\s*(["'])(.*?)\3$""")


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    skip: str | None = None
    replacements: list[tuple[str, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    def runnable_code(self) -> str:
        code = self.code
        for old, new in self.replacements:
            if old not in code:
                raise ValueError(f"{self.name}: shorten marker text {old!r} is not in the block")
            code = code.replace(old, new)
        return code


def parse(path: Path) -> list[Block]:
    """The python and bash blocks of a Markdown file with their markers."""
    blocks: list[Block] = []
    markers: list[tuple[int, str]] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        marker = _MARKER.match(line)
        if marker:
            markers.append((i + 1, marker.group(1)))
            i += 1
            continue
        if line.startswith("```"):
            language = line[3:].strip()
            end = i + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                raise ValueError(f"{path.name}:{i + 1}: code block is never closed")
            if language in LANGUAGES:
                block = Block(path, i + 1, language, "\n".join(lines[i + 1:end]) + "\n")
                for at, text in markers:
                    if text.startswith("skip:") and text[5:].strip():
                        block.skip = text[5:].strip()
                    elif _SHORTEN.match(text):
                        _, old, _, new = _SHORTEN.match(text).groups()
                        block.replacements.append((old, new))
                    else:
                        raise ValueError(f"{path.name}:{at}: unknown test marker {text!r}")
                blocks.append(block)
            elif markers:
                raise ValueError(f"{path.name}:{markers[0][0]}: test marker before a "
                                 f"```{language} block, which is not run")
            markers = []
            i = end + 1
            continue
        if markers:
            raise ValueError(f"{path.name}:{markers[0][0]}: test marker not right before a "
                             "code block")
        i += 1
    return blocks


BLOCKS = [block for path in DOCS for block in parse(path)]


def _blocks(path: Path, language: str) -> list[Block]:
    return [b for b in BLOCKS if b.path == path and b.language == language]


def _cases(language: str) -> list:
    return [pytest.param(path, id=str(path.relative_to(REPO))) for path in DOCS
            if any(not b.skip for b in _blocks(path, language))]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


# ---------------------------------------------------------------------------------------------


def test_every_block_is_found_and_markers_are_well_formed() -> None:
    counts = {language: sum(b.language == language for b in BLOCKS) for language in LANGUAGES}
    assert counts["python"] >= 10 and counts["bash"] >= 10, counts
    for block in BLOCKS:
        block.runnable_code()  # every shorten marker applies
        if block.skip:
            assert not block.replacements, f"{block.name}: skipped and shortened"
    # the README opens with the CI commands (.ci/run runs them): listed as skipped, not run
    readme = _blocks(REPO / "README.md", "bash")
    assert "pip install" in readme[0].code and "pytest" in readme[1].code
    assert readme[0].skip and readme[1].skip


@pytest.mark.parametrize("block", [pytest.param(b, id=b.name) for b in BLOCKS if b.skip])
def test_skipped_block(block: Block) -> None:
    """One skipped test per marked block, so the run lists each with its reason."""
    pytest.skip(f"{block.name} ({block.language}): {block.skip}")


_DRIVER = textwrap.dedent("""
    import json, sys, traceback
    namespace = {"__name__": "__main__"}
    for block in json.load(open(sys.argv[1])):
        print(f"=== {block['name']}", flush=True)
        try:
            exec(compile(block["code"], block["name"], "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            print(f"=== FAILED: {block['name']}", flush=True)
            sys.exit(1)
""")


def _run_python(path: Path, workdir: Path) -> str | None:
    """Runs the file's python blocks in one interpreter; the failure's log, or None."""
    blocks = [dict(name=b.name, code=b.runnable_code())
              for b in _blocks(path, "python") if not b.skip]
    (workdir / "blocks.json").write_text(json.dumps(blocks))
    result = subprocess.run([sys.executable, "-c", _DRIVER, str(workdir / "blocks.json")],
                            cwd=workdir, env=_env(), capture_output=True, text=True, timeout=900)
    return None if result.returncode == 0 else (result.stdout + result.stderr)[-6000:]


def _run_bash(path: Path, workdir: Path) -> str | None:
    """Runs the file's bash blocks in order in one folder; the first failure's log, or None."""
    for block in _blocks(path, "bash"):
        if block.skip:
            continue
        code = block.runnable_code()
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=workdir,
                                env=_env(), capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            return f"{block.name} failed:\n{code}\n" + (result.stdout + result.stderr)[-6000:]
    return None


@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[Path, str], str | None]:
    """Every file's python and bash blocks, run two files at a time (they are independent;
    most of their time is interpreter start-up and imports). (path, language) -> failure log
    or None."""
    jobs = {(path.values[0], language): runner
            for language, runner in (("python", _run_python), ("bash", _run_bash))
            for path in _cases(language)}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(runner, key[0],
                                    tmp_path_factory.mktemp(f"{key[0].stem}-{key[1]}"))
                   for key, runner in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


@pytest.mark.parametrize("path", _cases("python"))
def test_python_blocks(path: Path, doc_runs: dict) -> None:
    failure = doc_runs[(path, "python")]
    assert failure is None, failure


@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(REPO))) for p in DOCS
                                  if _blocks(p, "python")])
def test_python_blocks_define_their_names(path: Path, tmp_path: Path) -> None:
    """Every name a block uses is defined in it or in a block before it: skipped blocks too,
    so a missing import is caught even where the block cannot run."""
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    source = tmp_path / "blocks.py"
    source.write_text("".join(f"# {b.name}\n{b.code}" for b in _blocks(path, "python")))
    result = subprocess.run([ruff, "check", "--no-cache", "--isolated", "--select", "F821",
                             str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", _cases("bash"))
def test_bash_blocks(path: Path, doc_runs: dict) -> None:
    failure = doc_runs[(path, "bash")]
    assert failure is None, failure


# --- what the docs say about the repository ---------------------------------------------------

_LAYOUT_ROW = re.compile(r"^\| (`[^|]*`) \|")


def _tracked_files() -> list[str]:
    result = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:  # not a git checkout (e.g. an unpacked sdist): walk the tree
        skip = {".git", ".venv", "build", "__pycache__", ".cache", "runs"}
        return sorted(str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()
                      and not skip & set(p.relative_to(REPO).parts) and p.suffix != ".so")
    return result.stdout.split()


def test_readme_layout_table_names_every_file() -> None:
    """Each source file of the package, the kernels, benchmarks, tools and build is in the
    README's layout table: by its path, by a folder row ending in '/', or by a bare name that
    follows a path in the same cell (`internimage/train.py`, `data.py`)."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("## Layout"):]
    covered: set[str] = set()
    folders: list[str] = []
    for line in table.splitlines():
        row = _LAYOUT_ROW.match(line)
        if not row:
            continue
        folder = ""
        for item in re.findall(r"`([^`]+)`", row.group(1)):
            if item.endswith("/"):
                folders.append(item)
                folder = item
            elif "/" in item:
                covered.add(item)
                folder = item.rsplit("/", 1)[0] + "/"
            else:
                covered.add(folder + item)
    for name in covered:
        assert (REPO / name).exists(), f"README layout table names {name}, which does not exist"
    roots = ("internimage/", "csrc/", "benchmarks/", "tools/", ".ci/", "setup.py",
             "pyproject.toml")
    missing = [f for f in _tracked_files() if f.startswith(roots) and f not in covered
               and not any(f.startswith(d) for d in folders)]
    assert not missing, f"files missing from the README layout table: {missing}"


_REPO_PATH = re.compile(r"(?<![\w./-])((?:internimage|tests|docs|benchmarks|tools|csrc|\.ci)"
                        r"/[\w./*-]*[\w/*])")
_BARE_MD = re.compile(r"(?<![\w./-])([\w-]+\.md)\b")


def test_docs_and_recipes_only_point_to_files_that_exist() -> None:
    """Paths into the repository and Markdown file names in README.md, docs/ and the recipes
    exist (docs/cli.md and the recipes used to point to a notes file kept outside it)."""
    sources = DOCS + sorted((REPO / "internimage" / "configs").glob("*.yaml"))
    markdown = {p.name for p in DOCS}
    dangling = []
    for source in sources:
        text = source.read_text()
        for name in _REPO_PATH.findall(text):
            name = name.rstrip(".")
            if not list(REPO.glob(name)):  # a path, or a glob such as internimage/_C*.so
                dangling.append(f"{source.relative_to(REPO)}: {name}")
        for name in _BARE_MD.findall(text):
            if name not in markdown:
                dangling.append(f"{source.relative_to(REPO)}: {name}")
        for link in re.findall(r"\]\(([A-Za-z0-9_./-]+)(?:#[^)]*)?\)", text):  # relative links
            if not (source.parent / link).exists():
                dangling.append(f"{source.relative_to(REPO)}: link {link}")
    assert not dangling, dangling


def test_in1k_recipes_differ_from_the_defaults_as_they_say() -> None:
    """The *_in1k recipes (both families) say they share the defaults' optimizer, schedule,
    augmentation and EMA and add the variant, its drop path, 224 px, 8 workers and fp16 (they
    used to claim to equal the defaults)."""
    from internimage.train_config import DEFAULTS, config_dir, load_recipe

    for variant in ("t", "s", "b", "flash_t", "flash_s", "flash_b"):
        prefix, _, variant = variant.rpartition("_")
        name = f"{prefix}_internimage_{variant}" if prefix else f"internimage_{variant}"
        path = config_dir() / f"{name}_in1k.yaml"
        text = path.read_text()
        assert "224 px, 8 data workers and fp16 AMP" in text
        assert "also this package's defaults" not in text
        cfg = load_recipe(path)
        differ = {f"{section}.{key}" for section in DEFAULTS for key in DEFAULTS[section]
                  if cfg[section][key] != DEFAULTS[section][key]}
        assert differ <= {"model.name", "model.drop_path_rate", "data.img_size",
                          "data.num_workers", "train.amp"}, (variant, differ)
        assert cfg["data"]["img_size"] == 224 and cfg["data"]["num_workers"] == 8
        assert cfg["train"]["amp"] == "fp16" and cfg["model"]["name"] == name


def test_internimage_docstring_says_what_unknown_keywords_do() -> None:
    """It said unknown keywords were ignored with a warning; they raise TypeError."""
    from internimage import InternImage

    doc = " ".join(InternImage.__doc__.split())
    assert "Unknown keywords raise ``TypeError``" in doc and "ignored with a warning" not in doc
    with pytest.raises(TypeError, match="not_an_argument"):
        InternImage(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], not_an_argument=1)
