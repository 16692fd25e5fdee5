"""``PBI``: the penalty-based boundary intersection (Zhang & Li, MOEA/D, IEEE TEC 2007)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from fused_mtl._distributed import ProcessGroup
from fused_mtl._losses import Reduction, per_task_numbers
from fused_mtl.balancer import LossObjective, check_number
from fused_mtl.ops.backend import Backend
from fused_mtl.reference import loss_weights


class PBI(LossObjective):
    r"""Progress along a preference ray, plus a penalty for leaving it.

    With the unit preference direction ``u = lambda / ||lambda||`` and the losses' offset from
    the ideal point ``r = L - z*``, PBI splits ``r`` into its length along the ray and its
    distance to it:

    .. math:: d_1 = \langle r, u\rangle, \qquad d_2 = \|r - d_1 u\|, \qquad
              f = d_1 + \theta\, d_2,

    and its gradient weights are ``u + theta (r - d_1 u) / d_2``. A task whose loss is below
    its share of the ray can get a negative weight: PBI trades it for the others to reach the
    trade-off the preferences ask for, which is how it targets one point of the Pareto front
    (MOEA/D decomposes the front into one such problem per preference vector). ``theta = 0``
    is the projection on the ray (a linear scalarisation). ``weights`` are the gradient
    weights of the last training call (``u`` before). The losses are compared as they are:
    put them on comparable scales first (normalised losses, or their ratios to their first
    values). On the ray (``d_2 = 0``) the distance's gradient is taken as 0. Under a backward
    with ``create_graph=True`` the gradient is differentiable: second derivatives are PBI's.

    Args:
        num_tasks: number of tasks K (may be omitted when ``tasks`` is given).
        tasks: task names; enables calling with a dict and names tasks in errors.
        theta: the penalty on the distance to the ray, >= 0 (default 5, the MOEA/D paper's).
        preferences: ``lambda``, positive, one number or one per task (default 1: the
            diagonal, equal losses).
        ideal_point: ``z*``, one number or one per task (default 0).
        reduction: ``None`` requires scalar losses; ``"mean"`` / ``"sum"`` reduce each loss.
        backend: accepted so that every method is constructed alike (no kernel).
        sync: under ``torch.distributed``, use the losses averaged over the ranks (one
            ``all_reduce`` of K numbers): the whole batch's objective on every rank.
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import PBI
        >>> pbi = PBI(tasks=["depth", "seg"], theta=5.0)
        >>> pbi(torch.tensor([2.0, 2.0]))  # on the diagonal: d_1 = 2 sqrt(2), d_2 = 0
        tensor(2.8284)
        >>> pbi.weights  # u = (1, 1) / sqrt(2)
        tensor([0.7071, 0.7071])
    """

    weights: Tensor
    ideal_point: Tensor
    preferences: Tensor

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        tasks: Sequence[str] | None = None,
        theta: float = 5.0,
        preferences: float | Sequence[float] = 1.0,
        ideal_point: float | Sequence[float] = 0.0,
        reduction: Reduction = None,
        backend: Backend = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        penalty = check_number("PBI", "theta", theta, low=0.0, high=math.inf)
        if not math.isfinite(penalty):
            raise ValueError(f"PBI: theta must be a finite number >= 0, got {theta!r}")
        super().__init__(num_tasks, tasks, reduction, backend, sync, process_group)
        self.theta = penalty
        # Configuration, not state: they follow .to(device) and are not in a checkpoint.
        self.register_buffer(
            "preferences",
            per_task_numbers(
                "PBI", "preferences", preferences, self.num_tasks, self.tasks, positive=True
            ),
            persistent=False,
        )
        self.register_buffer(
            "ideal_point",
            per_task_numbers("PBI", "ideal_point", ideal_point, self.num_tasks, self.tasks),
            persistent=False,
        )
        self.register_buffer(
            "weights",
            (self.preferences / self.preferences.norm()).to(torch.get_default_dtype()),
            persistent=False,
        )

    def _objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        return loss_weights.penalty_boundary_intersection(
            losses, self.theta, self.preferences, self.ideal_point
        )

    def _weight_function(self, losses: Tensor) -> Callable[[Tensor], Tensor]:
        return partial(
            loss_weights.penalty_boundary_intersection_gradient_weights,
            theta=self.theta,
            preferences=self.preferences,
            ideal_point=self.ideal_point,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, theta={self.theta}"
