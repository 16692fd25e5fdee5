"""``DTP``: Dynamic Task Prioritization, task level (Guo et al., ECCV 2018)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from fused_mtl import reference
from fused_mtl._distributed import ProcessGroup
from fused_mtl._losses import Reduction, check_names, task_label
from fused_mtl.balancer import LossWeighting
from fused_mtl.ops.backend import Backend

#: A smoothed KPI is raised to this floor before its log: the weight stays finite, at most
#: ``-log(1e-6) = 13.8``, and a task that has not started to perform is weighted up, not lost.
KPI_FLOOR = 1e-6

KPIs = Tensor | Sequence[float | Tensor] | Mapping[str, float | Tensor] | float


class DTP(LossWeighting):
    r"""Weight each task by a focal term of how badly it performs.

    You report a key performance indicator per task in [0, 1] (accuracy, IoU, ...) with
    ``update_kpis``; the module keeps its exponential moving average
    :math:`\bar\kappa_i \leftarrow d\,\bar\kappa_i + (1 - d)\,\kappa_i` (the first report sets
    it) and weights the losses by

    .. math:: w_i = -(1 - \bar\kappa_i)^{\gamma_i} \log \bar\kappa_i

    with :math:`\bar\kappa_i` raised to at least ``KPI_FLOOR`` = 1e-6 before the log, so that a
    KPI of 0 gives a weight of 13.8 instead of infinity. A task at KPI 1 gets weight 0. Before
    the first report every weight is 1.

    Under ``torch.distributed``, call ``update_kpis`` on every rank: the reported KPIs are
    averaged over the ranks (the KPI of the whole validation set when each rank reports a mean
    over an equal share of it; an already global KPI is unchanged), and every rank gets the same
    weights.

    ``update_kpis`` reads the K values on the host (a synchronisation when they are on a GPU) to
    check that each lies in [0, 1]; the weighted total itself does not synchronise.
    The moving average and the weights are buffers, the number of reports is extra state:
    ``load_state_dict(state_dict())`` resumes with bit-identical weights.

    Args:
        num_tasks: number of tasks K (may be omitted when ``tasks`` is given).
        tasks: task names; enables dicts and names tasks in errors.
        gamma: the focusing parameter, ``>= 0``: one number, or one per task (a sequence in task
            order or a dict by name). 0 gives ``-log k``; larger values give tasks that
            already perform well less weight.
        decay: the weight ``d`` in [0, 1) of the old average in the moving average
            (0: use the last report only).
        reduction: ``None`` requires scalar losses; ``"mean"`` / ``"sum"`` reduce each loss.
        backend: accepted so that every method is constructed alike; DTP's arithmetic is a few
            operations on K numbers and has no kernel.
        sync: under ``torch.distributed``, ``update_kpis`` averages the reported KPIs over the
            ranks (one ``all_gather`` of K numbers per rank), so every rank has the same
            weights; report on every rank (``False``: each rank keeps its own).
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import DTP
        >>> dtp = DTP(tasks=["depth", "seg"], gamma=1.0)
        >>> dtp.update_kpis({"depth": 0.9, "seg": 0.5})
        >>> dtp.weights  # -(1 - k) log k: 0.1 * 0.105 and 0.5 * 0.693
        tensor([0.0105, 0.3466])
        >>> dtp({"depth": torch.tensor(2.0), "seg": torch.tensor(1.0)})
        tensor(0.3676)
    """

    weights: Tensor
    kpi_average: Tensor
    gamma: Tensor

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        tasks: Sequence[str] | None = None,
        gamma: float | Sequence[float] | Mapping[str, float] = 1.0,
        decay: float = 0.9,
        reduction: Reduction = None,
        backend: Backend = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_tasks, tasks, reduction, backend, sync, process_group)
        if isinstance(decay, bool) or not isinstance(decay, Real) or not 0 <= decay < 1:
            raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
        self.decay = float(decay)
        gammas = self._per_task_numbers(gamma, "gamma", broadcast=True)
        for index, value in enumerate(gammas):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"task {task_label(index, self.tasks)}: gamma is {value}; the focusing "
                    "parameter must be finite and >= 0"
                )
        # Configuration, not state: follows .to(device) but stays out of the checkpoint.
        self.register_buffer("gamma", torch.tensor(gammas), persistent=False)
        self.register_buffer("weights", torch.ones(self.num_tasks))
        self.register_buffer("kpi_average", torch.full((self.num_tasks,), math.nan))
        self.kpi_updates = 0

    def _per_task_numbers(self, values: object, what: str, broadcast: bool) -> list[float]:
        """One float per task from a sequence or a tensor in task order, or a dict; one number
        applies to every task when ``broadcast``."""
        if isinstance(values, Mapping):
            check_names(list(values), self.tasks, what)
            values = [values[name] for name in self.tasks]  # type: ignore[union-attr]
        elif isinstance(values, Tensor):
            if values.dim() > 1:
                raise ValueError(
                    f"{what}: expected one number per task, got a tensor of shape "
                    f"{tuple(values.shape)}"
                )
            # One host read for all K values.
            values = values.detach().cpu().reshape(-1).tolist()
            if len(values) == 1 and self.num_tasks > 1 and not broadcast:
                raise TypeError(f"{what}: expected one number per task, got one number")
        elif isinstance(values, (int, float)) and (broadcast or self.num_tasks == 1):
            values = [values] * self.num_tasks
        elif isinstance(values, Sequence) and not isinstance(values, str):
            values = list(values)
        else:
            raise TypeError(f"{what}: expected one number per task, got {type(values).__name__}")
        if len(values) != self.num_tasks:
            raise ValueError(f"{what}: expected {self.num_tasks} values, got {len(values)}")
        numbers = []
        for index, value in enumerate(values):
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    raise ValueError(
                        f"task {task_label(index, self.tasks)}: {what} has shape "
                        f"{tuple(value.shape)}; give one number per task"
                    )
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"task {task_label(index, self.tasks)}: {what} must be a number, "
                    f"got {type(value).__name__}"
                )
            numbers.append(float(value))
        return numbers

    @torch.no_grad()
    def update_kpis(self, *kpis: KPIs) -> None:
        """Report each task's KPI in [0, 1]: varargs, a list, a ``(K,)`` tensor or a dict."""
        values = self._per_task_numbers(
            kpis[0] if len(kpis) == 1 else list(kpis), "KPI", broadcast=False
        )
        if self._sync.active(self):
            # Every rank's KPIs, checked and averaged alike on every rank: a bad value is an
            # error everywhere (no rank is left waiting in a collective) and the average is
            # bit-identical.
            reported = self._sync.gather(
                torch.tensor(values, dtype=torch.float64, device=self._device())
            )
            for rank, rank_values in enumerate(reported.tolist()):
                self._check_kpis(rank_values, f"rank {rank}: ")
            values = reported.mean(dim=0).tolist()
        else:
            self._check_kpis(values, "")
        current = torch.tensor(values, dtype=self.kpi_average.dtype, device=self._device())
        if self.kpi_updates > 0:
            current = self.decay * self.kpi_average + (1 - self.decay) * current
        # New tensors, not in-place updates: a total computed before may still need the old
        # weights in its backward.
        self.kpi_average = current
        self.weights = reference.dtp_weights(current, self.gamma, KPI_FLOOR)
        self.kpi_updates += 1

    def _check_kpis(self, values: Sequence[float], where: str) -> None:
        for index, value in enumerate(values):
            if not 0 <= value <= 1:
                raise ValueError(
                    f"{where}task {task_label(index, self.tasks)}: KPI is {value}; DTP needs a "
                    "key performance indicator in [0, 1] (accuracy, IoU, ...)"
                )

    def _extra_state(self) -> dict[str, Any]:
        return {"kpi_updates": self.kpi_updates}

    def _checkpoint_faults(self, tensors: dict[str, Any]) -> list[str]:
        faults = self._value_faults(
            "kpi_average",
            tensors.get("kpi_average"),
            "a KPI average lies in [0, 1] (NaN before the first report)",
            lambda value: math.isnan(value) or 0 <= value <= 1,
        )
        faults += self._value_faults(
            "weights",
            tensors.get("weights"),
            "DTP's weights are finite and >= 0",
            lambda value: math.isfinite(value) and value >= 0,
        )
        return faults

    def _set_extra_state(self, state: dict[str, Any]) -> None:
        self.kpi_updates = int(state["kpi_updates"])

    def extra_repr(self) -> str:
        gamma = self.gamma.tolist()
        return f"{super().extra_repr()}, gamma={gamma}, decay={self.decay}"
