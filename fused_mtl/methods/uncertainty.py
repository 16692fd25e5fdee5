"""``UncertaintyWeighting``: learned per-task uncertainty (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fused_mtl import reference
from fused_mtl._distributed import ProcessGroup
from fused_mtl._losses import (
    Reduction,
    TaskTypes,
    check_reduction,
    raise_if_not_finite,
    resolve_task_types,
    stack_losses,
    task_label,
)
from fused_mtl.balancer import Balancer, LossArgs
from fused_mtl.ops.backend import Backend
from fused_mtl.ops.uncertainty import checked_uncertainty_weighting
from fused_mtl.reference import Parametrization, check_log_var_bounds

#: Why uncertainty weighting refuses a negative loss (``check_finite``).
NEGATIVE_LOSS_REASON = (
    "uncertainty weighting needs losses >= 0 (a L e^-s + b s has no minimum for L < 0, so its "
    "log-variance would only stop at the bound of log_var_bounds): add a constant that "
    "makes the loss non-negative (an NLL's lowest value), or balance this task otherwise"
)


class UncertaintyModule(Balancer):
    """What every uncertainty-weighting module shares: task bookkeeping and the fused call.

    Subclasses own one parameter of shape ``(K,)`` and name it (``log_vars``, ``params``, ...);
    they say which with ``_task_parameter`` and ``_parametrization``.
    """

    _parametrization: Parametrization
    #: What a negative loss is told under ``check_finite``.
    _negative_loss_reason = NEGATIVE_LOSS_REASON
    loss_coefs: Tensor | None
    reg_coefs: Tensor | None

    def __init__(
        self,
        num_tasks: int | None,
        tasks: Sequence[str] | None,
        reduction: Reduction,
        check_finite: bool,
        backend: Backend,
        sync: bool = True,
        process_group: ProcessGroup | None = None,
        log_var_bounds: tuple[float, float] = reference.LOG_VARIANCE_BOUNDS,
    ) -> None:
        super().__init__(num_tasks, tasks, backend, sync, process_group)
        self.reduction = check_reduction(reduction)
        self.check_finite = bool(check_finite)
        self.log_var_bounds = check_log_var_bounds(log_var_bounds)
        self.register_buffer("loss_coefs", None, persistent=False)
        self.register_buffer("reg_coefs", None, persistent=False)

    def __setstate__(self, state: dict[str, object]) -> None:
        super().__setstate__(state)
        if "log_var_bounds" not in self.__dict__:  # pickled whole before the range existed
            self.log_var_bounds = reference.LOG_VARIANCE_BOUNDS

    def _task_parameter(self) -> Tensor:
        raise NotImplementedError

    def _log_variances(self) -> Tensor:
        """The parameter in the kernels' form (``s`` of ``e^-s L + s``); IMTL-L's is ``-s``."""
        return self._task_parameter()

    def _checkpoint_faults(self, tensors: dict[str, object]) -> list[str]:
        name = next(
            name for name, value in self.named_parameters() if value is self._task_parameter()
        )
        return self._value_faults(
            name, tensors.get(name), "the per-task parameter must be finite", math.isfinite
        )

    def forward(self, *losses: LossArgs) -> Tensor:
        """The balanced total (0-dim) of the task losses, in any calling convention."""
        if self.training and torch.is_grad_enabled():
            learned = self._task_parameter()
            self._check_optimized(learned, "per-task parameters")
            self._seen_at(learned)
        params = self._log_variances()
        stacked = stack_losses(
            losses,
            num_tasks=self.num_tasks,
            names=self.tasks,
            reduction=self.reduction,
            device=params.device,
        )
        if self.check_finite:
            raise_if_unusable(stacked, self.tasks, self._negative_loss_reason)
        if self._syncing():
            # The parameter's gradient, -a_i e^{-s_i} L_i + b_i, is linear in this rank's loss:
            # its mean over ranks is the gradient on the whole batch (one all_reduce of K
            # numbers in the backward; inside DDP, DDP's own averaging then changes nothing).
            params = self._sync.mean_grad(params)
        return checked_uncertainty_weighting(
            stacked,
            params,
            self._parametrization,
            self.loss_coefs,
            self.reg_coefs,
            self._requested_backend,
            self.log_var_bounds,
        )

    @property
    def weights(self) -> Tensor:  # type: ignore[override]
        """Effective weight of each task loss, ``d total / d L_i`` (detached, shape ``(K,)``)."""
        with torch.no_grad():
            return reference.uncertainty_weights(
                self._log_variances().detach(),
                self._parametrization,
                self.loss_coefs,
                self.log_var_bounds,
            )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reduction={self.reduction!r}"


def raise_if_unusable(
    losses: Tensor, names: Sequence[str] | None, reason: str = NEGATIVE_LOSS_REASON
) -> None:
    """``check_finite``: ``FloatingPointError`` naming every task whose loss is NaN or
    infinite, else ``ValueError`` naming the first negative one, with ``reason``. One host
    read when the losses are usable."""
    detached = losses.detach()
    if bool((detached >= 0).all()):  # False for NaN too
        return
    raise_if_not_finite(detached, names)
    index = int((detached < 0).nonzero()[0, 0])
    raise ValueError(
        f"task {task_label(index, names)}: loss is {losses[index].item()} < 0; {reason}"
    )


class UncertaintyWeighting(UncertaintyModule):
    r"""Balance task losses by learned homoscedastic uncertainty.

    With ``s_i = log sigma_i^2`` (the parameter ``log_vars``) the total is

    .. math:: \sum_i a_i e^{-s_i} L_i + b_i s_i

    with ``(a_i, b_i) = (1, 1)`` by default, ``(0.5, 0.5)`` for ``"regression"`` tasks and
    ``(1, 0.5)`` for ``"classification"`` tasks (Kendall et al.'s exact terms). On CUDA the total
    is one fused Triton launch and its gradient another, whatever the number of tasks.

    Args:
        num_tasks: number of tasks K (may be omitted when ``tasks`` is given).
        tasks: task names; enables calling with a dict and names tasks in errors.
        task_types: ``"regression"`` / ``"classification"`` per task (a sequence in task order,
            a dict by task name, or one string for all); ``None`` gives the ``exp(-s) L + s`` form.
        init_log_var: initial ``s_i`` (one number, or one per task).
        reduction: ``None`` requires scalar losses; ``"mean"`` / ``"sum"`` reduce each loss.
        check_finite: raise ``FloatingPointError`` naming the task on a NaN or infinite loss,
            and ``ValueError`` on a negative one. This reads the losses on the host (a
            synchronisation): leave it off in CUDA graphs.
        log_var_bounds: the range ``(lower, upper)`` that ``s_i`` is kept in, -20 to 20 by
            default (at most -80 to 80). A zero or negative loss drives ``s_i`` down without
            limit (the objective then has no minimum); at the bound ``s_i`` stops, the total
            and every gradient stay finite, and a gradient that would push ``s_i`` further out
            is dropped, so that it can come back once the loss allows it (near the bound the
            gradient is about e^20 |L|: an SGD step can throw ``s_i`` far past the other bound,
            where Adam's normalised steps do not). Inside the range nothing changes. With
            float16 losses the weight ``e^-s`` must fit float16 for the losses' gradient to be
            finite (``s > -11``): pass ``log_var_bounds=(-11, 11)`` there.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see docs/guide.md, Backends). The
            environment variable ``FUSED_MTL_BACKEND`` overrides ``"auto"``; it is read here, at
            construction.
        sync: under ``torch.distributed``, average the gradient of ``log_vars`` over the ranks,
            so that every rank learns the same ``log_vars`` as one process on the whole batch
            (``False``: each rank's own gradient).
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import UncertaintyWeighting
        >>> uw = UncertaintyWeighting(
        ...     tasks=["depth", "seg"], task_types=["regression", "classification"]
        ... )
        >>> total = uw({"depth": torch.tensor(2.0), "seg": torch.tensor(0.5)})
        >>> total  # 0.5 * 2.0 + 1.0 * 0.5 at s = 0
        tensor(1.5000, grad_fn=<...>)
        >>> uw.weights
        tensor([0.5000, 1.0000])
    """

    log_vars: nn.Parameter
    _parametrization = Parametrization.LOG_VARIANCE

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        tasks: Sequence[str] | None = None,
        task_types: TaskTypes = None,
        init_log_var: float | Sequence[float] = 0.0,
        reduction: Reduction = None,
        check_finite: bool = False,
        backend: Backend = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
        log_var_bounds: tuple[float, float] = reference.LOG_VARIANCE_BOUNDS,
    ) -> None:
        super().__init__(
            num_tasks,
            tasks,
            reduction,
            check_finite,
            backend,
            sync,
            process_group,
            log_var_bounds,
        )
        self.log_vars = nn.Parameter(self._initial_log_vars(init_log_var))
        self.task_types = resolve_task_types(task_types, self.num_tasks, self.tasks)
        if self.task_types is not None:
            labels = [task_label(i, self.tasks) for i in range(self.num_tasks)]
            loss_coefs, reg_coefs = reference.task_type_coefficients(self.task_types, labels)
            # Non-persistent: they follow .to(device) but are configuration, not state.
            self.loss_coefs = torch.tensor(loss_coefs)
            self.reg_coefs = torch.tensor(reg_coefs)

    def _initial_log_vars(self, init_log_var: object) -> Tensor:
        try:
            initial = torch.as_tensor(init_log_var, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"init_log_var must be one number or {self.num_tasks} numbers, "
                f"got {type(init_log_var).__name__}"
            ) from error
        if initial.dim() == 0:
            initial = initial.expand(self.num_tasks)
        if initial.shape != (self.num_tasks,):
            raise ValueError(
                f"init_log_var must be one number or {self.num_tasks} numbers, "
                f"got shape {tuple(initial.shape)}"
            )
        lower, upper = self.log_var_bounds
        for index, value in enumerate(initial.tolist()):
            if not lower <= value <= upper:  # NaN fails too
                raise ValueError(
                    f"task {task_label(index, self.tasks)}: init_log_var is {value}; it must "
                    f"be a finite number in log_var_bounds [{lower}, {upper}]"
                )
        return initial.clone()

    def _task_parameter(self) -> Tensor:
        return self.log_vars

    @property
    def sigmas(self) -> Tensor:
        """The learned standard deviations ``sigma_i = exp(s_i / 2)`` (detached), with ``s_i``
        in ``log_var_bounds``."""
        lower, upper = self.log_var_bounds
        return torch.exp(0.5 * self.log_vars.detach().clamp(lower, upper))
