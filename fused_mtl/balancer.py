"""``Balancer``: the interface every loss-balancing method shares.

A training loop that balances its task losses differs from plain training by one line::

    optimizer.zero_grad()
    total = balancer(losses)            # instead of total = sum(losses)
    total.backward()                    # or scaler.scale(total).backward(), or the engine's
    optimizer.step()

``balancer(losses)`` accepts the task losses in every calling convention of
``fused_mtl._losses`` (varargs, a list, a ``(K,)`` tensor, a dict by task name) and returns the
balanced total. Whatever runs its backward (plain code, a ``GradScaler``, Lightning, DDP, FSDP2)
puts into ``.grad`` the balanced gradient of the model's parameters and, for the balancer's own
parameters, the method's rule. ``balancer.backward(losses)`` is the one-line form: the call and
its backward, returning the total detached. ``balancer.weights`` is the current weight of each
task, shape ``(K,)``.

Switching method is a one-line change of the constructor. Two kinds of method share the rest:

- ``LossWeighting``: the weights depend only on loss values or reported metrics (equal
  weighting, DWA, DTP).
- ``GradientBalancer``: the weights depend on the per-task gradients of shared parameters
  (GradNorm, MGDA). The call computes them (one batched backward pass, or one per task) before it
  returns the total; the total's own backward is then the usual one.

Under ``torch.distributed`` every method balances with the global numbers (the losses and the
per-task gradients of the whole batch, over all ranks) and gives bit-for-bit the same weights on
every rank; see ``fused_mtl._distributed`` and ``docs/distributed.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fused_mtl._backend import Backend, check_backend, requested_backend
from fused_mtl._distributed import ProcessGroup, TaskSync, is_sharded, unsharded_parameters
from fused_mtl._gram_op import task_gram_or_norms
from fused_mtl._losses import (
    Reduction,
    check_losses,
    check_reduction,
    resolve_tasks,
    task_label,
)
from fused_mtl._task_gradients import (
    SharedParameters,
    TaskGradients,
    shared_parameters,
    task_graph_roots,
)

__all__ = ["Balancer", "GradientBalancer", "LossWeighting"]

LossArgs = Tensor | Sequence[Tensor] | dict[str, Tensor]


class Balancer(nn.Module):
    """Base class of the balancing methods: task bookkeeping and the backend choice.

    Subclasses implement ``forward(*losses)`` (the balanced total) and provide ``weights`` (a
    property, a buffer, or the parameter itself when the method learns its weights directly, as
    GradNorm does). ``sync`` and ``process_group`` choose what is communicated under
    ``torch.distributed`` (see ``TaskSync``).
    """

    weights: Tensor

    def __init__(
        self,
        num_tasks: int | None,
        tasks: Sequence[str] | None,
        backend: Backend,
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.num_tasks, self.tasks = resolve_tasks(num_tasks, tasks)
        self.backend = check_backend(backend)
        # FUSED_MTL_BACKEND is applied here, once: see requested_backend.
        self._requested_backend = requested_backend(self.backend)
        self._sync = TaskSync(self._configuration(), sync, process_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_sync" not in self.__dict__:  # pickled whole before balancers could sync
            self._sync = TaskSync(self._configuration(), True, None)

    def _configuration(self) -> tuple[str, int, tuple[str, ...] | None]:
        """What every rank must have built alike: the method and its tasks."""
        tasks = tuple(self.tasks) if self.tasks is not None else None
        return type(self).__name__, self.num_tasks, tasks

    def _syncing(self) -> bool:
        """Whether a training call communicates (distributed, more than one rank, sync on)."""
        return self.training and torch.is_grad_enabled() and self._sync.active(self)

    def set_process_group(self, process_group: ProcessGroup | None) -> None:
        """Sync over ``process_group`` from now on (``None``: the default group); for example
        after loading a balancer pickled whole with ``torch.save``, which cannot keep one."""
        self._sync.set_process_group(process_group)

    def backward(self, *losses: LossArgs) -> Tensor:
        """``total = self(*losses)``, then ``total.backward()``; returns the total, detached."""
        check_grad_enabled(self)
        total = self(*losses)
        total.backward()
        return total.detach()

    def extra_repr(self) -> str:
        tasks = self.tasks if self.tasks is not None else self.num_tasks
        return f"tasks={tasks}, backend={self.backend!r}"


def check_grad_enabled(balancer: Balancer) -> None:
    if not torch.is_grad_enabled():
        raise RuntimeError(
            f"{type(balancer).__name__}.backward was called with grad disabled "
            "(torch.no_grad() or torch.inference_mode()): there is no graph to back-propagate; "
            "call it where the losses were computed with grad, or call the balancer itself "
            "(balancer(losses)) to get the total without a backward"
        )


def weighted_sum(weights: Tensor, losses: Tensor) -> Tensor:
    """``sum_i w_i L_i`` in the promoted dtype (float32 for half-precision losses)."""
    dtype = torch.promote_types(weights.dtype, losses.dtype)
    return (weights.to(dtype) * losses.to(dtype)).sum()


class LossWeighting(Balancer):
    """A method whose weights come from loss values or metrics, not from gradients.

    ``forward`` stacks the losses, returns ``sum_i w_i L_i`` with ``w = self.weights`` held
    constant, and then lets the method see them (``_observe``, in training mode only: DWA
    averages them and may end a period, whose new weights apply from the next call). The
    methods keep their state in buffers on the module's device: move the module with
    ``.to(device)`` like a model.
    """

    def __init__(
        self,
        num_tasks: int | None,
        tasks: Sequence[str] | None,
        reduction: Reduction,
        backend: Backend,
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_tasks, tasks, backend, sync, process_group)
        self.reduction = check_reduction(reduction)

    #: Whether ``_observe`` learns from the losses (DWA): its state then takes part in syncs.
    _observes_losses = False

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
        if self.training and self._observes_losses:
            # Under torch.distributed the first sync loads rank 0's state into the buffers:
            # before the weights are used (nothing is communicated after the first call).
            self._sync.active(self)
        # The weights in force for this call: a call that ends a period (DWA) is still one of
        # its calls, and the next period's weights start with the next call.
        total = weighted_sum(self.weights, stacked)
        if self.training:
            self._observe(stacked.detach())
        return total

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reduction={self.reduction!r}"


class GradientBalancer(Balancer):
    """A method whose weights come from the per-task gradients of shared parameters.

    Holds the shared parameters (referenced, not registered: they are the model's) and the
    ``TaskGradients`` that computes their per-task gradients; see ``gradient_mode``.

    Calling the module in training mode with grad enabled computes the per-task gradients (one
    extra batched backward pass, or K, over the part of the graph that reaches the shared
    parameters; a plain sum has none), updates the weights and returns the balanced total; its
    backward is the ordinary one. In eval mode or under ``torch.no_grad()`` the call returns
    ``sum_i w_i L_i`` with the current weights and changes nothing.
    """

    def __init__(
        self,
        shared: SharedParameters | None,
        num_tasks: int | None,
        tasks: Sequence[str] | None,
        backend: Backend,
        per_task_gradients: str,
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_tasks, tasks, backend, sync, process_group)
        parameters, names = shared_parameters(shared) if shared is not None else ([], [])
        self._shared = parameters
        # FSDP2 shards parameters into DTensors: their gradients are taken on the unsharded copy.
        self._sharded = any(is_sharded(parameter) for parameter in parameters)
        self._task_gradients = TaskGradients(parameters, names, per_task_gradients)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_sharded" not in self.__dict__:  # pickled whole before FSDP2 support
            self._sharded = any(is_sharded(parameter) for parameter in self._shared)

    @property
    def gradient_mode(self) -> str | None:
        """``"batched"`` or ``"loop"`` once chosen on the first call (``None`` before)."""
        return self._task_gradients.mode

    @property
    def gradient_mode_reason(self) -> str:
        """Why ``gradient_mode`` was chosen (the batched backward's failure, for example)."""
        return self._task_gradients.reason

    def _reported_total(self, losses: tuple[object, ...], device: torch.device) -> Tensor | None:
        """``sum_i w_i L_i`` with the current weights when the call only reports (eval mode or
        grad disabled); ``None`` when it balances."""
        if self.training and torch.is_grad_enabled():
            return None
        stacked, _ = check_losses(
            losses, num_tasks=self.num_tasks, names=self.tasks, reduction=None, device=device
        )
        return weighted_sum(self.weights.detach(), stacked)

    def _graph_losses(
        self, losses: tuple[object, ...], device: torch.device
    ) -> tuple[Tensor, list[Tensor] | None]:
        """The ``(K,)`` losses (and the separate ones), which must carry a graph."""
        stacked, separate = check_losses(
            losses, num_tasks=self.num_tasks, names=self.tasks, reduction=None, device=device
        )
        if not stacked.requires_grad:
            raise ValueError(
                f"{type(self).__name__}: no task loss requires grad; compute the losses "
                "from the model's outputs (not under torch.no_grad() and not detached)"
            )
        # Every call, in every mode: a task whose loss has no graph has no gradient, and would
        # read as a zero one (MGDA would give it all the weight).
        roots = task_graph_roots(stacked, separate)
        for index, root in enumerate(roots or ()):
            if root is None:
                raise ValueError(
                    f"{type(self).__name__}: task {task_label(index, self.tasks)}: its loss has "
                    "no graph (a constant, a detached tensor, or computed under "
                    "torch.no_grad()); compute every task's loss from the model's outputs"
                )
        return stacked, separate

    def _task_gram(
        self,
        gradients: TaskGradients,
        losses: Tensor,
        separate: list[Tensor] | None,
        diagonal: bool,
        features: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The Gram matrix ``(K, K)`` (``diagonal``: the norms ``(K,)``) of the per-task
        gradients, and the detached losses: over all ranks when syncing, else this process's.

        ``features``: a tensor to differentiate instead of the shared parameters (MGDA-UB),
        whose rows are this rank's own samples.
        """
        syncing = self._syncing()
        if features is not None:
            inputs: list[Tensor] | None = [features]
        else:
            inputs = unsharded_parameters(self._shared) if self._sharded else None
        agree = self._sync.smallest if syncing else None
        task_grads = gradients(losses, self.tasks, separate, inputs, agree)
        if not syncing:
            gram = task_gram_or_norms(task_grads, diagonal, self._requested_backend)
            return gram, losses.detach()
        if features is not None:
            local = task_gram_or_norms(task_grads, diagonal, self._requested_backend)
            return self._sync.gram_of_samples(local, losses)
        return self._sync.gram(task_grads, losses, diagonal, self._requested_backend)


def with_parameter_gradient(total: Tensor, parameter: Tensor, gradient: Tensor) -> Tensor:
    """``total`` itself, whose backward also accumulates ``gradient`` (times the upstream
    gradient) into ``parameter.grad``: for a method that trains its own parameter by a rule of
    its own (GradNorm's weights), through autograd, where DDP, FSDP and a GradScaler see it
    like any parameter's gradient. The total's value is untouched, whatever ``gradient`` is."""
    return _WithParameterGradient.apply(total, parameter, gradient)


class _WithParameterGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, total: Tensor, parameter: Tensor, gradient: Tensor) -> Tensor:
        ctx.save_for_backward(gradient)
        return total.clone()

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor, Tensor, None]:
        (gradient,) = ctx.saved_tensors
        return grad_total, grad_total.to(gradient.dtype) * gradient, None
