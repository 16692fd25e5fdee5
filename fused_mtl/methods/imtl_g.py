"""``IMTLG``: the gradient part of impartial multi-task learning (Liu et al., ICLR 2021)."""

from __future__ import annotations

from torch import Tensor

from fused_mtl.balancer import GramBalancer
from fused_mtl.reference import gram_weights


class IMTLG(GramBalancer):
    r"""The combination of the task gradients whose projection on every task's unit gradient is
    the same.

    With ``u_i = g_i / ||g_i||``, IMTL-G finds ``d = sum_i alpha_i g_i``, ``sum_i alpha_i = 1``,
    with ``<d, u_1> = ... = <d, u_K>``: no task is favoured, whatever the gradients' scales.
    The paper's closed form, with ``D`` the rows ``g_1 - g_i`` and ``U`` the rows ``u_1 - u_i``:

    .. math:: \alpha_{2:K} = g_1 U^\top (D U^\top)^{-1}, \qquad
              \alpha_1 = 1 - \textstyle\sum_{i \ge 2} \alpha_i.

    Every product is a Gram entry (``gram_weights.imtl_g_weights``). The weights sum to 1 and
    may be negative; when ``D U^T`` is singular (two gradients of one direction, a zero one) the
    projections are equal for any weights of those tasks and the weights are uniform. The
    loss-scale part of IMTL is ``IMTLL``. Arguments: those of every Gram method
    (``GramBalancer``).

    Example:
        >>> import torch
        >>> from fused_mtl import IMTLG
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> imtl = IMTLG(trunk.parameters(), 2)
        >>> out = heads(torch.relu(trunk(torch.randn(16, 4))))
        >>> _ = imtl.backward([out[:, 0].square().mean(), out[:, 1].mean()])
        >>> round(float(imtl.weights.sum()), 6)
        1.0
    """

    def _gram_weights(self, gram: Tensor) -> Tensor:
        return gram_weights.imtl_g_weights(gram)
