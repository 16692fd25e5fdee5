"""``EqualWeighting``: the plain sum of the task losses, the baseline of every comparison."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fused_mtl._distributed import ProcessGroup
from fused_mtl._losses import Reduction
from fused_mtl.balancer import LossWeighting
from fused_mtl.ops.backend import Backend


class EqualWeighting(LossWeighting):
    r"""The total :math:`\sum_i L_i`, with the interface of the balancing methods.

    Use it as the baseline a balancing method has to beat: the training loop stays the same
    when the constructor changes.

    Args:
        num_tasks: number of tasks K (may be omitted when ``tasks`` is given).
        tasks: task names; enables calling with a dict and names tasks in errors.
        reduction: ``None`` requires scalar losses; ``"mean"`` / ``"sum"`` reduce each loss.
        backend: accepted so that every method is constructed alike; a sum has no kernel.
        sync: accepted so that every method is constructed alike; the weights are constant
            and nothing is communicated.
        process_group: accepted likewise.

    Example:
        >>> import torch
        >>> from fused_mtl import EqualWeighting
        >>> equal = EqualWeighting(tasks=["depth", "seg"])
        >>> equal({"depth": torch.tensor(2.0), "seg": torch.tensor(0.5)})
        tensor(2.5000)
        >>> equal.weights
        tensor([1., 1.])
    """

    weights: Tensor

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        tasks: Sequence[str] | None = None,
        reduction: Reduction = None,
        backend: Backend = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_tasks, tasks, reduction, backend, sync, process_group)
        # Not state: a checkpoint of equal weighting is empty.
        self.register_buffer("weights", torch.ones(self.num_tasks), persistent=False)
