"""GradNorm benchmark cases: a training step with the fused path and with a per-task loop, and
the per-task gradient norms / Gram on their own.

A GradNorm step is what a training loop pays per batch: the forward of the model, the per-task
gradients of the last shared layer, their norms, GradNorm's weight gradient and the backward of
the weighted total. On CUDA every callable synchronises, so its wall time includes launches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fused_mtl import GradNorm, reference
from fused_mtl.functional import task_grad_norms, task_gram
from fused_mtl.synthetic import MultiTaskMLP, gradnorm_toy

BATCH = 256
# The module's configurations: the default (batched per-task gradients, fused norms on CUDA), the
# per-task backward loop with fused norms, and the default on the torch reference.
GRADNORM_MODULE_OPTIONS: dict[str, dict[str, str]] = {
    "fused_auto": {},
    "fused_loop": {"per_task_gradients": "loop"},
    "torch_fallback": {"backend": "torch"},
}


def _synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def per_task_loop_step(
    model: MultiTaskMLP,
    weights: torch.Tensor,
    initial_losses: torch.Tensor,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 1.5,
) -> None:
    """GradNorm as common implementations write it: K backward passes, K norm calls."""
    shared = list(model.last_shared_layer.parameters())
    losses = (model(inputs) - targets).square().mean(dim=(1, 2))
    norms = []
    for loss in losses:
        grads = torch.autograd.grad(loss, shared, retain_graph=True)
        per_parameter = torch.stack([torch.linalg.vector_norm(g) for g in grads])
        norms.append(torch.linalg.vector_norm(per_parameter))
    weights.grad = reference.gradnorm_weight_grad(
        weights.detach(), torch.stack(norms), losses.detach(), initial_losses, alpha
    )
    (weights.detach() * losses).sum().backward()


def make_gradnorm_step(implementation: str, num_tasks: int, device: str) -> Callable[[], None]:
    """One GradNorm training step (without the optimiser update) on the toy's network."""
    data = gradnorm_toy(num_tasks=num_tasks, num_samples=BATCH, device=device)
    torch.manual_seed(0)
    model = MultiTaskMLP(num_tasks).to(device)
    synchronize = _synchronizer(device)
    if implementation == "per_task_loop":
        weights = torch.ones(num_tasks, device=device, requires_grad=True)
        with torch.no_grad():
            initial = (model(data.inputs) - data.targets).square().mean(dim=(1, 2))

        def run() -> None:
            per_task_loop_step(model, weights, initial, data.inputs, data.targets)
    elif implementation in GRADNORM_MODULE_OPTIONS:
        gradnorm = GradNorm(
            model.last_shared_layer.parameters(),
            num_tasks,
            **GRADNORM_MODULE_OPTIONS[implementation],
        )

        def run() -> None:
            gradnorm.backward((model(data.inputs) - data.targets).square().mean(dim=(1, 2)))
    else:
        raise ValueError(f"unknown implementation {implementation!r}")

    def step() -> None:
        model.zero_grad(set_to_none=True)
        run()
        synchronize()

    return step


GRADNORM_IMPLEMENTATIONS = ("fused_auto", "fused_loop", "torch_fallback", "per_task_loop")


def make_gram_case(
    op: str, implementation: str, num_tasks: int, width: int, device: str
) -> tuple[Callable[[], None], int]:
    """``op`` ("norms" or "gram") over a ``(K, P)`` fp32 gradient matrix; returns the callable
    and the bytes it must read (for achieved GB/s)."""
    gen = torch.Generator(device=device).manual_seed(num_tasks)
    grads = torch.randn(num_tasks, width, generator=gen, device=device)
    synchronize = _synchronizer(device)
    if implementation == "fused_auto":
        fused = task_grad_norms if op == "norms" else task_gram

        def compute() -> torch.Tensor:
            return fused(grads)
    elif implementation == "per_task" and op == "norms":

        def compute() -> torch.Tensor:
            return torch.stack([torch.linalg.vector_norm(grads[i]) for i in range(num_tasks)])
    elif implementation == "matmul" and op == "gram":

        def compute() -> torch.Tensor:
            return grads @ grads.T
    else:
        raise ValueError(f"unknown case {op!r} / {implementation!r}")

    def step() -> None:
        compute()
        synchronize()

    return step, grads.numel() * grads.element_size()


GRAM_BASELINES = {"norms": "per_task", "gram": "matmul"}
