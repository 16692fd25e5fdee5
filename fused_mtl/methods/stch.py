"""``STCH``: smooth Tchebycheff scalarisation (Lin et al., ICML 2024)."""

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


class STCH(LossObjective):
    r"""A smooth maximum of the tasks' distances to their ideal values.

    Tchebycheff scalarisation minimises the worst weighted distance to the ideal point
    ``z*`` (each objective's lowest value), ``max_i lambda_i (L_i - z*_i)``: it reaches every
    Pareto-optimal point, but is not smooth. STCH replaces the maximum by its smooth
    approximation of temperature ``mu``:

    .. math:: g_\mu(L) = \mu \log \sum_i \exp\Big(\frac{\lambda_i (L_i - z^*_i)}{\mu}\Big),
              \qquad \frac{\partial g_\mu}{\partial L_i} = \lambda_i\,
              \mathrm{softmax}\Big(\frac{\lambda (L - z^*)}{\mu}\Big)_i,

    within ``mu log K`` of the maximum. The task furthest from its ideal value gets the
    largest weight; as ``mu -> 0`` it gets all of it. ``weights`` are the gradient weights of
    the last training call (they sum to 1 with the default preferences; ``1 / K`` before).

    The ideal point is the paper's: each loss's minimum. A loss bounded below by 0 (a squared
    error, a cross-entropy) has ``z*_i = 0``, the default; pass the known lowest values
    otherwise (an NLL's constant). The value is ``logsumexp``, finite for every finite input.
    STCH compares the losses' values: put them on comparable scales first (divide each by a
    reference level, or pass their logarithms, as the paper's multi-task experiments do); on
    raw losses of very different scales the largest takes all the weight. Under a backward
    with ``create_graph=True`` the gradient is differentiable: second derivatives are those of
    ``g_mu``.

    Args:
        num_tasks: number of tasks K (may be omitted when ``tasks`` is given).
        tasks: task names; enables calling with a dict and names tasks in errors.
        mu: the smoothing temperature, > 0 (default 1.0, LibMTL's default for the paper's
            multi-task experiments).
        ideal_point: ``z*``, one number or one per task (default 0).
        preferences: ``lambda``, positive, one number or one per task (default 1).
        reduction: ``None`` requires scalar losses; ``"mean"`` / ``"sum"`` reduce each loss.
        backend: accepted so that every method is constructed alike (no kernel).
        sync: under ``torch.distributed``, use the losses averaged over the ranks (one
            ``all_reduce`` of K numbers): the whole batch's objective on every rank.
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import STCH
        >>> stch = STCH(tasks=["depth", "seg"], mu=0.1)
        >>> total = stch(torch.tensor([2.0, 0.5]))  # close to max(2.0, 0.5)
        >>> round(total.item(), 4), stch.weights
        (2.0, tensor([1.0000e+00, 3.0590e-07]))
    """

    weights: Tensor
    ideal_point: Tensor
    preferences: Tensor

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        tasks: Sequence[str] | None = None,
        mu: float = 1.0,
        ideal_point: float | Sequence[float] = 0.0,
        preferences: float | Sequence[float] = 1.0,
        reduction: Reduction = None,
        backend: Backend = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        temperature = check_number("STCH", "mu", mu, low=0.0, low_open=True)
        super().__init__(num_tasks, tasks, reduction, backend, sync, process_group)
        if not math.isfinite(temperature):
            raise ValueError(f"STCH: mu must be a finite number > 0, got {mu!r}")
        self.mu = temperature
        # Configuration, not state: they follow .to(device) and are not in a checkpoint.
        self.register_buffer(
            "ideal_point",
            per_task_numbers("STCH", "ideal_point", ideal_point, self.num_tasks, self.tasks),
            persistent=False,
        )
        self.register_buffer(
            "preferences",
            per_task_numbers(
                "STCH", "preferences", preferences, self.num_tasks, self.tasks, positive=True
            ),
            persistent=False,
        )
        self.register_buffer(
            "weights", torch.full((self.num_tasks,), 1 / self.num_tasks), persistent=False
        )

    def _objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        return loss_weights.smooth_tchebycheff(losses, self.mu, self.ideal_point, self.preferences)

    def _weight_function(self, losses: Tensor) -> Callable[[Tensor], Tensor]:
        return partial(
            loss_weights.smooth_tchebycheff_gradient_weights,
            mu=self.mu,
            ideal_point=self.ideal_point,
            preferences=self.preferences,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mu={self.mu}"
