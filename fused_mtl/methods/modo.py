"""``MoDo``: multi-objective gradient with double sampling (Chen et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_mtl.balancer import SampledGramBalancer, check_number
from fused_mtl.ops.task_gradients import SharedParameters
from fused_mtl.reference import stochastic


class MoDo(SampledGramBalancer):
    r"""MGDA's weights learned by one stochastic projected step per training step.

    MoDo keeps weights ``lambda`` on the simplex and, each step, descends the min-norm
    objective ``(1/2) ||G lambda||^2`` (plus ``(rho/2) ||lambda||^2``) by one step with an
    unbiased estimate of its gradient, the cross Gram of two independent mini-batches:

    .. math:: \lambda \leftarrow \Pi_\Delta\big(\lambda - \gamma\,
              (G_a G_b^\top \lambda + \rho \lambda)\big), \qquad d = G^\top \lambda,

    with ``d`` on a third mini-batch's gradients (``weight_losses``; see
    ``SampledGramBalancer``). ``lambda`` changes slowly, so the update's direction is nearly
    unbiased as well. ``weights`` are ``lambda`` (a buffer of the same name, saved in
    ``state_dict``), summing to 1; they start at ``1 / K``. ``gamma`` acts on the raw Gram
    matrix: scale it with the squared gradient norms of your model.

    Args:
        gamma: the step size of ``lambda`` (default 1e-3, LibMTL's value after the authors').
        rho: the L2 regularisation of ``lambda`` (default 0.1, likewise).
        options: the arguments of every Gram method (``GramBalancer``).

    Example:
        >>> import torch
        >>> from fused_mtl import MoDo
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> modo = MoDo(trunk.parameters(), 2, gamma=0.1)
        >>> def losses():
        ...     out = heads(torch.relu(trunk(torch.randn(16, 4))))
        ...     return [out[:, 0].square().mean(), out[:, 1].mean()]
        >>> modo.backward(losses(), weight_losses=(losses(), losses())).shape
        torch.Size([])
        >>> modo.lambdas.shape
        torch.Size([2])
    """

    lambdas: Tensor

    def __init__(
        self,
        shared_parameters: SharedParameters | None = None,
        num_tasks: int | None = None,
        *,
        gamma: float = 1e-3,
        rho: float = 0.1,
        **options: Any,
    ) -> None:
        step = check_number("MoDo", "gamma", gamma, low=0.0, high=1e6, low_open=True)
        regulariser = check_number("MoDo", "rho", rho, low=0.0, high=1e6)
        super().__init__(shared_parameters, num_tasks, **options)
        self.gamma, self.rho = step, regulariser
        self.register_buffer(
            "lambdas", torch.full((self.num_tasks,), 1 / self.num_tasks, **self._state_options())
        )

    def _gram_weights(self, gram: Tensor) -> Tensor:
        self.lambdas = stochastic.modo_lambdas(self.lambdas, gram, self.gamma, self.rho)
        return self.lambdas

    def _set_extra_state(self, state: dict[str, Any]) -> None:
        # After the buffers loaded: the weights of the resumed step, for eval-mode totals.
        self.weights = self.lambdas.clone()

    def _checkpoint_faults(self, tensors: dict[str, Any]) -> list[str]:
        return self._simplex_faults("lambdas", tensors)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, rho={self.rho}"
