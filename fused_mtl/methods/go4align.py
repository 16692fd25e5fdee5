"""``GO4Align``: group optimisation for multi-task alignment (Shen et al., NeurIPS 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fused_mtl._distributed import ProcessGroup
from fused_mtl._losses import Reduction
from fused_mtl.balancer import LossObjective, check_count, check_number, weighted_sum
from fused_mtl.ops.backend import Backend
from fused_mtl.reference import compute_dtype, loss_weights


class GO4Align(LossObjective):
    r"""Group the tasks by how far each is from its share of the progress, and give every task
    of a group the group's weight.

    Each step, a risk-guided indicator per task combines a scale balance (a task whose loss is
    below the mean is raised) and a smooth alignment over time (a softmax of minus the
    cumulative losses, which lowers the tasks that stay high):

    .. math:: p_i = \frac{\operatorname{mean}(L)}{L_i}, \qquad
              q \leftarrow \frac{q \odot e^{-\beta L}}{\sum_j q_j e^{-\beta L_j}}, \qquad
              \gamma = p \odot q,

    from ``q = 1 / K``. The indicators are clustered into ``groups`` groups (K-means in one
    dimension, Eqs. 3-4) and each task's weight is its group's centre, a constant of the
    step: ``sum_i w_i L_i``. The clustering here is exact (dynamic programming over the sorted
    indicators, ``loss_weights.group_centroids``); the authors' code runs K-means from a
    random start, and scales ``p`` by the sum instead of the mean (every weight K times
    larger). ``groups >= K`` weights each task by its own indicator. ``q`` (``alignment``) is
    saved in ``state_dict``; ``weights`` are those of the last training call (``1 / K``
    before). The losses must be positive (``p_i`` is unbounded as ``L_i -> 0``: a loss below
    ``eps`` times the mean counts as that).

    Args:
        num_tasks: number of tasks K (may be omitted when ``tasks`` is given).
        tasks: task names; enables calling with a dict and names tasks in errors.
        groups: the number of groups (default 2, the paper's for NYU-v2's 3 tasks).
        beta: the alignment's temperature, >= 0 (default 1e-4, the authors' code's).
        reduction: ``None`` requires scalar losses; ``"mean"`` / ``"sum"`` reduce each loss.
        backend: accepted so that every method is constructed alike (no kernel).
        sync: under ``torch.distributed``, weight with the losses averaged over the ranks (one
            ``all_reduce`` of K numbers), so that every rank has the same weights and state.
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import GO4Align
        >>> go4align = GO4Align(tasks=["depth", "seg", "normals"], groups=2)
        >>> total = go4align(torch.tensor([1.0, 1.1, 4.0]))
        >>> go4align.weights  # two groups: depth and seg together, normals apart
        tensor([0.6470, 0.6470, 0.1694])
    """

    alignment: Tensor
    weights: Tensor

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        tasks: Sequence[str] | None = None,
        groups: int = 2,
        beta: float = 1e-4,
        reduction: Reduction = None,
        backend: Backend = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        clusters = check_count("GO4Align", "groups", groups, low=1)
        temperature = check_number("GO4Align", "beta", beta, low=0.0, high=1e6)
        super().__init__(num_tasks, tasks, reduction, backend, sync, process_group)
        self.groups, self.beta = clusters, temperature
        num = self.num_tasks
        self.register_buffer("alignment", torch.full((num,), 1 / num, dtype=torch.float64))
        self.register_buffer("weights", torch.full((num,), 1 / num), persistent=False)

    def _objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        if not self._updates():
            return weighted_sum(self.weights, losses), self.weights
        indicators, alignment = loss_weights.risk_guided_indicators(
            losses.double(), self.alignment, self.beta
        )
        weights = loss_weights.group_centroids(indicators, self.groups)
        weights = weights.to(compute_dtype(losses.dtype))
        # A step with a non-finite loss (its total is not finite either) leaves q as it was.
        self.alignment = torch.where(torch.isfinite(losses).all(), alignment, self.alignment)
        return weighted_sum(weights, losses), weights

    def _checkpoint_faults(self, tensors: dict[str, Any]) -> list[str]:
        saved = tensors.get("alignment")
        shaped = isinstance(saved, Tensor) and saved.shape == (self.num_tasks,)
        if shaped and not float(saved.detach().double().sum()) > 0:
            return ["alignment sums to 0; GO4Align's alignment is a distribution"]
        return self._value_faults(
            "alignment",
            tensors.get("alignment"),
            "GO4Align's alignment is a distribution (in [0, 1])",
            lambda value: 0 <= value <= 1,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}, beta={self.beta}"
