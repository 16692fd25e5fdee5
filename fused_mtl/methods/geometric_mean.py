"""``GeometricMean``: the geometric loss strategy, GLS (Chennupati et al., CVPR-W 2019)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fused_mtl._distributed import ProcessGroup
from fused_mtl._losses import Reduction, raise_if_below
from fused_mtl.balancer import LossObjective
from fused_mtl.ops.backend import Backend
from fused_mtl.reference import loss_weights


class GeometricMean(LossObjective):
    r"""The geometric mean of the task losses, whose gradient favours the smaller losses.

    .. math:: \mathcal{L} = \Big(\prod_i L_i\Big)^{1/K}, \qquad
              \frac{\partial \mathcal{L}}{\partial L_i} = \frac{\mathcal{L}}{K L_i},

    so a task's weight is inversely proportional to its loss: the total is invariant to the
    scale of each loss (multiplying ``L_i`` by ``c`` multiplies it by ``c^{1/K}``), and no task
    dominates by its units. ``weights`` are ``L / (K L_i)`` at the last training call (``1 /
    K`` before). Computed as ``exp(mean(log L))``, without host synchronisation. The losses
    must be positive: a zero loss gives a zero total and zero weights (the gradient there is
    unbounded), and a negative one NaN; ``check_finite=True`` raises instead. Under a backward
    with ``create_graph=True`` the gradient is differentiable: second derivatives are those of
    the geometric mean.

    Args:
        num_tasks: number of tasks K (may be omitted when ``tasks`` is given).
        tasks: task names; enables calling with a dict and names tasks in errors.
        reduction: ``None`` requires scalar losses; ``"mean"`` / ``"sum"`` reduce each loss.
        check_finite: raise naming the task on a NaN, infinite, zero or negative loss (a host
            read per call).
        backend: accepted so that every method is constructed alike (no kernel).
        sync: under ``torch.distributed``, take the geometric mean of the losses averaged over
            the ranks (one ``all_reduce`` of K numbers), so that every rank trains on the
            whole batch's objective.
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import GeometricMean
        >>> gls = GeometricMean(tasks=["depth", "seg"])
        >>> gls(torch.tensor([2.0, 0.5]))  # sqrt(2.0 * 0.5)
        tensor(1.)
        >>> gls.weights  # 1 / (2 * 2.0), 1 / (2 * 0.5)
        tensor([0.2500, 1.0000])
    """

    weights: Tensor

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        tasks: Sequence[str] | None = None,
        reduction: Reduction = None,
        check_finite: bool = False,
        backend: Backend = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_tasks, tasks, reduction, backend, sync, process_group)
        self.check_finite = bool(check_finite)
        self.register_buffer(
            "weights", torch.full((self.num_tasks,), 1 / self.num_tasks), persistent=False
        )

    def _objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        if self.check_finite:
            raise_if_below(
                "GeometricMean", losses, 0.0, self.tasks, "the geometric mean needs losses > 0"
            )
        return loss_weights.geometric_mean(losses)

    def _weight_function(self, losses: Tensor) -> Callable[[Tensor], Tensor]:
        return loss_weights.geometric_mean_gradient_weights
