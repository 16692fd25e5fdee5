"""``NashMTL``: multi-task learning as a bargaining game (Navon et al., ICML 2022)."""

from __future__ import annotations

from torch import Tensor

from fused_mtl.balancer import GramBalancer
from fused_mtl.reference import gram_weights


class NashMTL(GramBalancer):
    r"""The Nash bargaining solution among the tasks: weights ``alpha > 0`` with

    .. math:: G G^\top \alpha = 1 / \alpha \quad\text{(elementwise)}, \qquad
              d = \sum_i \alpha_i g_i,

    (the paper's ``G^T G alpha = 1 / alpha`` with the gradients as columns), i.e.
    ``<g_i, d> = 1 / alpha_i``: every task's share of the improvement is inversely proportional
    to its weight. Solved by damped Newton steps on the strictly convex
    ``alpha^T M alpha / 2 - sum_i log alpha_i`` (``gram_weights.fair_weights`` with
    ``alpha = 1``): a torch solver on the device, in place of the paper's sequence of convex
    programs (cvxpy), without a host synchronisation on CUDA (on a CPU it stops once
    converged); the residual of the condition is below 1e-8 relative on full-rank problems
    (2e-6 on a K = 64 Gram of rank 4 plus noise). The paper's code re-solves every few steps and
    clips the update's norm; here every step is solved and nothing is clipped (pair it with
    ``torch.nn.utils.clip_grad_norm_`` if wanted). A task whose gradient is zero gets weight 0.
    Arguments: those of every Gram method (``GramBalancer``).

    Example:
        >>> import torch
        >>> from fused_mtl import NashMTL
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> nash = NashMTL(trunk.parameters(), 2)
        >>> out = heads(torch.relu(trunk(torch.randn(16, 4))))
        >>> _ = nash.backward([out[:, 0].square().mean(), out[:, 1].mean()])
        >>> weights = nash.weights.double()  # the Gram is float64, the weights float32
        >>> residual = nash.gram @ weights - 1 / weights
        >>> bool((residual.abs() <= 1e-4 / weights).all())
        True
    """

    def _gram_weights(self, gram: Tensor) -> Tensor:
        return gram_weights.fair_weights(gram, 1.0)
