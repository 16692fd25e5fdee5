"""``COSMOS``: the preference-aligned linear scalarisation (Ruchte & Grabocka, ICDM 2021)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from fused_mtl._distributed import ProcessGroup
from fused_mtl._losses import Reduction, per_task_numbers
from fused_mtl.balancer import LossObjective, check_number
from fused_mtl.ops.backend import Backend
from fused_mtl.reference import loss_weights


class COSMOS(LossObjective):
    r"""The preference-weighted sum of the losses, minus a reward for losses that point along
    the preferences.

    .. math:: f = \langle\lambda, L\rangle - \mu \cos(\lambda, L), \qquad
              \frac{\partial f}{\partial L_i} = \lambda_i - \mu\Big(\frac{\lambda_i}
              {\|\lambda\|\,\|L\|} - \cos(\lambda, L)\,\frac{L_i}{\|L\|^2}\Big).

    The linear term alone reaches only the convex part of the Pareto front and ignores how the
    losses are spread; the cosine term pulls the vector of losses toward the preference ray,
    so that each preference vector gets its own trade-off. The paper also feeds the
    preferences to the network and draws them from a Dirichlet distribution at every batch, to
    learn the whole front with one model: that is a choice of the model's inputs, left to the
    user (assign ``cosmos.preferences`` before a call to change them). ``weights`` are the
    gradient weights of the last training call (``lambda`` before). Where every loss is 0 the
    cosine is taken as 0. Under a backward with ``create_graph=True`` the gradient is
    differentiable: second derivatives are those of ``f``.

    Args:
        num_tasks: number of tasks K (may be omitted when ``tasks`` is given).
        tasks: task names; enables calling with a dict and names tasks in errors.
        mu: the cosine term's weight, >= 0 (default 1; the paper tunes it per problem,
            from 0.01 to 8; 0 is the linear scalarisation).
        preferences: ``lambda``, positive, one number or one per task (default ``1 / K``).
        reduction: ``None`` requires scalar losses; ``"mean"`` / ``"sum"`` reduce each loss.
        backend: accepted so that every method is constructed alike (no kernel).
        sync: under ``torch.distributed``, use the losses averaged over the ranks (one
            ``all_reduce`` of K numbers): the whole batch's objective on every rank.
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import COSMOS
        >>> cosmos = COSMOS(tasks=["depth", "seg"], mu=1.0)
        >>> cosmos(torch.tensor([2.0, 0.0]))  # 0.5 * 2 - cos(45 degrees)
        tensor(0.2929)
        >>> cosmos.weights  # the cosine's gradient lowers the weight of the task off the ray
        tensor([0.5000, 0.1464])
    """

    weights: Tensor
    preferences: Tensor

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        tasks: Sequence[str] | None = None,
        mu: float = 1.0,
        preferences: float | Sequence[float] | None = None,
        reduction: Reduction = None,
        backend: Backend = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        penalty = check_number("COSMOS", "mu", mu, low=0.0, high=math.inf)
        if not math.isfinite(penalty):
            raise ValueError(f"COSMOS: mu must be a finite number >= 0, got {mu!r}")
        super().__init__(num_tasks, tasks, reduction, backend, sync, process_group)
        self.mu = penalty
        chosen = 1 / self.num_tasks if preferences is None else preferences
        # Configuration, not state: it follows .to(device) and is not in a checkpoint.
        self.register_buffer(
            "preferences",
            per_task_numbers("COSMOS", "preferences", chosen, self.num_tasks, self.tasks, True),
            persistent=False,
        )
        self.register_buffer(
            "weights", self.preferences.to(torch.get_default_dtype()), persistent=False
        )

    def _objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        return loss_weights.preference_cosine(losses, self.mu, self.preferences)

    def _weight_function(self, losses: Tensor) -> Callable[[Tensor], Tensor]:
        return partial(
            loss_weights.preference_cosine_gradient_weights,
            penalty=self.mu,
            preferences=self.preferences,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mu={self.mu}"
