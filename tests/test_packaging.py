"""Triton is optional and lazy; the kernels ship inside the package as fused_mtl.kernels."""

import subprocess
import sys
import textwrap

import fused_mtl


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


# Triton hidden as an absent package is seen: every finder answers "not found" for it (a finder
# that raised instead would break CUDA builds of torch, which look for triton while importing).
HIDE_TRITON = """
import importlib.abc, importlib.util, sys

class HideTriton(importlib.abc.MetaPathFinder):
    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            return None
        for finder in self.finders:
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                return spec
        return None

sys.meta_path[:] = [HideTriton(list(sys.meta_path))]
assert importlib.util.find_spec("triton") is None
"""


def test_everything_works_without_triton():
    result = run_python(
        HIDE_TRITON
        + """
import torch
import fused_mtl
from fused_mtl import UncertaintyWeighting
from fused_mtl.compat import AutomaticWeightedLoss, MultiNoiseLoss
from fused_mtl.functional import uncertainty_weighting

losses = [torch.tensor(1.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)]
for module in (UncertaintyWeighting(2), AutomaticWeightedLoss(2), MultiNoiseLoss(2)):
    total = module(*losses) if not isinstance(module, MultiNoiseLoss) else module(losses)
    total.backward()
    assert torch.isfinite(total)
assert uncertainty_weighting(torch.ones(2), torch.zeros(2)).item() == 2.0
try:
    UncertaintyWeighting(2, backend="triton")(*losses)
except RuntimeError as error:
    assert "needs the triton package" in str(error), error
else:
    raise AssertionError("backend='triton' without triton did not raise")
assert "triton" not in sys.modules
print("ok")
"""
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_import_does_not_import_triton():
    result = run_python(
        """
import sys
import fused_mtl, fused_mtl.compat, fused_mtl.functional
print("triton" in sys.modules)
"""
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_kernels_are_the_subpackage_fused_mtl_kernels():
    import fused_mtl.kernels.uncertainty as kernels

    assert kernels.__name__ == "fused_mtl.kernels.uncertainty"
    assert callable(kernels.uncertainty_forward) and callable(kernels.uncertainty_backward)


def test_version():
    from importlib.metadata import version

    assert fused_mtl.__version__ == version("fused-mtl")
