"""``ExcessMTL``: robust multi-task learning with excess risks (He et al., ICML 2024)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fused_mtl._distributed import ProcessGroup
from fused_mtl.balancer import GradientBalancer, LossArgs, check_number, weighted_sum
from fused_mtl.ops.backend import Backend
from fused_mtl.ops.task_gradients import SharedParameters
from fused_mtl.reference import stochastic


class ExcessMTL(GradientBalancer):
    r"""Weight each task by how far it still is from its best loss, its excess risk.

    A task's loss mixes what can still be learnt (the excess risk) with noise that cannot
    (its label noise); weighting by the loss would favour the noisiest task. ExcessMTL
    estimates each excess risk by a second-order expansion, ``g_i^T H_i^{-1} g_i`` (the
    expansion's factor 1/2 cancels in the relative risks below), with AdaGrad's diagonal
    ``H_i = sqrt(S_i)``, ``S_i`` the running sum of task i's squared gradients (per
    coordinate of the shared parameters), and moves the weights by an
    exponentiated-gradient step on the risks relative to their first estimate:

    .. math:: r_i = g_i^\top \mathrm{diag}(S_i + \epsilon)^{-1/2} g_i, \qquad
              w_i \leftarrow \frac{K\, w_i e^{\eta r_i / r^0_i}}{\sum_j w_j e^{\eta r_j / r^0_j}},

    ``epsilon = 1e-7``. The first step only records ``r^0`` (the weights stay 1); a task whose
    gradient is zero there (a masked loss without labels in the batch) records its first
    positive estimate instead, and keeps a relative risk of 0 until then. The total is
    ``sum_i w_i L_i`` (weights summing to K), whose ordinary backward trains everything.

    ``S`` (``squared_gradient_sums``, K x P), ``initial_risks`` (NaN before the first step) and
    ``weights`` are buffers, saved in ``state_dict``. Under ``torch.distributed`` the task
    gradients are averaged over the ranks (one ``all_reduce`` of K x P numbers per step):
    every rank has the whole batch's risks and weights; FSDP2 works (the gradients are the
    gathered parameters').

    Args:
        shared_parameters: the parameters whose per-task gradients estimate the risks.
        num_tasks: K (may be omitted when ``tasks`` is given).
        step_size: ``eta`` > 0 (default 1e-2, LibMTL's ``robust_step_size``).
        tasks: task names; enables calling with a dict and names tasks in errors.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, for the fused ops.
        per_task_gradients: ``"auto"``, ``"batched"`` or ``"loop"`` (see ``TaskGradients``).
        sync: under ``torch.distributed``, average the per-task gradients over the ranks.
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import ExcessMTL
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> excess = ExcessMTL(trunk.parameters(), 2)
        >>> for _ in range(2):
        ...     out = heads(torch.relu(trunk(torch.randn(16, 4))))
        ...     _ = excess.backward([out[:, 0].square().mean(), out[:, 1].mean()])
        >>> round(excess.weights.sum().item(), 5)
        2.0
    """

    _gram_only = False  # it combines the per-task gradients themselves

    squared_gradient_sums: Tensor
    initial_risks: Tensor
    weights: Tensor

    def __init__(
        self,
        shared_parameters: SharedParameters | None = None,
        num_tasks: int | None = None,
        *,
        step_size: float = 1e-2,
        tasks: Sequence[str] | None = None,
        backend: Backend = "auto",
        per_task_gradients: str = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        self.step_size = check_number(
            "ExcessMTL", "step_size", step_size, low=0.0, high=1e6, low_open=True
        )
        super().__init__(
            shared_parameters, num_tasks, tasks, backend, per_task_gradients, sync, process_group
        )
        options = self._state_options()
        size = sum(parameter.numel() for parameter in self._shared)
        num = self.num_tasks
        self.register_buffer("squared_gradient_sums", torch.zeros(num, size, **options))
        self.register_buffer("initial_risks", torch.full((num,), math.nan, **options))
        self.register_buffer("weights", torch.ones(num, **options))

    def forward(self, *losses: LossArgs) -> Tensor:
        """``sum_i w_i L_i`` with this step's weights."""
        reported = self._reported_total(losses, self.weights.device)
        if reported is not None:
            return reported
        stacked, separate = self._graph_losses(losses, self._shared_device())
        window = self._step_call()
        if window is not None:
            # A micro-batch of an optimizer step (step_with): the step's mean gradients so far.
            task_grads, matrix, _ = self._step_gradients(window, stacked, separate)
        else:
            _, matrix = self._task_matrix(stacked, separate)
        risks, sums = stochastic.excess_risks(matrix, self.squared_gradient_sums)
        risks = risks.to(self.initial_risks.dtype)
        # A task's first estimate is its first positive one (a masked loss can have no
        # gradient in a batch); until then, and on the step that records it, its relative
        # risk is 0. The weights move from the step after the first estimates.
        pending = torch.isnan(self.initial_risks)
        updated = stochastic.excess_mtl_weights(
            self.weights, risks, self.initial_risks, self.step_size
        )
        self.weights = torch.where(pending.all(), self.weights, updated)
        self.initial_risks = torch.where(pending & (risks > 0), risks, self.initial_risks)
        self.squared_gradient_sums = sums
        total = weighted_sum(self.weights, stacked)
        if window is None:
            return total
        update = self.weights.to(matrix.dtype) @ matrix
        if window.calls == 1:
            window.deposited = update
            return total
        return self._complete_step(total, window, task_grads, self.weights, update)

    def _checkpoint_faults(self, tensors: dict[str, Any]) -> list[str]:
        faults = self._value_faults(
            "weights",
            tensors.get("weights"),
            "ExcessMTL's weights are finite and > 0",
            lambda value: math.isfinite(value) and value > 0,
        )
        return faults + self._value_faults(
            "initial_risks",
            tensors.get("initial_risks"),
            "a first risk estimate is finite and >= 0 (NaN: none yet)",
            lambda value: math.isnan(value) or (math.isfinite(value) and value >= 0),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, step_size={self.step_size}"
