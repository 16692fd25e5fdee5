"""``ConFIG``: the conflict-free direction of equal cosines (Liu et al., ICLR 2025)."""

from __future__ import annotations

from torch import Tensor

from fused_mtl.balancer import GramBalancer
from fused_mtl.reference import gram_weights


class ConFIG(GramBalancer):
    r"""The direction at equal angles to every task gradient, as long as their projections.

    With the unit gradients ``u_i`` as the rows of ``U`` (``U^+`` its pseudo-inverse),

    .. math:: g_u = U^+ \mathbf 1, \qquad \hat g_u = g_u / \|g_u\|, \qquad
              d = \Big(\sum_i \langle g_i, \hat g_u\rangle\Big) \hat g_u,

    so ``<u_i, d>`` is the same positive number for every task (for linearly independent
    gradients). In the span of the gradients ``g_u = U^T C^+ 1``, with ``C`` the cosine
    matrix (``gram_weights.config_weights``). ``torch.linalg.eigh`` (the pseudo-inverse) checks
    its result on the host: one synchronisation per step on CUDA. Arguments: those of every
    Gram method (``GramBalancer``).

    Example:
        >>> import torch
        >>> from fused_mtl import ConFIG
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> config = ConFIG(trunk.parameters(), 2)
        >>> out = heads(torch.relu(trunk(torch.randn(16, 4))))
        >>> config.backward([out[:, 0].square().mean(), out[:, 1].mean()]).shape
        torch.Size([])
    """

    def _gram_weights(self, gram: Tensor) -> Tensor:
        return gram_weights.config_weights(gram)
