"""``GradDrop``: gradient sign dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fused_mtl.balancer import (
    GradientBalancer,
    LossArgs,
    check_number,
    weighted_sum,
    with_parameter_gradient,
)
from fused_mtl.ops.backend import Backend
from fused_mtl.ops.task_gradients import SharedParameters
from fused_mtl.reference import gram_weights


class GradDrop(GradientBalancer):
    r"""Keep, at every coordinate, the task gradients of one sign, chosen at random by how much
    the tasks agree there.

    Per coordinate of the shared parameters, with the task gradients ``g_i`` there, the sign
    purity ``P = (1 + sum_i g_i / sum_i |g_i|) / 2`` and one uniform draw ``U`` (torch's RNG):
    the positive gradients are kept when ``P > U``, the negative ones when ``P < U``, and

    .. math:: d = \sum_i \big(\ell + (1 - \ell)\, m_i\big)\, g_i,
              \qquad m_i = \mathbb{1}(P > U)\,\mathbb{1}(g_i > 0)
              + \mathbb{1}(P < U)\,\mathbb{1}(g_i < 0),

    with the leak ``ℓ`` (0: the paper's plain GradDrop). ``d`` is not a weighted sum of the task
    gradients, so it needs the gradients themselves, not their Gram matrix: the call holds the
    K per-task gradients of the shared parameters. The total is the plain sum ``sum_i L_i``
    (the task-specific parameters get ``grad L_i``), whose backward also adds ``d - sum_i g_i``
    to the shared parameters' gradient, so that their ``.grad`` is ``d``. ``weights`` is
    therefore all ones: the weight of each loss in the total, not a weighting of the shared
    update. The paper applies GradDrop to the gradient of a shared activation; here it applies
    to the shared parameters' gradients, per coordinate. Under ``torch.distributed`` each rank
    drops on its own gradients, with its own draws, and DDP averages the results: nothing is
    synced (the same draws on every rank would cost a broadcast of P numbers per step).

    Args:
        shared_parameters: the parameters whose per-task gradients are combined.
        num_tasks: K (may be omitted when ``tasks`` is given).
        leak: in [0, 1]; 1 keeps every gradient (the plain sum).
        tasks: task names; enables calling with a dict and names tasks in errors.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        per_task_gradients: ``"auto"``, ``"batched"`` or ``"loop"`` (see ``TaskGradients``).

    Example:
        >>> import torch
        >>> from fused_mtl import GradDrop
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> graddrop = GradDrop(trunk.parameters(), 2)
        >>> out = heads(torch.relu(trunk(torch.randn(16, 4))))
        >>> _ = graddrop.backward([out[:, 0].square().mean(), out[:, 1].mean()])
        >>> graddrop.weights
        tensor([1., 1.])
    """

    _gram_only = False  # it combines the per-task gradients themselves

    weights: Tensor

    def __init__(
        self,
        shared_parameters: SharedParameters | None = None,
        num_tasks: int | None = None,
        *,
        leak: float = 0.0,
        tasks: Sequence[str] | None = None,
        backend: Backend = "auto",
        per_task_gradients: str = "auto",
    ) -> None:
        rate = check_number("GradDrop", "leak", leak, low=0.0, high=1.0)
        super().__init__(
            shared_parameters, num_tasks, tasks, backend, per_task_gradients, sync=False
        )
        if self._sharded:
            raise NotImplementedError(
                "GradDrop: FSDP2-sharded shared parameters are not supported (its update is "
                "per coordinate of the whole gradients); use DDP, or a Gram method"
            )
        self.leak = rate
        device = self._shared[0].device if self._shared else None
        self.register_buffer("weights", torch.ones(self.num_tasks, device=device), persistent=False)

    def forward(self, *losses: LossArgs) -> Tensor:
        """The plain sum of the losses, whose backward gives the shared parameters ``d``."""
        reported = self._reported_total(losses, self.weights.device)
        if reported is not None:
            return reported
        stacked, separate = self._graph_losses(losses, self._shared_device())
        task_grads = self._task_gradients(stacked, self.tasks, separate)
        total = weighted_sum(self.weights, stacked)
        for parameter, grads in zip(self._shared, task_grads, strict=True):
            flat = grads.detach().reshape(grads.shape[0], -1)
            uniform = torch.rand(flat.shape[1], device=flat.device, dtype=torch.float32)
            update = gram_weights.graddrop_update(flat, uniform.to(flat.dtype), self.leak)
            correction = (update - flat.sum(dim=0)).reshape(parameter.shape)
            total = with_parameter_gradient(total, parameter, correction)
        return total

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, leak={self.leak}"
