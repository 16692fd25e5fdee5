"""``FairGrad``: alpha-fair resource allocation among the tasks (Ban & Ji, ICML 2024)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fused_mtl.balancer import GramBalancer, check_number
from fused_mtl.ops.task_gradients import SharedParameters
from fused_mtl.reference import gram_weights


class FairGrad(GramBalancer):
    r"""Weights that give each task an ``alpha``-fair share of the improvement:

    .. math:: G G^\top w = w^{-1/\alpha} \quad\text{(elementwise)}, \qquad
              d = \sum_i w_i g_i,

    i.e. ``<g_i, d> = w_i^{-1/alpha}``: the stationarity condition of the alpha-fair utility
    ``sum_i (<g_i, d>)^{1 - alpha} / (1 - alpha)`` (its log at ``alpha = 1``, which is
    Nash-MTL's condition). Larger ``alpha`` is fairer to the task that improves least; small
    ``alpha`` tends to the plain sum. Solved like ``NashMTL`` (``gram_weights.fair_weights``).

    Args:
        alpha: the fairness exponent, > 0 (default 1.0, proportional fairness; the paper tunes
            it per benchmark, 0.5 to 10).
        options: the arguments of every Gram method (``GramBalancer``).

    Example:
        >>> import torch
        >>> from fused_mtl import FairGrad
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> fair = FairGrad(trunk.parameters(), 2, alpha=2.0)
        >>> out = heads(torch.relu(trunk(torch.randn(16, 4))))
        >>> fair.backward([out[:, 0].square().mean(), out[:, 1].mean()]).shape
        torch.Size([])
    """

    def __init__(
        self,
        shared_parameters: SharedParameters | None = None,
        num_tasks: int | None = None,
        *,
        alpha: float = 1.0,
        **options: Any,
    ) -> None:
        value = check_number("FairGrad", "alpha", alpha, low=0.0, low_open=True)
        super().__init__(shared_parameters, num_tasks, **options)
        self.alpha = value

    def _gram_weights(self, gram: Tensor) -> Tensor:
        return gram_weights.fair_weights(gram, self.alpha)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"
