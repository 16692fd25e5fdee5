"""The README's code runs as written, and so does the example it points to."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_readme_has_exactly_two_setup_commands_first():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.DOTALL).group(1)
    commands = [line for line in first_block.splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[0].endswith('pip install -c constraints.txt -e ".[demo]" && fused-mtl demo')
    assert commands[1].endswith("python -m pytest")


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
