"""``GradVac``: gradient vaccine (Wang et al., ICLR 2021)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_mtl._losses import task_label
from fused_mtl.balancer import GramBalancer, check_number
from fused_mtl.ops.task_gradients import SharedParameters
from fused_mtl.reference import gram_weights


class GradVac(GramBalancer):
    r"""Raise each pair of task gradients to the cosine they usually have, then sum.

    GradVac keeps, for every ordered pair of tasks, a target cosine ``phî_ij``: an EMA of the
    cosines seen, ``phî_ij <- (1 - beta) phî_ij + beta phi_ij``, starting at 0. Each step, for
    every task i and the others j in a random order (torch's RNG), with ``g_i'`` starting at
    ``g_i`` and ``phi_ij = cos(g_i', g_j)``: if ``phi_ij < phî_ij``,

    .. math:: g_i' \mathrel{+}= \frac{\|g_i'\| (\hat\phi_{ij} \sqrt{1 - \phi_{ij}^2}
              - \phi_{ij} \sqrt{1 - \hat\phi_{ij}^2})}{\|g_j\| \sqrt{1 - \hat\phi_{ij}^2}}\, g_j,

    which sets the cosine to exactly the target; ``d = sum_i g_i'`` (the sum, as in the paper).
    With every target at 0 this is PCGrad. The targets are a buffer, ``targets`` (K x K), saved
    in ``state_dict`` and updated by training calls only; the whole shared parameter vector is
    one group (the paper also applies it per layer).

    Args:
        beta: the EMA rate of the targets, in [0, 1] (default 0.01; LibMTL uses 0.5).
        options: the arguments of every Gram method (``GramBalancer``).

    Example:
        >>> import torch
        >>> from fused_mtl import GradVac
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> gradvac = GradVac(trunk.parameters(), 2, beta=0.5)
        >>> out = heads(torch.relu(trunk(torch.randn(16, 4))))
        >>> _ = gradvac.backward([out[:, 0].square().mean(), out[:, 1].mean()])
        >>> gradvac.targets.shape
        torch.Size([2, 2])
    """

    _update_is_sum = True
    targets: Tensor

    def __init__(
        self,
        shared_parameters: SharedParameters | None = None,
        num_tasks: int | None = None,
        *,
        beta: float = 0.01,
        **options: Any,
    ) -> None:
        rate = check_number("GradVac", "beta", beta, low=0.0, high=1.0)
        super().__init__(shared_parameters, num_tasks, **options)
        self.beta = rate
        self.register_buffer(
            "targets", torch.zeros(self.num_tasks, self.num_tasks, device=self.weights.device)
        )

    def _gram_weights(self, gram: Tensor) -> Tensor:
        orders = gram_weights.projection_orders(self.num_tasks, gram.device)
        weights, targets = gram_weights.gradvac_weights(
            gram, self._shared_random(orders), self.targets, self.beta
        )
        # Replaced, not changed in place: under step_with a step keeps its start state.
        self.targets = targets.to(self.targets.dtype)  # float64 from the float64 Gram
        return weights

    def _checkpoint_faults(self, tensors: dict[str, Any]) -> list[str]:
        targets = tensors.get("targets")
        if not isinstance(targets, Tensor) or targets.shape != self.targets.shape:
            return []  # missing or of another shape: torch's own report
        values = targets.detach().double().cpu()
        for i, j in zip(*torch.nonzero(~((values >= -1) & (values <= 1))).T.tolist(), strict=True):
            first, second = task_label(i, self.tasks), task_label(j, self.tasks)
            return [
                f"the target cosine of tasks {first} and {second} is {float(values[i, j])}; "
                "a cosine is in [-1, 1]"
            ]
        return []

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}"
