"""``UPGrad``: the mean of the task gradients projected onto the dual cone (Quinton & Rey, 2024)."""

from __future__ import annotations

from torch import Tensor

from fused_mtl.balancer import GramBalancer
from fused_mtl.reference import gram_weights


class UPGrad(GramBalancer):
    r"""Project every task gradient onto the cone of directions that conflict with no task, then
    average.

    The dual cone of the gradients is ``{y : <g_i, y> >= 0 for every i}``: the updates (a step
    along ``-y``) that increase no task's loss to first order. With ``π`` the Euclidean
    projection onto it,

    .. math:: d = \frac{1}{K} \sum_i \pi(g_i), \qquad \pi(G^\top u) = G^\top w,\quad
              w = \arg\min_{v \ge u} v^\top M v

    (Quinton & Rey 2024, Jacobian descent; ``gram_weights.dual_cone_weights`` solves the K
    problems at once: exact by enumeration up to 10 tasks, interior point and an exact polish
    beyond). The update never conflicts with a task, ``<g_i, d> >= 0``, also when the
    gradients' norms differ by orders of magnitude; ``weights`` is the mean of the K
    projections' ``w``. Arguments: those of every Gram method (``GramBalancer``).

    Example:
        >>> import torch
        >>> from fused_mtl import UPGrad
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> upgrad = UPGrad(trunk.parameters(), 2)
        >>> out = heads(torch.relu(trunk(torch.randn(16, 4))))
        >>> _ = upgrad.backward([out[:, 0].square().mean(), -out[:, 0].mean()])
        >>> bool((upgrad.gram @ upgrad.weights.double() >= -1e-6).all())  # float64 Gram
        True
    """

    def _gram_weights(self, gram: Tensor) -> Tensor:
        return gram_weights.upgrad_weights(gram)
