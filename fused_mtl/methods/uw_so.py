"""``UWSO``: analytical uncertainty weighting, soft optimal (Kirchdorfer et al., GCPR 2024)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fused_mtl._distributed import ProcessGroup
from fused_mtl._losses import Reduction, raise_if_below
from fused_mtl.balancer import LossObjective, check_number, weighted_sum
from fused_mtl.ops.backend import Backend
from fused_mtl.reference import loss_weights


class UWSO(LossObjective):
    r"""Uncertainty weighting without learned parameters: each task weighted by the inverse of
    its loss, normalised by a softmax.

    Uncertainty weighting trains ``L_i / sigma_i^2 + log sigma_i^2``, whose minimum over
    ``sigma_i^2`` is at ``sigma_i^2 = L_i``: the learned weight only lags behind ``1 / L_i``.
    UW-SO takes that optimum at every step, as a constant (no gradient flows through it), and
    tempers it with a softmax:

    .. math:: w_i = \mathrm{softmax}\Big(\frac{1}{T L}\Big)_i
              = \frac{\exp(1 / (T L_i))}{\sum_j \exp(1 / (T L_j))},
              \qquad \mathcal{L} = \sum_i w_i L_i .

    A large ``T`` tends to equal weights ``1 / K``; a small one gives the task of smallest loss
    all the weight. ``weights`` are those of the last training call (``1 / K`` before). The
    losses must be positive; a loss at or below the smallest normal number counts as it, so
    the weights stay finite, and ``check_finite=True`` raises instead. Under a backward with
    ``create_graph=True`` the weights stay constants, as in the paper.

    Args:
        num_tasks: number of tasks K (may be omitted when ``tasks`` is given).
        tasks: task names; enables calling with a dict and names tasks in errors.
        temperature: ``T``, > 0 (default 1).
        reduction: ``None`` requires scalar losses; ``"mean"`` / ``"sum"`` reduce each loss.
        check_finite: raise naming the task on a NaN, infinite, zero or negative loss (a host
            read per call).
        backend: accepted so that every method is constructed alike (no kernel).
        sync: under ``torch.distributed``, weight with the losses averaged over the ranks (one
            ``all_reduce`` of K numbers), so that every rank has the same weights.
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import UWSO
        >>> uwso = UWSO(tasks=["depth", "seg"], temperature=1.0)
        >>> total = uwso(torch.tensor([2.0, 0.5]))
        >>> uwso.weights  # softmax(1 / 2, 1 / 0.5)
        tensor([0.1824, 0.8176])
    """

    weights: Tensor

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        tasks: Sequence[str] | None = None,
        temperature: float = 1.0,
        reduction: Reduction = None,
        check_finite: bool = False,
        backend: Backend = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        value = check_number("UWSO", "temperature", temperature, low=0.0, low_open=True)
        if not math.isfinite(value):
            raise ValueError(f"UWSO: temperature must be a finite number > 0, got {temperature!r}")
        super().__init__(num_tasks, tasks, reduction, backend, sync, process_group)
        self.temperature = value
        self.check_finite = bool(check_finite)
        self.register_buffer(
            "weights", torch.full((self.num_tasks,), 1 / self.num_tasks), persistent=False
        )

    def _objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        if self.check_finite:
            raise_if_below("UWSO", losses, 0.0, self.tasks, "its weight is 1 / loss")
        weights = loss_weights.soft_optimal_uncertainty_weights(losses, self.temperature)
        return weighted_sum(weights, losses), weights

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"
