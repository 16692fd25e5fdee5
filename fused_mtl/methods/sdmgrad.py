"""``SDMGrad``: stochastic direction-oriented multi-objective gradient (Xiao et al., 2023)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fused_mtl._losses import as_integer
from fused_mtl.balancer import SampledGramBalancer, check_number
from fused_mtl.ops.task_gradients import SharedParameters
from fused_mtl.reference import stochastic


class SDMGrad(SampledGramBalancer):
    r"""MGDA's min-norm direction, pulled toward the mean gradient, from unbiased samples.

    SDMGrad keeps weights ``w`` on the simplex across steps. Each step it takes
    ``iterations`` projected steps (with momentum) on the regularised min-norm problem

    .. math:: \min_{w \in \Delta}\ \tfrac12 \|G w\|^2 + \lambda \langle G w, g_0\rangle,
              \qquad d = \frac{G^\top w + \lambda g_0}{1 + \lambda},

    with ``g_0`` the mean task gradient: ``lambda = 0`` is MGDA, a large ``lambda`` the mean.
    Each inner product ``<g_i, g_j>`` there is the cross Gram ``G_a G_b^T`` of two
    independent mini-batches, which makes the stochastic gradient of the problem unbiased
    (pass them as ``weight_losses``; see ``SampledGramBalancer``), and ``d`` uses a third.
    The Gram is divided by the squared mean gradient norm plus 1e-8 (as in the authors'
    code), so the inner step size does not depend on the gradients' scale while their mean
    norm is well above 1e-4. ``weights`` are ``d``'s: ``(w + lambda / K) / (1 + lambda)``,
    summing to 1. ``simplex_weights`` (``w``) is a buffer, saved in ``state_dict``.

    Args:
        lam: ``lambda`` >= 0 (default 0.3, LibMTL's value after the authors' code).
        iterations: inner steps per training step (default 20; step size 5 and momentum 0.5,
            as the authors' code).
        options: the arguments of every Gram method (``GramBalancer``).

    Example:
        >>> import torch
        >>> from fused_mtl import SDMGrad
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> sdmgrad = SDMGrad(trunk.parameters(), 2)
        >>> def losses():
        ...     out = heads(torch.relu(trunk(torch.randn(16, 4))))
        ...     return [out[:, 0].square().mean(), out[:, 1].mean()]
        >>> total = sdmgrad(losses(), weight_losses=(losses(), losses()))  # three batches
        >>> total.backward()
        >>> round(sdmgrad.weights.sum().item(), 6)
        1.0
    """

    simplex_weights: Tensor

    def __init__(
        self,
        shared_parameters: SharedParameters | None = None,
        num_tasks: int | None = None,
        *,
        lam: float = 0.3,
        iterations: int = 20,
        **options: Any,
    ) -> None:
        regulariser = check_number("SDMGrad", "lam", lam, low=0.0, high=1e6)
        iterations = as_integer("SDMGrad: iterations", iterations)
        super().__init__(shared_parameters, num_tasks, **options)
        self.lam, self.iterations = regulariser, iterations
        self.register_buffer(
            "simplex_weights",
            torch.full((self.num_tasks,), 1 / self.num_tasks, **self._state_options()),
        )

    def _gram_weights(self, gram: Tensor) -> Tensor:
        self.simplex_weights = stochastic.sdmgrad_lambdas(
            self.simplex_weights, gram, self.lam, self.iterations
        )
        return stochastic.sdmgrad_weights(self.simplex_weights, self.lam)

    def _set_extra_state(self, state: dict[str, Any]) -> None:
        # After the buffers loaded: the weights of the resumed step, for eval-mode totals.
        self.weights = stochastic.sdmgrad_weights(self.simplex_weights, self.lam)

    def _checkpoint_faults(self, tensors: dict[str, Any]) -> list[str]:
        return self._simplex_faults("simplex_weights", tensors)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lam={self.lam}, iterations={self.iterations}"
