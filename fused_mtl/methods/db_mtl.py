"""``DBMTL``: dual-balancing multi-task learning (Lin et al., 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fused_mtl._distributed import ProcessGroup
from fused_mtl._losses import check_losses, raise_if_below
from fused_mtl.balancer import GradientBalancer, LossArgs, check_number
from fused_mtl.ops.backend import Backend
from fused_mtl.ops.task_gradients import SharedParameters
from fused_mtl.reference import compute_dtype, stochastic
from fused_mtl.reference.stochastic import DB_MTL_EPSILON


class DBMTL(GradientBalancer):
    r"""Balance the losses' scales by their logarithms, then the gradients' magnitudes by
    rescaling each to the largest.

    Loss-scale balancing: every task trains ``log(L_i + eps)``, whose gradient ``g_i / (L_i +
    eps)`` no longer depends on the loss's units. Gradient-magnitude balancing: each task's
    log-loss gradient is tracked by a moving average ``y_i``, and the shared update gives
    every task the largest task's magnitude,

    .. math:: y_i \leftarrow \beta_t\, y_i + (1 - \beta_t)\, \frac{g_i}{L_i + \epsilon},
              \qquad d = \max_j \|y_j\| \sum_i \frac{y_i}{\|y_i\|},

    with ``beta_t = beta / t^{beta_sigma}`` at step ``t`` and ``y`` starting at 0
    (``stochastic.db_mtl_update``). ``d`` is not a combination of this step's gradients: the
    call holds the K per-task gradients and ``y`` (``tracked_gradients``, K x P, with the step
    count, saved in ``state_dict``). The task-specific parameters get the log-losses'
    gradients, ``weights`` are ``1 / (L_i + eps)``, and the total's value is ``sum_i log(L_i +
    eps)``. Under ``torch.distributed`` the per-task gradients and losses are averaged over
    the ranks (one ``all_reduce`` of K x P numbers per step); FSDP2-sharded parameters are not
    supported. The losses must be positive (``eps = 1e-8``, the authors'); the log-losses'
    gradients grow as ``1 / L``, so half-precision gradients of losses below 1e-4 overflow. An
    eval-mode call (a report) returns the same sum of log-losses.

    Args:
        shared_parameters: the parameters whose per-task gradients are balanced.
        num_tasks: K (may be omitted when ``tasks`` is given).
        beta: the moving average's weight of the past, in [0, 1) (default 0.9).
        beta_sigma: the decay exponent of ``beta_t`` (default 0.5: ``beta_t = 0.9 /
            sqrt(t)``, the best of the paper's ablation on Office-31; LibMTL's default is 0,
            a constant 0.9, the worst there).
        check_finite: raise naming the task on a NaN, infinite or negative loss (a host read
            per call).
        tasks: task names; enables calling with a dict and names tasks in errors.
        backend: accepted so that every method is constructed alike.
        per_task_gradients: ``"auto"``, ``"batched"`` or ``"loop"`` (see ``TaskGradients``).
        sync: under ``torch.distributed``, average the per-task gradients over the ranks.
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import DBMTL
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> db_mtl = DBMTL(trunk.parameters(), 2)
        >>> out = heads(torch.relu(trunk(torch.randn(16, 4))))
        >>> losses = [out[:, 0].square().mean(), 100 * out[:, 1].square().mean()]
        >>> _ = db_mtl.backward(losses)
        >>> torch.allclose(db_mtl.weights, 1 / torch.stack(losses).detach())
        True
    """

    _gram_only = False  # it combines the tracked gradients themselves

    tracked_gradients: Tensor
    steps: Tensor
    weights: Tensor

    def __init__(
        self,
        shared_parameters: SharedParameters | None = None,
        num_tasks: int | None = None,
        *,
        beta: float = 0.9,
        beta_sigma: float = 0.5,
        check_finite: bool = False,
        tasks: Sequence[str] | None = None,
        backend: Backend = "auto",
        per_task_gradients: str = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        self.beta = check_number("DBMTL", "beta", beta, low=0.0, high=1.0)
        if self.beta == 1.0:
            raise ValueError("DBMTL: beta must be a number in [0.0, 1.0), got 1.0")
        self.beta_sigma = check_number("DBMTL", "beta_sigma", beta_sigma, low=0.0, high=1e3)
        self.check_finite = bool(check_finite)
        super().__init__(
            shared_parameters, num_tasks, tasks, backend, per_task_gradients, sync, process_group
        )
        if self._sharded:
            raise NotImplementedError(
                "DBMTL: FSDP2-sharded shared parameters are not supported (it tracks the whole "
                "K x P gradients); use DDP, or a Gram method"
            )
        options = self._state_options()
        size = sum(parameter.numel() for parameter in self._shared)
        self.register_buffer("tracked_gradients", torch.zeros(self.num_tasks, size, **options))
        # float64: a float16 count stops at 2048, a bfloat16 one at 256.
        self.register_buffer(
            "steps", torch.zeros((), dtype=torch.float64, device=options.get("device"))
        )
        self.register_buffer("weights", torch.ones(self.num_tasks, **options), persistent=False)

    def forward(self, *losses: LossArgs) -> Tensor:
        """``sum_i log(L_i + eps)`` in value; its backward gives the heads the log-losses'
        gradients and the shared parameters ``d``."""
        if not self._updates():  # a report: the same quantity, the sum of the log-losses
            stacked, _ = check_losses(
                losses,
                num_tasks=self.num_tasks,
                names=self.tasks,
                reduction=None,
                device=self.weights.device,
            )
            return _sum_of_logs(stacked)
        return self._update_step(losses, self._balanced_update, _sum_of_logs, uses_losses=True)

    def _balanced_update(self, matrix: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        if self.check_finite:
            raise_if_below(
                "DBMTL", losses, -DB_MTL_EPSILON, self.tasks, "DB-MTL takes log(L + 1e-8)"
            )
        steps = self.steps + 1
        weights = 1 / (losses.to(matrix.dtype) + DB_MTL_EPSILON)
        past = (self.beta / steps**self.beta_sigma).to(matrix.dtype)
        tracked = stochastic.moco_tracking(
            self.tracked_gradients, weights[:, None] * matrix, 1 - past
        )
        self.tracked_gradients, self.steps = tracked, steps
        return weights, stochastic.db_mtl_update(tracked)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}, beta_sigma={self.beta_sigma}"


def _sum_of_logs(losses: Tensor) -> Tensor:
    # At least float32: 1e-8 is 0 in float16, whose log of a zero loss would be -inf.
    return torch.log(losses.to(compute_dtype(losses.dtype)) + DB_MTL_EPSILON).sum()
