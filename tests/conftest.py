"""Test configuration: the device under test and the Triton interpreter.

By default the suite runs on CPU, and tests that ask for the Triton backend run the real kernels
in the Triton interpreter, which must be switched on before the kernels are first imported.
``FUSED_MTL_TEST_DEVICE=cuda`` runs the same tests on a GPU with compiled kernels.

torch.compile's on-disk cache is keyed by the package's sources (see ``_inductor_cache_dir``).
"""

import getpass
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

TEST_DEVICE = os.environ.get("FUSED_MTL_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"


def _inductor_cache_dir() -> str:
    """torch.compile's cache folder for these sources: one per hash of the package's files.

    Inductor's cache key holds a graph's code and its inputs' metadata, not what a custom op
    returns: a graph compiled while ``fused_mtl::task_gram`` returned float32 is served, float32,
    after the op returned float64. Sources that differ in a byte get their own folder, under
    ``TORCHINDUCTOR_CACHE_DIR`` where it is set.
    """
    roots = [Path(p) for p in importlib.util.find_spec("fused_mtl").submodule_search_locations]
    # A checkout's kernels/ ships as fused_mtl.kernels (inside the package once installed).
    checkout_kernels = Path(__file__).resolve().parents[1] / "kernels"
    roots += [checkout_kernels] if checkout_kernels.is_dir() else []
    digest = hashlib.sha256()
    for source in roots:
        for path in sorted(source.rglob("*.py")):
            digest.update(f"{source.name}/{path.relative_to(source)}".encode())
            digest.update(path.read_bytes())
    folder = f"fused_mtl_tests_{getpass.getuser()}_{digest.hexdigest()[:16]}"
    root = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or tempfile.gettempdir()
    # A test that runs pytest again inherits the folder already chosen.
    return root if os.path.basename(root) == folder else os.path.join(root, folder)


os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache_dir()

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
