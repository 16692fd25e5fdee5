"""``CAGrad``: conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fused_mtl.balancer import GramBalancer, check_number
from fused_mtl.ops.task_gradients import SharedParameters
from fused_mtl.reference import gram_weights


class CAGrad(GramBalancer):
    r"""The update near the mean gradient that most improves the worst task.

    CAGrad maximises ``min_i <g_i, d>`` over the ball ``||d - g_0|| <= c ||g_0||`` around the
    mean gradient ``g_0``. Its dual gives, with ``phi = c^2 ||g_0||^2`` and ``g_w = sum_i w_i
    g_i``,

    .. math:: w^* = \arg\min_{w \in \Delta} \langle g_w, g_0\rangle + \sqrt{\phi}\,\|g_w\|,
              \qquad d = g_0 + \frac{\sqrt{\phi}}{\|g_{w^*}\|} g_{w^*},

    the paper's update (without the optional ``1 / (1 + c^2)`` rescaling of the authors' code),
    a combination ``d = sum_i w'_i g_i`` whose weights ``weights`` holds. ``||d - g_0||`` is
    exactly ``c ||g_0||``. ``c = 0`` is the plain mean. The inner problem is solved exactly by
    enumerating the faces of the simplex up to 10 tasks (a closed form per face), by
    Frank-Wolfe steps and the same closed form beyond (``gram_weights.cagrad_weights``).

    Args:
        c: the radius of the ball relative to ``||g_0||``, in [0, 1) per the paper's analysis
            (default 0.4, the paper's value on NYU-v2 and CityScapes).
        options: the arguments of every Gram method (``GramBalancer``).

    Example:
        >>> import torch
        >>> from fused_mtl import CAGrad
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> cagrad = CAGrad(trunk.parameters(), 2, c=0.5)
        >>> out = heads(torch.relu(trunk(torch.randn(16, 4))))
        >>> cagrad.backward([out[:, 0].square().mean(), out[:, 1].mean()]).shape
        torch.Size([])
    """

    def __init__(
        self,
        shared_parameters: SharedParameters | None = None,
        num_tasks: int | None = None,
        *,
        c: float = 0.4,
        **options: Any,
    ) -> None:
        value = check_number("CAGrad", "c", c, low=0.0)
        super().__init__(shared_parameters, num_tasks, **options)
        self.c = value

    def _gram_weights(self, gram: Tensor) -> Tensor:
        return gram_weights.cagrad_weights(gram, self.c)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, c={self.c}"
