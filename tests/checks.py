"""Assertions and probes shared by the op tests."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch


def assert_close_to(got, value, magnitude, rtol, what):
    error = (got.double().cpu() - value).abs()
    bound = rtol * magnitude
    worst = int(torch.argmax(error - bound)) if error.dim() else 0
    assert bool((error <= bound).all()), (
        f"{what}: error {error.flatten()[worst].item():.3e} > bound "
        f"{bound.flatten()[worst].item():.3e} (got {got.flatten()[worst].item()}, "
        f"expected {value.flatten()[worst].item()})"
    )


class LaunchCounter:
    """Stands in for a Triton kernel and counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def load_script(path: Path) -> ModuleType:
    """A script of ``benchmarks/`` imported as a module, under its file name."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
