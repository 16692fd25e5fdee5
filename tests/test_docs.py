"""The README's and the docs pages' code runs as written, the docs site builds without a
warning, and the command line's page shows its real help."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_readme_has_exactly_two_setup_commands_for_a_checkout():
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    checkout = [block for block in blocks if "python3 -m venv" in block]
    assert len(checkout) == 1
    commands = [line for line in checkout[0].splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[0].endswith('pip install -c constraints.txt -e ".[demo]" && fused-mtl demo')
    assert commands[1].endswith("python -m pytest")


def test_readme_is_short_and_links_to_pages_that_exist():
    assert len(README.splitlines()) <= 200
    for target in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / target).is_file(), target


DOCS = ROOT / "docs"
#: Every python block of the docs pages, except the distributed recipes (a copy of an
#: ``examples/`` file, which the distributed tests run on two ranks and compare with the page).
DOC_BLOCKS = [
    (page.name, index, block)
    for page in sorted(DOCS.glob("*.md"))
    for index, block in enumerate(
        re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    )
    if not block.startswith("# examples/")
]


@pytest.mark.parametrize(
    ("page", "index", "block"), DOC_BLOCKS, ids=[f"{p}-{i}" for p, i, _ in DOC_BLOCKS]
)
def test_docs_python_block_runs(page, index, block):
    exec(compile(block, f"docs/{page}", "exec"), {})


HELP_BLOCKS = re.findall(
    r"```text\n(usage: fused-mtl.*?)\n```", (DOCS / "cli.md").read_text(), flags=re.DOTALL
)


@pytest.mark.parametrize(
    "command", [[], ["demo"], ["compare"], ["bench"]], ids=["main", "demo", "compare", "bench"]
)
def test_cli_page_shows_the_commands_help_as_it_is(command):
    result = subprocess.run(
        [sys.executable, "-m", "fused_mtl", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip() in HELP_BLOCKS, f"docs/cli.md: fused-mtl {command} --help"


def test_docs_site_builds_with_warnings_as_errors(tmp_path):
    """mkdocs with mkdocstrings: every page, the API reference from the docstrings, every
    link and anchor; a warning fails the build (``strict: true`` in mkdocs.yml)."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    api = (tmp_path / "api" / "index.html").read_text()
    for name in ("FAMO", "UPGrad", "UncertaintyWeighting", "MoCo"):
        assert f"fused_mtl.{name}" in api, name


@pytest.mark.parametrize(
    "block", PYTHON_BLOCKS, ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))]
)
def test_readme_python_block_runs(block):
    exec(compile(block, "README.md", "exec"), {})


def test_quickstart_example_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "20"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "learned sigma^2" in result.stdout
    assert "clean" in result.stdout and "noisy" in result.stdout
