"""What every launcher needs besides its kernel."""

from __future__ import annotations

import contextlib

import torch


def on_device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make the tensor's CUDA device current for a launch.

    Triton launches on the current CUDA device; tensors on another GPU would be read through the
    wrong context. CPU tensors (the interpreter) need no guard.
    """
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
