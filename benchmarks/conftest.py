import os
import subprocess

import pytest
import torch


def _git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "absent"
    return triton.__version__


@pytest.fixture
def record_environment(benchmark):
    """Record where a result was measured next to it in the JSON output."""
    device = os.environ.get(
        "FUSED_MTL_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"
    )
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    benchmark.extra_info.update(
        device=device,
        device_name=name,
        torch=torch.__version__,
        triton=_triton_version(),
        git_revision=_git_revision(),
        cpu_threads=torch.get_num_threads(),
    )
    return device
