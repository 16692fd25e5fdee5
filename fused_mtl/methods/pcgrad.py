"""``PCGrad``: gradient surgery (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

from torch import Tensor

from fused_mtl.balancer import GramBalancer
from fused_mtl.reference import gram_weights


class PCGrad(GramBalancer):
    r"""Project each task gradient off the others it conflicts with, then sum.

    Each step draws, for every task i, a random order of the other tasks (torch's RNG, so
    ``torch.manual_seed`` reproduces it; the first rank's draw under ``torch.distributed``).
    Starting from ``g_i^PC = g_i``, for each j in that order with a conflict
    (``<g_i^PC, g_j> < 0``), the component along the original ``g_j`` is removed:

    .. math:: g_i^{PC} \leftarrow g_i^{PC} - \frac{\langle g_i^{PC}, g_j\rangle}{\|g_j\|^2} g_j,
              \qquad d = \sum_i g_i^{PC} \quad\text{(the sum, as in the paper)}.

    Only inner products enter, so it runs on the Gram matrix (``gram_weights.pcgrad_weights``);
    ``d = sum_i w_i g_i`` and the total is ``sum_i w_i L_i``. ``weights`` are the ``w`` of the
    last step (1 before the first; all 1 when nothing conflicts). Arguments: those of every Gram
    method (``GramBalancer``).

    Example:
        >>> import torch
        >>> from fused_mtl import PCGrad
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> pcgrad = PCGrad(trunk.parameters(), 2)
        >>> out = heads(torch.relu(trunk(torch.randn(16, 4))))
        >>> pcgrad.backward([out[:, 0].square().mean(), out[:, 1].mean()]).shape
        torch.Size([])
    """

    _update_is_sum = True

    def _gram_weights(self, gram: Tensor) -> Tensor:
        orders = gram_weights.projection_orders(self.num_tasks, gram.device)
        return gram_weights.pcgrad_weights(gram, self._shared_random(orders))
