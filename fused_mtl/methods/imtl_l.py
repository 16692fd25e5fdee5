"""``IMTLL``: the loss-scale part of impartial multi-task learning (Liu et al., ICLR 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fused_mtl import reference
from fused_mtl._distributed import ProcessGroup
from fused_mtl._losses import Reduction
from fused_mtl.methods.uncertainty import UncertaintyModule
from fused_mtl.ops.backend import Backend


class IMTLL(UncertaintyModule):
    r"""Scale each loss by a learned ``e^{s_i}``, kept from vanishing by ``-s_i``.

    IMTL-L learns one scale ``s_i`` per task (the parameter ``loss_scale``, trained by the
    model's optimiser with the rest) so that every task's scaled loss stays at the same level:

    .. math:: \mathcal{L} = \sum_i e^{s_i} L_i - s_i, \qquad
              \frac{\partial \mathcal{L}}{\partial s_i} = e^{s_i} L_i - 1 = 0
              \iff e^{s_i} L_i = 1 .

    It is uncertainty weighting with the sign of the parameter flipped (``e^{-u} L + u`` at
    ``u = -s``), and runs on the same fused op: one Triton launch for the total and one for its
    gradient on CUDA. IMTL's gradient part is ``IMTLG``; the paper's full IMTL uses both.

    Args:
        num_tasks: number of tasks K (may be omitted when ``tasks`` is given).
        tasks: task names; enables calling with a dict and names tasks in errors.
        reduction: ``None`` requires scalar losses; ``"mean"`` / ``"sum"`` reduce each loss.
        check_finite: raise naming the task on a NaN, infinite or negative loss (a host read).
        log_var_bounds: the range that ``-s_i`` is kept in (-20 to 20 by default), as for
            ``UncertaintyWeighting``: a zero loss drives ``s_i`` up without limit. With
            float16 losses the weight ``e^s`` must fit float16 for the losses' gradient to be
            finite (``s < 11``, and ``e^s L = 1`` reaches it for L < 1.7e-5): pass
            ``log_var_bounds=(-11, 20)`` there.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        sync: under ``torch.distributed``, average the gradient of ``loss_scale`` over the ranks.
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import IMTLL
        >>> imtl = IMTLL(tasks=["depth", "seg"])
        >>> with torch.no_grad():
        ...     _ = imtl.loss_scale.copy_(torch.tensor([0.0, 1.0]))
        >>> imtl(torch.tensor([2.0, 0.5]))  # 2.0 + (e * 0.5 - 1)
        tensor(2.3591, grad_fn=<...>)
        >>> imtl.weights
        tensor([1.0000, 2.7183])
    """

    loss_scale: nn.Parameter
    _parametrization = reference.Parametrization.LOG_VARIANCE
    _negative_loss_reason = (
        "IMTLL needs losses >= 0 (e^s L - s has no minimum for L < 0, so its loss_scale would "
        "only stop at the bound of log_var_bounds): add a constant that makes the loss "
        "non-negative, or balance this task otherwise"
    )

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        tasks: Sequence[str] | None = None,
        reduction: Reduction = None,
        check_finite: bool = False,
        log_var_bounds: tuple[float, float] = reference.LOG_VARIANCE_BOUNDS,
        backend: Backend = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
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
        self.loss_scale = nn.Parameter(torch.zeros(self.num_tasks))

    def _task_parameter(self) -> Tensor:
        return self.loss_scale

    def _log_variances(self) -> Tensor:
        return -self.loss_scale
