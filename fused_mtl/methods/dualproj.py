"""``DualProj``: the mean task gradient projected onto the dual cone."""

from __future__ import annotations

from torch import Tensor

from fused_mtl.balancer import GramBalancer
from fused_mtl.reference import gram_weights


class DualProj(GramBalancer):
    r"""Project the mean gradient onto the cone of directions that conflict with no task.

    .. math:: d = \pi\Big(\frac{1}{K} \sum_i g_i\Big), \qquad
              w = \arg\min_{v \ge \mathbf 1 / K} v^\top M v

    with ``π`` the projection onto ``{y : <g_i, y> >= 0 for every i}`` (Quinton & Rey 2024, who
    compare it with UPGrad, ``UPGrad``). When the mean conflicts with no task it is the update
    itself. ``<g_i, d> >= 0`` for every task. Arguments: those of every Gram method
    (``GramBalancer``).

    Example:
        >>> import torch
        >>> from fused_mtl import DualProj
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> dualproj = DualProj(trunk.parameters(), 2)
        >>> out = heads(torch.relu(trunk(torch.randn(16, 4))))
        >>> _ = dualproj.backward([out[:, 0].square().mean(), -out[:, 0].mean()])
        >>> bool((dualproj.gram @ dualproj.weights.double() >= -1e-6).all())  # float64 Gram
        True
    """

    def _gram_weights(self, gram: Tensor) -> Tensor:
        return gram_weights.dualproj_weights(gram)
