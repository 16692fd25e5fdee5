"""``Krum``: the Byzantine-robust choice of gradient (Blanchard et al., NeurIPS 2017)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fused_mtl.balancer import GramBalancer, check_count
from fused_mtl.ops.task_gradients import SharedParameters
from fused_mtl.reference import gram_weights


class Krum(GramBalancer):
    r"""Follow the task gradient (or the mean of the ``m`` gradients) closest to its neighbours.

    Krum was written for distributed training with up to ``f`` adversarial workers; here the
    "workers" are the tasks, and an outlying task gradient (a task whose labels went wrong, a
    loss that exploded) is left out of the step. Each gradient's score is the sum of its
    squared distances to its ``K - f - 2`` nearest other gradients,

    .. math:: s(i) = \sum_{j \in N_i} \|g_i - g_j\|^2, \qquad
              d = \frac{1}{m} \sum_{i \in S} g_i,

    with ``S`` the ``m`` gradients of lowest score (``m = 1``: Krum; ``m > 1``: Multi-Krum).
    Distances are inner products, ``||g_i - g_j||^2 = M_ii + M_jj - 2 M_ij``, so it runs on
    the Gram matrix (``gram_weights.krum_weights``); ``weights`` are ``1 / m`` for the chosen
    tasks and 0 for the others, and ties go to the lower task index. The paper's guarantee
    needs ``K > 2f + 2``; the score is defined for ``K >= f + 3``, which is checked here. The
    score sums squared distances, as in the paper (TorchJD's ``Krum`` sums the distances).

    Args:
        byzantine: ``f``, the number of task gradients that may be outliers (default 0).
        selected: ``m``, how many gradients are averaged (default 1, the paper's Krum).
        options: the arguments of every Gram method (``GramBalancer``).

    Example:
        >>> import torch
        >>> from fused_mtl import Krum
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)
        >>> krum = Krum(trunk.parameters(), 3)
        >>> out = heads(torch.relu(trunk(torch.randn(16, 4))))
        >>> _ = krum.backward([out[:, 0].square().mean(), out[:, 1].mean(), out[:, 2].mean()])
        >>> sorted(krum.weights.tolist())  # one task's gradient is the step
        [0.0, 0.0, 1.0]
    """

    def __init__(
        self,
        shared_parameters: SharedParameters | None = None,
        num_tasks: int | None = None,
        *,
        byzantine: int = 0,
        selected: int = 1,
        **options: Any,
    ) -> None:
        outliers = check_count("Krum", "byzantine", byzantine, low=0)
        chosen = check_count("Krum", "selected", selected, low=1)
        super().__init__(shared_parameters, num_tasks, **options)
        if self.num_tasks < outliers + 3:
            raise ValueError(
                f"Krum: byzantine={outliers} needs at least {outliers + 3} tasks (each score "
                f"sums the distances to K - byzantine - 2 others), got {self.num_tasks}"
            )
        if chosen > self.num_tasks:
            raise ValueError(f"Krum: selected={chosen} is more than the {self.num_tasks} tasks")
        self.byzantine, self.selected = outliers, chosen

    def _gram_weights(self, gram: Tensor) -> Tensor:
        return gram_weights.krum_weights(gram, self.byzantine, self.selected)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, byzantine={self.byzantine}, selected={self.selected}"
