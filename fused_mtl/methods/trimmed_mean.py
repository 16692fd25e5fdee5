"""``TrimmedMean``: the coordinate-wise trimmed mean of the task gradients (Yin et al., ICML
2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fused_mtl._distributed import ProcessGroup
from fused_mtl.balancer import GradientBalancer, LossArgs, check_count
from fused_mtl.ops.backend import Backend
from fused_mtl.ops.task_gradients import SharedParameters
from fused_mtl.reference import gram_weights


class TrimmedMean(GradientBalancer):
    r"""Average the task gradients coordinate by coordinate, without the extreme values.

    At every coordinate of the shared parameters, the ``b`` largest and the ``b`` smallest of
    the K task gradients' values are dropped and the other ``K - 2b`` averaged:

    .. math:: d_p = \frac{1}{K - 2b} \sum_{k = b + 1}^{K - b} g_{(k), p},

    with ``g_(1),p <= ... <= g_(K),p`` the values at coordinate ``p`` in order. Written for
    distributed training with adversarial workers, it keeps one task whose gradient is far
    off (in a few coordinates or in all) from steering the shared parameters. ``b = 0`` is the
    plain mean. ``d`` is not a weighted sum of the task gradients, so the call holds the K
    per-task gradients; the total is their mean ``sum_i L_i / K`` (each task-specific
    parameter gets ``grad L_i / K``, ``weights`` is ``1 / K``), whose backward puts ``d`` into
    the shared parameters' gradient. Under ``torch.distributed`` the per-task gradients are
    averaged over the ranks first (one ``all_reduce`` of K x P numbers), so every rank trims
    the whole batch's gradients; FSDP2-sharded parameters are not supported.

    Args:
        shared_parameters: the parameters whose per-task gradients are combined.
        num_tasks: K (may be omitted when ``tasks`` is given), at least ``2b + 1``.
        trim: ``b``, how many values are dropped at each end (default 1).
        tasks: task names; enables calling with a dict and names tasks in errors.
        backend: accepted so that every method is constructed alike.
        per_task_gradients: ``"auto"``, ``"batched"`` or ``"loop"`` (see ``TaskGradients``).
        sync: under ``torch.distributed``, average the per-task gradients over the ranks.
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import TrimmedMean
        >>> shared = torch.nn.Parameter(torch.zeros(2))
        >>> trimmed = TrimmedMean([shared], 3)
        >>> losses = [shared @ torch.tensor(g) for g in ([1.0, 0.0], [2.0, 5.0], [40.0, 1.0])]
        >>> _ = trimmed.backward(losses)
        >>> shared.grad  # the median of each coordinate: 2 of (1, 2, 40), 1 of (0, 5, 1)
        tensor([2.0000, 1.0000])
    """

    _gram_only = False  # it combines the per-task gradients themselves

    weights: Tensor

    def __init__(
        self,
        shared_parameters: SharedParameters | None = None,
        num_tasks: int | None = None,
        *,
        trim: int = 1,
        tasks: Sequence[str] | None = None,
        backend: Backend = "auto",
        per_task_gradients: str = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        dropped = check_count("TrimmedMean", "trim", trim, low=0)
        super().__init__(
            shared_parameters, num_tasks, tasks, backend, per_task_gradients, sync, process_group
        )
        if self.num_tasks < 2 * dropped + 1:
            raise ValueError(
                f"TrimmedMean: trim={dropped} drops {2 * dropped} of each coordinate's values "
                f"and needs at least {2 * dropped + 1} tasks, got {self.num_tasks}"
            )
        if self._sharded:
            raise NotImplementedError(
                "TrimmedMean: FSDP2-sharded shared parameters are not supported (its update is "
                "per coordinate of the whole gradients); use DDP, or a Gram method"
            )
        self.trim = dropped
        options = self._state_options()
        self.register_buffer(
            "weights",
            torch.full((self.num_tasks,), 1 / self.num_tasks, **options),
            persistent=False,
        )

    def forward(self, *losses: LossArgs) -> Tensor:
        """The mean of the losses, whose backward gives the shared parameters ``d``."""
        reported = self._reported_total(losses, self.weights.device)
        if reported is not None:
            return reported
        return self._update_step(losses, self._trimmed_update)

    def _trimmed_update(self, matrix: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        return self.weights, gram_weights.trimmed_mean_update(matrix, self.trim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, trim={self.trim}"
