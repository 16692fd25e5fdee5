"""Test configuration: the device under test and the Triton interpreter.

By default the suite runs on CPU, and tests that ask for the Triton backend run the real kernels
in the Triton interpreter, which must be switched on before the kernels are first imported.
``FUSED_MTL_TEST_DEVICE=cuda`` runs the same tests on a GPU with compiled kernels.
"""

import os

TEST_DEVICE = os.environ.get("FUSED_MTL_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.fail("FUSED_MTL_TEST_DEVICE=cuda but no CUDA device is available")
    return torch.device(TEST_DEVICE)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch: pytest.MonkeyPatch) -> None:
    # A FUSED_MTL_BACKEND set in the developer's shell must not change what a test runs.
    monkeypatch.delenv("FUSED_MTL_BACKEND", raising=False)
