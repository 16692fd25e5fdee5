"""Uncertainty-weighting benchmark cases: the fused op and what users run today, side by side.

Every case is a callable doing one forward + backward of the balanced total over K scalar task
losses, the unit a training step pays. On CUDA the callable synchronises, so its wall time
includes the launch overhead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fused_mtl import UncertaintyWeighting


def per_task_loop(losses: list[torch.Tensor], log_vars: torch.Tensor) -> torch.Tensor:
    """The loop users copy: one small expression per task, summed in Python."""
    total = 0
    for i, loss in enumerate(losses):
        total = total + torch.exp(-log_vars[i]) * loss + log_vars[i]
    return total


def make_case(implementation: str, num_tasks: int, device: str) -> Callable[[], None]:
    """One forward + backward of ``implementation`` over ``num_tasks`` scalar losses."""
    gen = torch.Generator().manual_seed(num_tasks)
    losses = [torch.rand((), generator=gen).to(device).requires_grad_() for _ in range(num_tasks)]
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if implementation == "per_task_loop":
        log_vars = torch.zeros(num_tasks, device=device, requires_grad=True)

        def total() -> torch.Tensor:
            return per_task_loop(losses, log_vars)
    elif implementation in ("fused_auto", "torch_fallback"):
        backend = "auto" if implementation == "fused_auto" else "torch"
        module = UncertaintyWeighting(num_tasks, backend=backend).to(device)

        def total() -> torch.Tensor:
            return module(losses)
    else:
        raise ValueError(f"unknown implementation {implementation!r}")

    def step() -> None:
        total().backward()
        synchronize()

    return step


IMPLEMENTATIONS = ("fused_auto", "torch_fallback", "per_task_loop")
