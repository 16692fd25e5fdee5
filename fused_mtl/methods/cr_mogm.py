"""``CRMOGM``: the weights of a gradient method smoothed over steps (Zhou et al., NeurIPS 2022)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fused_mtl.balancer import GramBalancer, SampledGramBalancer, check_number
from fused_mtl.methods.mgda import MGDA
from fused_mtl.ops.task_gradients import SharedParameters
from fused_mtl.reference import gram_weights


class CRMOGM(GramBalancer):
    r"""Any Gram method's weights, averaged over the steps: correlation-reduced stochastic
    multi-objective gradient manipulation.

    With stochastic gradients, a method's weights ``lambda_hat_t`` are computed from the same
    mini-batch as the gradients they combine; their correlation biases the update, and MGDA
    and its kind may not converge. CR-MOGM smooths the weights with a moving average,

    .. math:: \lambda_t = \alpha\, \lambda_{t-1} + (1 - \alpha)\, \hat\lambda_t,
              \qquad d = \sum_i \lambda_{t,i}\, g_i,

    starting from ``lambda_1 = lambda_hat_1`` (``gram_weights.smoothed_weights``). The paper
    lets ``alpha_t`` grow toward 1 as the learning rate decays (``alpha_t = 1 - lr_t / lr_0``
    in its corollary); ``alpha`` may be set between steps. ``weights`` are ``lambda_t``; the
    average (``smoothed_weights``, NaN before the first step) is saved in ``state_dict``.

    Args:
        method: the Gram method whose weights are smoothed, a class (default ``MGDA``): built
            on the same shared parameters and tasks, with ``method_options``. A method that
            keeps its own state across steps (GradVac, SDMGrad, MoDo) is refused: its state
            would not be saved with this one's.
        alpha: the weight of the past, in [0, 1] (default 0.9, TorchJD's; 0 is ``method``
            itself, 1 keeps the first step's weights).
        method_options: keyword arguments of ``method`` (``{"normalization": "l2"}``).
        options: the arguments of every Gram method (``GramBalancer``).

    Example:
        >>> import torch
        >>> from fused_mtl import CRMOGM, UPGrad
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> smoothed = CRMOGM(trunk.parameters(), 2, method=UPGrad, alpha=0.5)
        >>> for _ in range(2):
        ...     out = heads(torch.relu(trunk(torch.randn(16, 4))))
        ...     _ = smoothed.backward([out[:, 0].square().mean(), out[:, 1].mean()])
        >>> smoothed.weights.shape
        torch.Size([2])
    """

    smoothed_weights: Tensor

    def __init__(
        self,
        shared_parameters: SharedParameters | None = None,
        num_tasks: int | None = None,
        *,
        method: type[GramBalancer] = MGDA,
        alpha: float = 0.9,
        method_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        self.alpha = alpha
        if not (isinstance(method, type) and issubclass(method, GramBalancer)):
            raise TypeError(
                "CRMOGM: method must be a Gram method's class (MGDA, UPGrad, CAGrad, ...), "
                f"got {method!r}"
            )
        if issubclass(method, (SampledGramBalancer, CRMOGM)):
            raise ValueError(f"CRMOGM: {method.__name__} cannot be smoothed by CRMOGM")
        given = sorted(set(method_options or {}) & {"tasks", "backend", "sync", "process_group"})
        if given:
            raise ValueError(
                f"CRMOGM: method_options cannot set {', '.join(given)}: the method takes this "
                "module's; pass them to CRMOGM"
            )
        if shared_parameters is not None and not isinstance(shared_parameters, nn.Module):
            shared_parameters = list(shared_parameters)  # read by both methods
        super().__init__(shared_parameters, num_tasks, **options)
        # The method only computes weights from the Gram this module takes: it is given the
        # parameters, not the module (no layer hooks of its own).
        inner = method(
            list(self._shared) or None,
            self.num_tasks,
            tasks=self.tasks,
            backend=self.backend,
            sync=self._sync.enabled,
            process_group=self._sync.process_group,
            **(method_options or {}),
        )
        state = [name for name in inner.state_dict() if not name.endswith("_extra_state")]
        if state:
            raise ValueError(
                f"CRMOGM: {method.__name__} keeps state across steps ({', '.join(state)}), "
                "which CRMOGM would not save nor restore; smooth a method without state"
            )
        self.method = inner
        options = self._state_options()
        self.register_buffer("smoothed_weights", torch.full((self.num_tasks,), math.nan, **options))

    @property
    def alpha(self) -> float:
        """The weight of the past, in [0, 1]; may be set between steps."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = check_number("CRMOGM", "alpha", value, low=0.0, high=1.0)

    def _weights_of(self, gram: Tensor, losses: Tensor) -> Tensor:
        # The method draws (PCGrad's orders) once per optimizer step, as this module would.
        self.method.__dict__["_step_window"] = self.__dict__.get("_step_window")
        try:
            current = self.method._weights_of(gram, losses)
        finally:
            self.method.__dict__["_step_window"] = None
        smoothed = gram_weights.smoothed_weights(self.smoothed_weights, current, self.alpha)
        self.smoothed_weights = smoothed.to(self.smoothed_weights.dtype)
        return smoothed

    def _set_extra_state(self, state: dict[str, Any]) -> None:
        # After the buffers loaded: the weights of the resumed step, for eval-mode totals.
        if not torch.isnan(self.smoothed_weights).any():
            self.weights = self.smoothed_weights.clone()

    def _checkpoint_faults(self, tensors: dict[str, Any]) -> list[str]:
        saved = tensors.get("smoothed_weights")
        if isinstance(saved, Tensor) and saved.shape == (self.num_tasks,):
            missing = torch.isnan(saved.detach().double().cpu())
            if missing.any() and not missing.all():
                return ["smoothed_weights are NaN for some tasks only (NaN: no step yet)"]
        return self._value_faults(
            "smoothed_weights",
            saved,
            "the smoothed weights are finite (NaN: no step yet)",
            lambda value: not math.isinf(value),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, method={type(self.method).__name__}, alpha={self.alpha}"
