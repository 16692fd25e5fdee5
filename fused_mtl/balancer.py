"""``Balancer``: the interface every loss-balancing method shares.

A training loop that balances its task losses differs from plain training by one line::

    optimizer.zero_grad()
    total = balancer.backward(losses)   # instead of sum(losses).backward()
    optimizer.step()

``backward`` accepts the task losses in every calling convention of ``fused_mtl._losses``
(varargs, a list, a ``(K,)`` tensor, a dict by task name), accumulates into ``.grad`` every
gradient that ``loss.backward()`` on the balanced total would (the model's parameters, and the
balancer's own parameters by the method's rule), and returns the balanced total, detached, for
logging. ``balancer.weights`` is the current weight of each task, shape ``(K,)``.

Switching method is a one-line change of the constructor. Two kinds of method share the rest:

- ``LossWeighting``: the weights depend only on loss values or reported metrics (equal
  weighting, DWA, DTP). The module is also callable, ``total = balancer(losses)``, for loops that
  call ``total.backward()`` themselves.
- ``GradientBalancer``: the weights depend on the per-task gradients of shared parameters
  (GradNorm, MGDA), which only ``backward`` can compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fused_mtl._backend import Backend, check_backend, requested_backend
from fused_mtl._losses import Reduction, check_losses, check_reduction, resolve_tasks
from fused_mtl._task_gradients import SharedParameters, TaskGradients, shared_parameters

__all__ = ["Balancer", "GradientBalancer", "LossWeighting"]

LossArgs = Tensor | Sequence[Tensor] | dict[str, Tensor]


class Balancer(nn.Module):
    """Base class of the balancing methods: task bookkeeping and the backend choice.

    Subclasses implement ``forward(*losses)`` (the balanced total) or override ``backward``,
    and provide ``weights`` (a property, a buffer, or the parameter itself when the method learns
    its weights directly, as GradNorm does).
    """

    weights: Tensor

    def __init__(
        self, num_tasks: int | None, tasks: Sequence[str] | None, backend: Backend
    ) -> None:
        super().__init__()
        self.num_tasks, self.tasks = resolve_tasks(num_tasks, tasks)
        self.backend = check_backend(backend)
        # FUSED_MTL_BACKEND is applied here, once: see requested_backend.
        self._requested_backend = requested_backend(self.backend)

    def backward(self, *losses: LossArgs) -> Tensor:
        """``total = self(*losses)``, then ``total.backward()``; returns the total, detached."""
        total = self(*losses)
        total.backward()
        return total.detach()

    def extra_repr(self) -> str:
        tasks = self.tasks if self.tasks is not None else self.num_tasks
        return f"tasks={tasks}, backend={self.backend!r}"


def weighted_sum(weights: Tensor, losses: Tensor) -> Tensor:
    """``sum_i w_i L_i`` in the promoted dtype (float32 for half-precision losses)."""
    dtype = torch.promote_types(weights.dtype, losses.dtype)
    return (weights.to(dtype) * losses.to(dtype)).sum()


class LossWeighting(Balancer):
    """A method whose weights come from loss values or metrics, not from gradients.

    ``forward`` stacks the losses, lets the method see them (``_observe``, in training mode
    only: DWA averages them), and returns ``sum_i w_i L_i`` with ``w = self.weights`` held
    constant. The methods keep their state in buffers on the module's device: move the module
    with ``.to(device)`` like a model.
    """

    def __init__(
        self,
        num_tasks: int | None,
        tasks: Sequence[str] | None,
        reduction: Reduction,
        backend: Backend,
    ) -> None:
        super().__init__(num_tasks, tasks, backend)
        self.reduction = check_reduction(reduction)

    def _device(self) -> torch.device:
        return self.weights.device

    def _observe(self, losses: Tensor) -> None:
        """Called with the detached ``(K,)`` losses of each training-mode call."""

    def forward(self, *losses: LossArgs) -> Tensor:
        """The weighted total (0-dim) of the task losses, in any calling convention."""
        stacked, _ = check_losses(
            losses,
            num_tasks=self.num_tasks,
            names=self.tasks,
            reduction=self.reduction,
            device=self._device(),
        )
        if self.training:
            self._observe(stacked.detach())
        return weighted_sum(self.weights, stacked)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reduction={self.reduction!r}"


class GradientBalancer(Balancer):
    """A method whose weights come from the per-task gradients of shared parameters.

    Holds the shared parameters (referenced, not registered: they are the model's) and the
    ``TaskGradients`` that computes their per-task gradients; see ``gradient_mode``.
    """

    def __init__(
        self,
        shared: SharedParameters | None,
        num_tasks: int | None,
        tasks: Sequence[str] | None,
        backend: Backend,
        per_task_gradients: str,
    ) -> None:
        super().__init__(num_tasks, tasks, backend)
        parameters, names = shared_parameters(shared) if shared is not None else ([], [])
        self._shared = parameters
        self._task_gradients = TaskGradients(parameters, names, per_task_gradients)

    @property
    def gradient_mode(self) -> str | None:
        """``"batched"`` or ``"loop"`` once chosen on the first call (``None`` before)."""
        return self._task_gradients.mode

    @property
    def gradient_mode_reason(self) -> str:
        return self._task_gradients.reason

    def forward(self, *losses: LossArgs) -> Tensor:
        name = type(self).__name__
        raise TypeError(
            f"{name} needs the per-task gradients of the shared parameters: call "
            f"{name.lower()}.backward(losses) instead of {name.lower()}(losses)"
        )

    def _graph_losses(
        self, losses: tuple[object, ...], device: torch.device
    ) -> tuple[Tensor, list[Tensor] | None]:
        """The ``(K,)`` losses (and the separate ones), which must carry a graph."""
        stacked, separate = check_losses(
            losses, num_tasks=self.num_tasks, names=self.tasks, reduction=None, device=device
        )
        if not stacked.requires_grad:
            raise ValueError(
                f"{type(self).__name__}.backward: no task loss requires grad; compute the losses "
                "from the model's outputs (not under torch.no_grad() and not detached)"
            )
        return stacked, separate
