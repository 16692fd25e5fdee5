"""``AlignedMTL``: independent component alignment (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

from torch import Tensor

from fused_mtl.balancer import GramBalancer
from fused_mtl.reference import gram_weights


class AlignedMTL(GramBalancer):
    r"""Align the task gradients into orthogonal components of one length, then average.

    With ``G`` the K x P matrix of task gradients and its SVD ``G = V Σ W^T``, Aligned-MTL
    replaces ``G`` by ``Ĝ = σ_min V W^T``: the same singular directions, every singular value
    set to the smallest, so the aligned gradients are orthogonal and of equal length (the
    condition number of the system is 1). The update is their sum (as in the authors' code; the
    paper's task weights ``ω`` are all 1),

    .. math:: d = \hat G^\top \mathbf 1 = \sum_i w_i g_i, \qquad
              w = \sigma_{\min} V \Sigma^{-1} V^\top \mathbf 1,

    from the eigendecomposition of the Gram matrix ``M = V Σ^2 V^T``
    (``gram_weights.aligned_mtl_weights``). Linearly dependent gradients (zero singular values)
    are left out of the alignment. ``torch.linalg.eigh`` checks its result on the host: one
    synchronisation per step on CUDA. Arguments: those of every Gram method (``GramBalancer``).

    Example:
        >>> import torch
        >>> from fused_mtl import AlignedMTL
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> aligned = AlignedMTL(trunk.parameters(), 2)
        >>> out = heads(torch.relu(trunk(torch.randn(16, 4))))
        >>> aligned.backward([out[:, 0].square().mean(), out[:, 1].mean()]).shape
        torch.Size([])
    """

    _update_is_sum = True

    def _gram_weights(self, gram: Tensor) -> Tensor:
        return gram_weights.aligned_mtl_weights(gram)
