"""``GradNorm``: task weights learned from per-task gradient norms (Chen et al., ICML 2018)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor, nn

from fused_mtl import reference
from fused_mtl._distributed import ProcessGroup
from fused_mtl._losses import task_label
from fused_mtl.balancer import (
    GradientBalancer,
    LossArgs,
    weighted_sum,
    with_parameter_gradient,
)
from fused_mtl.ops.backend import Backend
from fused_mtl.ops.task_gradients import SharedParameters

# Renormalisation raises a weight that an optimiser step pushed to or below zero to this floor
# before rescaling the sum to K: the weights stay positive and the rescaling finite.
MIN_WEIGHT = 1e-6


class GradNorm(GradientBalancer):
    r"""GradNorm: learn task weights that balance the tasks' gradient norms and training rates.

    With per-task gradients ``g_i`` of the shared parameters, ``G_i = w_i ||g_i||`` and training
    rates ``r_i = L~_i / mean_j L~_j`` (``L~_i = L_i(t) / L_i(0)``), each ``backward`` gives the
    weights the gradient of :math:`\sum_i |G_i - \bar G r_i^\alpha|` (targets held constant),
    ``sign(G_i - T_i) ||g_i||``, and the model the gradients of :math:`\sum_i w_i L_i` with the
    weights held constant, so that nothing of second order reaches the model.

    Step by step, ``backward(losses)``:

    1. renormalises the weights so that they sum to K (each at least ``MIN_WEIGHT``), which
       applies the previous optimiser step's update; the weights used, and seen in
       ``weights`` after the call, always sum to K;
    2. computes the per-task gradients of the shared parameters (one batched backward when the
       model allows it; see ``gradient_mode``) and their norms in one fused launch;
    3. records ``initial_losses`` on the first call unless they were given;
    4. returns ``sum_i w_i L_i`` (weights held constant), whose backward gives the model its
       gradients and ``learned_weights.grad`` GradNorm's gradient, not a gradient of the total.

    ``total = gradnorm(losses)`` does all this, and any engine may run ``total.backward()``
    (a ``GradScaler``, Lightning, DDP with GradNorm inside the wrapped module, FSDP2);
    ``gradnorm.backward(losses)`` is the same call followed by ``total.backward()``. Under
    ``torch.distributed`` the norms are those of the global per-task gradients and ``L_i(0)``
    and ``L_i(t)`` the global losses, so every rank learns the same weights (see
    ``docs/distributed.md``). In eval mode or with grad disabled, the call returns
    ``sum_i w_i L_i`` and changes nothing.

    Everything after the first call runs on the device without a host synchronisation. The first
    call also checks that every task's loss reaches every shared parameter and that the initial
    losses are positive, and chooses how per-task gradients are computed (K + 1 backward passes).

    Args:
        shared_parameters: the parameters whose per-task gradients are balanced (the paper uses
            the last shared layer): a module, a tensor or an iterable of tensors.
        num_tasks: number of tasks K (may be omitted when ``tasks`` is given).
        tasks: task names; enables calling with a dict and names tasks in errors.
        alpha: the asymmetry ``alpha >= 0``; larger values pull the training rates together
            more strongly. 1.5 is the paper's default.
        initial_losses: ``L_i(0)``, one positive number per task; recorded from the first call
            when omitted.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, for the gradient norms.
        per_task_gradients: how they are computed: ``"auto"`` (one batched backward
            when the model allows it, checked against per-task backward passes on the first
            call, else the loop), ``"batched"`` (raise if it cannot be used) or ``"loop"`` (one
            backward per task; on a CPU often as fast, see ``fused_mtl.ops.task_gradients``).
        sync: under ``torch.distributed``, balance with the norms and losses over all ranks
            (``False``: with this rank's own).
        process_group: the group to sync over (``None``: the default group).

    Attributes:
        gradient_mode: ``"batched"`` or ``"loop"`` once chosen (``None`` before the first call);
            ``gradient_mode_reason`` says why.
        grad_norms: the per-task gradient norms of the last call (detached), for logging.

    Example:
        >>> import torch
        >>> from fused_mtl import GradNorm
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> gradnorm = GradNorm(trunk.parameters(), tasks=["a", "b"])
        >>> optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters(),
        ...                              *gradnorm.parameters()], lr=0.01)
        >>> out = heads(torch.relu(trunk(torch.randn(16, 4))))
        >>> total = gradnorm({"a": out[:, 0].square().mean(), "b": out[:, 1].abs().mean()})
        >>> total.backward()
        >>> optimizer.step()
        >>> gradnorm.weights.shape, gradnorm.gradient_mode
        (torch.Size([2]), 'batched')
    """

    initial_losses: Tensor

    def __init__(
        self,
        shared_parameters: SharedParameters,
        num_tasks: int | None = None,
        *,
        tasks: Sequence[str] | None = None,
        alpha: float = 1.5,
        initial_losses: Sequence[float] | Tensor | None = None,
        backend: Backend = "auto",
        per_task_gradients: str = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(
            shared_parameters, num_tasks, tasks, backend, per_task_gradients, sync, process_group
        )
        if isinstance(alpha, bool) or not isinstance(alpha, Real) or not alpha >= 0:
            raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha!r}")
        self.alpha = float(alpha)
        device = self._shared[0].device
        # Registered as "weights" (the checkpoints' and named_parameters' name) while the
        # attribute ``weights`` reads like every other method's: a plain tensor.
        self._parameters["weights"] = nn.Parameter(torch.ones(self.num_tasks, device=device))
        # NaN marks "not recorded yet"; a buffer, so that a checkpoint keeps L_i(0).
        self.register_buffer(
            "initial_losses", torch.full((self.num_tasks,), math.nan, device=device)
        )
        self._initial_recorded = False
        if initial_losses is not None:
            self._set_initial_losses(torch.as_tensor(initial_losses, dtype=torch.float32))
        self.grad_norms: Tensor | None = None
        self.register_load_state_dict_post_hook(GradNorm._after_load)

    @property
    def weights(self) -> Tensor:  # type: ignore[override]
        """The current task weights (detached); the parameter is :attr:`learned_weights`."""
        return self.learned_weights.detach()

    @property
    def learned_weights(self) -> nn.Parameter:
        """The parameter GradNorm learns (``weights`` in ``named_parameters`` and checkpoints):
        give it to the optimiser; after a backward its ``.grad`` is GradNorm's gradient."""
        return self._parameters["weights"]  # type: ignore[return-value]

    def _set_initial_losses(self, values: Tensor) -> None:
        """Check ``L_i(0)`` on the host (a synchronisation: at construction or first call)."""
        values = values.detach().float().cpu()
        if values.shape != (self.num_tasks,):
            raise ValueError(
                f"initial_losses must have {self.num_tasks} entries, got shape "
                f"{tuple(values.shape)}"
            )
        for index, value in enumerate(values.tolist()):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"task {task_label(index, self.tasks)}: initial loss is {value}; GradNorm's "
                    "training rates L_i(t) / L_i(0) need a finite, positive initial loss"
                )
        self.initial_losses.copy_(values)
        self._initial_recorded = True

    def _checkpoint_faults(self, tensors: dict[str, object]) -> list[str]:
        faults = self._value_faults(
            "weights", tensors.get("weights"), "must be finite", math.isfinite
        )
        initial = tensors.get("initial_losses")
        if isinstance(initial, Tensor) and not bool(torch.isnan(initial).all()):
            # Recorded: every L_i(0) is a finite, positive loss (all NaN: not recorded yet).
            faults += self._value_faults(
                "initial_losses",
                initial,
                "GradNorm's training rates L_i(t) / L_i(0) need finite, positive initial "
                "losses (all NaN: not recorded yet)",
                lambda value: math.isfinite(value) and value > 0,
            )
        return faults

    @staticmethod
    def _after_load(module: nn.Module, incompatible_keys: object) -> None:
        assert isinstance(module, GradNorm)
        module._initial_recorded = not bool(torch.isnan(module.initial_losses).any())

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Rescale the weights in place to sum to K, each at least ``MIN_WEIGHT`` (step 5).

        ``backward`` calls it first; call it yourself only to log the renormalised weights
        between an optimiser step and the next ``backward``.
        """
        self.learned_weights.copy_(reference.renormalized_weights(self.weights, MIN_WEIGHT))

    def forward(self, *losses: LossArgs) -> Tensor:
        """One GradNorm step: renormalise the weights to sum to K, take the per-task gradient
        norms of the shared parameters, and return ``sum_i w_i L_i`` (weights constant).

        Its backward gives the model the gradients of ``sum_i w_i L_i`` (weights constant) and
        ``learned_weights.grad`` GradNorm's update, times the upstream gradient (1 for a plain
        ``total.backward()``, the loss scale under a ``GradScaler``).
        """
        reported = self._reported_total(losses, self.weights.device)
        if reported is not None:
            return reported
        stacked, separate = self._graph_losses(losses, self.weights.device)
        # Under torch.distributed the first sync gives every rank rank 0's weights and L_i(0):
        # before they are used.
        self._syncing()
        self._check_optimized(self.learned_weights, "weights")
        self.renormalize_()
        self._seen_at(self.learned_weights)
        grad_norms, current = self._task_gram(self._task_gradients, stacked, separate, True)
        if not self._initial_recorded:
            self._set_initial_losses(current)
        dtype = torch.promote_types(grad_norms.dtype, self.weights.dtype)
        # A copy: the total's backward needs these weights after the next call renormalises.
        weights = self.weights.detach().clone()
        weight_grad = reference.gradnorm_weight_grad(
            weights.to(dtype),
            grad_norms.to(dtype),
            current.to(dtype),
            self.initial_losses.to(dtype),
            self.alpha,
        ).to(self.weights.dtype)
        self.grad_norms = grad_norms.detach()
        # float32 (float64) whatever the losses' dtype: half-precision losses are not rounded
        # to their weights' precision, nor the weights to theirs.
        total = weighted_sum(weights, stacked)
        return with_parameter_gradient(total, self.learned_weights, weight_grad)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"
