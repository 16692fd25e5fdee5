"""``NTKMTL``: balancing the tasks' neural tangent kernels (Qin et al., NeurIPS 2025)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fused_mtl.balancer import (
    GramBalancer,
    LossArgs,
    check_count,
    check_grad_enabled,
    check_number,
    weighted_sum,
)
from fused_mtl.ops.task_gradients import SharedParameters, TaskGradients
from fused_mtl.reference import compute_dtype, gram_weights


class NTKMTL(GramBalancer):
    r"""Weight each task so that its neural tangent kernel's largest eigenvalue matches the
    others': the tasks then converge at one speed.

    Under gradient descent a task's training error decays along the eigenvectors of its NTK
    ``K_ii = J_i J_i^T`` (``J_i``: the Jacobian of its loss over the batch's parts), fastest
    along the largest eigenvalue ``lambda_i``; weighting the task by ``w_i`` scales its kernel
    by ``w_i^2``. NTKMTL equalises ``w_i^2 lambda_i`` around the mean (Eq. 15):

    .. math:: w_i = \Big(\frac{\bar\lambda}{\lambda_i}\Big)^{p}, \qquad
              \bar\lambda = \frac{1}{K}\sum_j \lambda_j, \qquad d = \sum_i w_i g_i,

    with ``p = 1/2`` (``exponent``; the authors' NYU-v2 script uses 0.75). With the batch as
    one part (the paper's NTKMTL, ``n = 1``) the kernel is the number ``lambda_i = ||g_i||^2``,
    the Gram's diagonal: one batched backward over the shared parameters
    (``gram_weights.ntk_weights``). NTKMTL-SR (``ntkmtl(losses, features=z)``, the paper's
    Algorithm 2) takes the kernel of the gradients with respect to the shared representation
    ``z`` (first dimension: the batch) over ``chunks`` parts of the batch instead: K backward
    passes through the heads only, then the usual backward of ``sum_i w_i L_i``. Its parts'
    gradients touch disjoint rows of ``z``, so the kernel is diagonal and ``lambda_i`` is the
    largest part's ``||d l_i^(u) / dz||^2`` (``gram_weights.representation_ntk_eigenvalues``;
    the losses must be means over the batch; under ``torch.distributed`` each rank splits its
    own batch and the largest eigenvalue over every rank's parts is taken, one ``all_reduce``
    of K numbers). A task without gradient gets weight 0.
    ``weights`` are ``w``. The paper's weights average to about 1 where the authors' code
    multiplies them by ``sqrt(K)`` (a sum instead of a mean) and the update by K, then clips
    its norm to 1: here the update is the paper's.

    Args:
        exponent: ``p`` (default 0.5, the paper's).
        chunks: NTKMTL-SR's number of parts of the batch (default 4, the paper's).
        options: the arguments of every Gram method (``GramBalancer``).

    Example:
        >>> import torch
        >>> from fused_mtl import NTKMTL
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> ntkmtl = NTKMTL(trunk.parameters(), 2)
        >>> out = heads(torch.relu(trunk(torch.randn(16, 4))))
        >>> loss = out[:, 0].square().mean()
        >>> _ = ntkmtl.backward([loss, 100 * loss])  # the same task, 100 times larger
        >>> round(float(ntkmtl.weights[0] / ntkmtl.weights[1]), 3)
        100.0
    """

    def __init__(
        self,
        shared_parameters: SharedParameters | None = None,
        num_tasks: int | None = None,
        *,
        exponent: float = 0.5,
        chunks: int = 4,
        **options: Any,
    ) -> None:
        power = check_number("NTKMTL", "exponent", exponent, low=0.0, high=10.0)
        parts = check_count("NTKMTL", "chunks", chunks, low=1)
        super().__init__(shared_parameters, num_tasks, **options)
        self.exponent, self.chunks = power, parts
        mode = options.get("per_task_gradients", "auto")
        self._feature_gradients = TaskGradients(
            [], ["features"], "auto" if mode == "layers" else mode
        )

    def _gram_weights(self, gram: Tensor) -> Tensor:
        return gram_weights.ntk_weights(gram.diagonal(), self.exponent)

    def forward(self, *losses: LossArgs, features: Tensor | None = None) -> Tensor:
        """One step; ``features=z`` for NTKMTL-SR. Returns ``sum_i w_i L_i``."""
        if features is None:
            return super().forward(*losses)
        reported = self._reported_total(losses, self.weights.device)
        if reported is not None:
            return reported
        stacked, separate = self._graph_losses(losses, self._check_features(features))
        syncing = self._syncing()
        agree = self._sync.smallest if syncing else None
        (grads,) = self._feature_gradients(stacked, self.tasks, separate, [features], agree)
        eigenvalues = gram_weights.representation_ntk_eigenvalues(grads.detach(), self.chunks)
        if syncing:  # the largest part of the whole batch's
            eigenvalues = -self._sync.smallest(-eigenvalues)
        weights = gram_weights.ntk_weights(eigenvalues, self.exponent)
        self.weights = weights.to(compute_dtype(stacked.dtype))
        return weighted_sum(self.weights, stacked)

    def backward(self, *losses: LossArgs, features: Tensor | None = None) -> Tensor:
        """``total = self(*losses, features=features)``, then ``total.backward()``; returns the
        total, detached."""
        check_grad_enabled(self)
        total = self(*losses, features=features)
        total.backward()
        return total.detach()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, exponent={self.exponent}, chunks={self.chunks}"
