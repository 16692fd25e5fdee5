"""``Krum``: the Byzantine-robust choice of gradient (Blanchard et al., NeurIPS 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fused_mtl._distributed import ProcessGroup
from fused_mtl.balancer import GradientBalancer, LossArgs, check_count
from fused_mtl.ops.backend import Backend
from fused_mtl.ops.gram import task_gram_or_norms
from fused_mtl.ops.task_gradients import SharedParameters
from fused_mtl.reference import gram_weights


class Krum(GradientBalancer):
    r"""Follow the task gradient (or the mean of the ``m`` gradients) closest to its neighbours.

    Krum was written for distributed training with up to ``f`` adversarial workers; here the
    "workers" are the tasks, and an outlying task gradient (a task whose labels went wrong, a
    loss that exploded) is left out of the shared parameters' step. Each gradient's score is
    the sum of its squared distances to its ``K - f - 2`` nearest other gradients,

    .. math:: s(i) = \sum_{j \in N_i} \|g_i - g_j\|^2, \qquad
              d = \frac{1}{m} \sum_{i \in S} g_i,

    with ``S`` the ``m`` gradients of lowest score (``m = 1``: Krum; ``m > 1``: Multi-Krum).
    Distances are inner products, ``||g_i - g_j||^2 = M_ii + M_jj - 2 M_ij``: the choice comes
    from the Gram matrix (``gram_weights.krum_weights``), ``selection`` holds it (``1 / m``
    for the chosen tasks, 0 for the others; ties go to the lower task index). The paper's
    workers hold the whole model; here only the shared parameters are aggregated: each task's
    own parameters get ``grad L_i / K`` (the total is the mean of the losses, ``weights`` is
    ``1 / K``), so that no head starves while its task sits out, and the total's backward puts
    ``d`` into the shared parameters' gradient. The call holds the K per-task gradients (one
    batched backward); under ``torch.distributed`` they are averaged over the ranks first
    (one ``all_reduce`` of K x P numbers); FSDP2-sharded parameters are not supported. The
    paper's guarantee needs ``K > 2f + 2``; the score is defined for ``K >= f + 3``, which is
    checked here. The score sums squared distances, as in the paper (TorchJD's sums the
    distances).

    Args:
        shared_parameters: the parameters whose per-task gradients are aggregated.
        num_tasks: K (may be omitted when ``tasks`` is given).
        byzantine: ``f``, the number of task gradients that may be outliers (default 0).
        selected: ``m``, how many gradients are averaged (default 1, the paper's Krum).
        tasks: task names; enables calling with a dict and names tasks in errors.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, for the Gram matrix.
        per_task_gradients: ``"auto"``, ``"batched"`` or ``"loop"`` (see ``TaskGradients``).
        sync: under ``torch.distributed``, average the per-task gradients over the ranks.
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import Krum
        >>> shared = torch.nn.Parameter(torch.zeros(2))
        >>> krum = Krum([shared], 4)
        >>> gradients = ([1.0, 0.0], [1.1, 0.1], [0.9, -0.1], [-30.0, 40.0])
        >>> _ = krum.backward([shared @ torch.tensor(g) for g in gradients])
        >>> krum.selection  # the gradient closest to the others; never the outlier
        tensor([1., 0., 0., 0.])
        >>> shared.grad
        tensor([1., 0.])
    """

    _gram_only = False  # the choice needs the Gram, the update the gradients themselves

    weights: Tensor
    selection: Tensor

    def __init__(
        self,
        shared_parameters: SharedParameters | None = None,
        num_tasks: int | None = None,
        *,
        byzantine: int = 0,
        selected: int = 1,
        tasks: Sequence[str] | None = None,
        backend: Backend = "auto",
        per_task_gradients: str = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        outliers = check_count("Krum", "byzantine", byzantine, low=0)
        chosen = check_count("Krum", "selected", selected, low=1)
        super().__init__(
            shared_parameters, num_tasks, tasks, backend, per_task_gradients, sync, process_group
        )
        if self.num_tasks < outliers + 3:
            raise ValueError(
                f"Krum: byzantine={outliers} needs at least {outliers + 3} tasks (each score "
                f"sums the distances to K - byzantine - 2 others), got {self.num_tasks}"
            )
        if chosen > self.num_tasks:
            raise ValueError(f"Krum: selected={chosen} is more than the {self.num_tasks} tasks")
        if self._sharded:
            raise NotImplementedError(
                "Krum: FSDP2-sharded shared parameters are not supported (its update is the "
                "chosen tasks' whole gradients); use DDP"
            )
        self.byzantine, self.selected = outliers, chosen
        options = self._state_options()
        num = self.num_tasks
        self.register_buffer("weights", torch.full((num,), 1 / num, **options), persistent=False)
        self.register_buffer("selection", torch.full((num,), 1 / num, **options), persistent=False)

    def forward(self, *losses: LossArgs) -> Tensor:
        """The mean of the losses, whose backward gives the shared parameters ``d``."""
        reported = self._reported_total(losses, self.weights.device)
        if reported is not None:
            return reported
        return self._update_step(losses, self._chosen_update)

    def _chosen_update(self, matrix: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        gram = task_gram_or_norms([matrix], False, self._requested_backend)
        selection = gram_weights.krum_weights(gram, self.byzantine, self.selected)
        self.selection = selection.to(self.selection.dtype)
        return self.weights, selection.to(matrix.dtype) @ matrix

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, byzantine={self.byzantine}, selected={self.selected}"
