"""``MoCo``: multi-objective gradient correction (Fernando et al., ICLR 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fused_mtl._distributed import ProcessGroup
from fused_mtl.balancer import GradientBalancer, LossArgs, check_number
from fused_mtl.ops.backend import Backend
from fused_mtl.ops.gram import task_gram_or_norms
from fused_mtl.ops.task_gradients import SharedParameters
from fused_mtl.reference import stochastic


class MoCo(GradientBalancer):
    r"""MGDA on tracked gradients, whose bias vanishes, with weights learned step by step.

    MGDA's weights, computed from stochastic gradients, are biased. MoCo tracks each task's
    gradient with a running average ``Y`` (K x P) and moves the weights ``lambda`` by one
    projected step per training step, with ``t`` the step number:

    .. math:: Y \leftarrow Y - \beta_t (Y - G), \qquad
              \lambda \leftarrow \Pi_\Delta\big(\lambda - \gamma_t (Y Y^\top + \rho I)
              \lambda\big), \qquad d = Y^\top \lambda,

    ``beta_t = beta / t^{beta_decay}``, ``gamma_t = gamma / t^{gamma_decay}``. ``d`` is not a
    combination of this step's gradients, so the call holds ``Y`` and sets the shared
    parameters' ``.grad`` to ``d``: the total is ``sum_i lambda_i L_i`` (each task-specific
    parameter gets ``lambda_i grad L_i``), and its backward adds ``d - sum_i lambda_i g_i``
    to the shared parameters' gradient. ``Y Y^T`` is the fused ``task_gram``.

    ``Y`` (``tracked_gradients``, K x P in the parameters' dtype), ``lambdas`` and the step
    count are buffers, saved in ``state_dict``: a resumed run continues bit-identically.
    ``weights`` are ``lambdas``. Under ``torch.distributed`` the task gradients are averaged
    over the ranks (one ``all_reduce`` of K x P numbers per step), so that every rank tracks
    the whole batch's; FSDP2-sharded parameters are not supported.

    Args:
        shared_parameters: the parameters whose per-task gradients are tracked.
        num_tasks: K (may be omitted when ``tasks`` is given).
        beta: the tracking rate, in (0, 1] (default 0.5; the defaults are LibMTL's, which
            also rescales each gradient to ``L_i g_i / ||g_i||`` and replaces the projection by
            a softmax; here the gradients are the raw ones, so ``gamma`` acts on the raw
            ``Y Y^T``: scale it with the squared gradient norms of your model).
        beta_decay: the tracking rate's decay exponent (default 0.5).
        gamma: the weights' step size (default 0.1).
        gamma_decay: the step size's decay exponent (default 0.5).
        rho: the L2 regularisation of ``lambda`` (default 0).
        tasks: task names; enables calling with a dict and names tasks in errors.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, for the fused ops.
        per_task_gradients: ``"auto"``, ``"batched"`` or ``"loop"`` (see ``TaskGradients``).
        sync: under ``torch.distributed``, average the per-task gradients over the ranks.
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import MoCo
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> moco = MoCo(trunk.parameters(), 2)
        >>> out = heads(torch.relu(trunk(torch.randn(16, 4))))
        >>> _ = moco.backward([out[:, 0].square().mean(), out[:, 1].mean()])
        >>> moco.tracked_gradients.shape  # K x (8 * 4 + 8)
        torch.Size([2, 40])
    """

    _gram_only = False  # it combines the per-task gradients themselves

    tracked_gradients: Tensor
    lambdas: Tensor
    steps: Tensor
    weights: Tensor

    def __init__(
        self,
        shared_parameters: SharedParameters | None = None,
        num_tasks: int | None = None,
        *,
        beta: float = 0.5,
        beta_decay: float = 0.5,
        gamma: float = 0.1,
        gamma_decay: float = 0.5,
        rho: float = 0.0,
        tasks: Sequence[str] | None = None,
        backend: Backend = "auto",
        per_task_gradients: str = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        self.beta = check_number("MoCo", "beta", beta, low=0.0, high=1.0, low_open=True)
        self.beta_decay = check_number("MoCo", "beta_decay", beta_decay, low=0.0, high=1e3)
        self.gamma = check_number("MoCo", "gamma", gamma, low=0.0, high=1e6, low_open=True)
        self.gamma_decay = check_number("MoCo", "gamma_decay", gamma_decay, low=0.0, high=1e3)
        self.rho = check_number("MoCo", "rho", rho, low=0.0, high=1e6)
        super().__init__(
            shared_parameters, num_tasks, tasks, backend, per_task_gradients, sync, process_group
        )
        if self._sharded:
            raise NotImplementedError(
                "MoCo: FSDP2-sharded shared parameters are not supported (it tracks the whole "
                "K x P gradients); use DDP, or a Gram method"
            )
        options = self._state_options()
        size = sum(parameter.numel() for parameter in self._shared)
        num = self.num_tasks
        self.register_buffer("tracked_gradients", torch.zeros(num, size, **options))
        self.register_buffer("lambdas", torch.full((num,), 1 / num, **options))
        # float64: a float16 count stops at 2048, a bfloat16 one at 256.
        self.register_buffer(
            "steps", torch.zeros((), dtype=torch.float64, device=options.get("device"))
        )
        self.register_buffer("weights", self.lambdas.clone(), persistent=False)

    def forward(self, *losses: LossArgs) -> Tensor:
        """``sum_i lambda_i L_i``, whose backward gives the shared parameters ``d = Y^T
        lambda``."""
        reported = self._reported_total(losses, self.weights.device)
        if reported is not None:
            return reported
        return self._update_step(losses, self._tracked_update)

    def _tracked_update(self, matrix: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """One step of the tracking and the weights; returns ``lambda`` and ``d = Y^T
        lambda``."""
        steps = self.steps + 1
        tracked = stochastic.moco_tracking(
            self.tracked_gradients, matrix, (self.beta / steps**self.beta_decay).to(matrix)
        )
        tracked_gram = task_gram_or_norms([tracked], False, self._requested_backend)
        lambdas = stochastic.moco_lambdas(
            self.lambdas, tracked_gram, self.gamma / steps**self.gamma_decay, self.rho
        )
        self.tracked_gradients, self.lambdas, self.steps = tracked, lambdas, steps
        return lambdas, lambdas.to(tracked.dtype) @ tracked

    def _set_extra_state(self, state: dict[str, Any]) -> None:
        # After the buffers loaded: the weights of the resumed step, for eval-mode totals.
        self.weights = self.lambdas.clone()

    def _checkpoint_faults(self, tensors: dict[str, Any]) -> list[str]:
        return self._simplex_faults("lambdas", tensors)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, beta={self.beta}, beta_decay={self.beta_decay}, "
            f"gamma={self.gamma}, gamma_decay={self.gamma_decay}, rho={self.rho}"
        )
