"""Which implementation runs an op: the Triton kernels or the torch reference.

``backend="auto"`` picks Triton for CUDA tensors in fp32/fp16/bf16 when triton imports, and the
torch reference otherwise; the environment variable ``FUSED_MTL_BACKEND`` (``auto``, ``triton`` or
``torch``) overrides "auto", read when a module is built and on each functional call.
``backend="triton"`` on CPU tensors runs the kernels in the Triton interpreter and therefore needs
``TRITON_INTERPRET=1`` set before the kernels are first imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
ENV_VAR = "FUSED_MTL_BACKEND"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_installed() -> bool:
    # find_spec locates the package without importing it: `import fused_mtl` stays light.
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


TRITON_INSTALLED = _triton_installed()
_import_outcome: list[ImportError | None] = []


def check_backend(backend: str) -> Backend:
    """Validate a backend name given by the user (constructor or call)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


def _triton_import_error() -> ImportError | None:
    """``None`` when triton imports, else the error it raised (tried once per process)."""
    if not _import_outcome:
        try:
            importlib.import_module("triton")
            _import_outcome.append(None)
        except ImportError as error:
            _import_outcome.append(error)
    return _import_outcome[0]


def triton_available() -> bool:
    """Whether triton imports. The import is tried on the first eager call; while torch.compile
    traces (imports cannot be traced) the answer is whether the package is installed."""
    if not _import_outcome and torch.compiler.is_compiling():
        return TRITON_INSTALLED
    return _triton_import_error() is None


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend(backend: Backend) -> Backend:
    """``backend`` with the ``FUSED_MTL_BACKEND`` override applied to "auto".

    Modules call this once, when they are built, and keep the answer: an environment lookup costs
    several microseconds, too much to pay on every call of a fused op.
    """
    if backend != "auto":
        return backend
    override = os.environ.get(ENV_VAR, "auto")
    if override not in BACKENDS:
        raise ValueError(
            f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {override!r}"
        )
    return override  # type: ignore[return-value]


def resolve_backend(requested: Backend, *tensors: torch.Tensor) -> Literal["triton", "torch"]:
    """The implementation that runs for these tensors; raises when "triton" cannot run them.

    ``requested`` comes from ``requested_backend``: the environment is not read here.
    """
    if requested == "torch":
        return "torch"
    device = tensors[0].device
    if requested == "auto":
        if device.type != "cuda":
            return "torch"
        supported = all(t.dtype in KERNEL_DTYPES for t in tensors)
        return "triton" if supported and triton_available() else "torch"
    # requested == "triton": run the kernels or say exactly why they cannot run.
    if not triton_available():
        raise RuntimeError(
            f"backend='triton' needs the triton package, which failed to import "
            f"({_triton_import_error()}); install fused-mtl[triton] or use backend='torch'"
        )
    if device.type == "cpu" and not triton_interpreter_enabled():
        raise RuntimeError(
            "backend='triton' on CPU tensors runs only in the Triton interpreter: set "
            "TRITON_INTERPRET=1 before fused_mtl's kernels are imported, or use backend='torch'"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"backend='triton' supports CUDA (and interpreted CPU) tensors, not {device.type}"
        )
    if not all(t.dtype in KERNEL_DTYPES for t in tensors):
        found = sorted({str(t.dtype) for t in tensors})
        raise TypeError(
            f"backend='triton' supports float32, float16 and bfloat16, got {', '.join(found)}; "
            "use backend='torch' for other dtypes"
        )
    return "triton"
