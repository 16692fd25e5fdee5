"""``RandomWeighting``: random loss weighting, RLW (Lin et al., TMLR 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fused_mtl._distributed import ProcessGroup
from fused_mtl._losses import Reduction
from fused_mtl.balancer import LossObjective, weighted_sum
from fused_mtl.ops.backend import Backend
from fused_mtl.reference import loss_weights


class RandomWeighting(LossObjective):
    r"""Weight the losses with a fresh random draw at every training step.

    Each training call draws ``lambda ~ N(0, I_K)`` from torch's RNG on the losses' device
    (``torch.manual_seed`` reproduces it; the first rank's draw under ``torch.distributed``,
    one broadcast of K numbers) and returns

    .. math:: \sum_i w_i L_i, \qquad w = \mathrm{softmax}(\lambda),

    weights that sum to 1. Lin et al. find this random baseline as good as many learned
    weightings; it costs one draw of K numbers. Eval-mode calls and calls under
    ``torch.no_grad()`` (validation) reuse the last weights (``1 / K`` before the first
    training call) and draw nothing, so that the training run's stream of draws does not
    depend on how often it is validated.

    Args:
        num_tasks: number of tasks K (may be omitted when ``tasks`` is given).
        tasks: task names; enables calling with a dict and names tasks in errors.
        reduction: ``None`` requires scalar losses; ``"mean"`` / ``"sum"`` reduce each loss.
        backend: accepted so that every method is constructed alike (no kernel).
        sync: under ``torch.distributed``, use the first rank's draw on every rank.
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import RandomWeighting
        >>> rlw = RandomWeighting(tasks=["depth", "seg"])
        >>> _ = torch.manual_seed(0)
        >>> total = rlw(torch.tensor([2.0, 0.5]))
        >>> rlw.weights, rlw.weights.sum()
        (tensor([0.8623, 0.1377]), tensor(1.))
    """

    weights: Tensor
    # A weighted sum: each rank's own losses, and DDP's average of the gradients is the
    # whole batch's; only the draw is shared.
    _syncs_losses = False

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
        # The last draw: not state (a resumed run draws from its own RNG state).
        self.register_buffer(
            "weights", torch.full((self.num_tasks,), 1 / self.num_tasks), persistent=False
        )

    def _objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        weights = self.weights
        if self._updates():
            # Under step_with, _shared_random gives every micro-batch the step's first draw.
            draw = torch.randn(self.num_tasks, device=losses.device)
            weights = loss_weights.random_weights(self._shared_random(draw))
        return weighted_sum(weights, losses), weights
