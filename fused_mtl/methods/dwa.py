"""``DWA``: Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019)."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from fused_mtl import reference
from fused_mtl._distributed import ProcessGroup
from fused_mtl._losses import Reduction, as_integer, task_label
from fused_mtl.balancer import LossWeighting
from fused_mtl.ops.backend import Backend


class DWA(LossWeighting):
    r"""Weight each task by how slowly its loss fell over the last two periods.

    With :math:`\bar L_n(e)` task n's mean training loss over period e (an epoch by default),
    the weights of period t are

    .. math:: w_i = K \frac{\exp(r_i / T)}{\sum_n \exp(r_n / T)}, \qquad
              r_n = \bar L_n(t-1) / \bar L_n(t-2)

    and 1 during the first two periods. They sum to K and stay constant within a period.

    Every call in training mode adds the losses (detached) to the period's sums on the device,
    without a host synchronisation; calls in eval mode (validation) do not count. A call with a
    NaN or infinite loss (an fp16 overflow that a ``GradScaler`` skips, say) leaves the state as
    it was, selected on the device: it neither enters the sums nor counts towards the period,
    and the period that it falls in ends with a ``RuntimeWarning`` naming the tasks and how many
    calls were left out (the total of that call is NaN or infinite, as the loss is). A period
    ends when you call ``end_epoch()``, or by itself after ``period_steps`` counted calls.
    Ending a period reads its K means on the host once, to check that they are finite and
    positive (the rates divide by them), and the step count on the call that may end it (after
    a left-out call, on each call until the period ends). Under ``torch.compile`` the forward is
    one graph across period boundaries and reads nothing on the host: a period ended by
    ``period_steps`` inside a compiled region is not checked, and means that are not positive
    give NaN weights (so a NaN total) instead of the error, for as long as the rates use that
    period.

    The period sums, the last two period means and the weights are buffers, and the step and
    period counters (device tensors) are saved in the module's extra state:
    ``load_state_dict(state_dict())`` resumes with bit-identical weights, also in the middle of a
    period.

    Args:
        num_tasks: number of tasks K (may be omitted when ``tasks`` is given).
        tasks: task names; enables calling with a dict and names tasks in errors.
        temperature: T > 0; larger values give weights closer to 1. 2 is the paper's value.
        period_steps: end a period by itself after this many training calls (``None``: call
            ``end_epoch()``).
        reduction: ``None`` requires scalar losses; ``"mean"`` / ``"sum"`` reduce each loss.
        backend: accepted so that every method is constructed alike; DWA's arithmetic is a few
            operations on K numbers per call and has no kernel.
        sync: under ``torch.distributed``, average the losses over the ranks at every training
            call (one ``all_reduce`` of K numbers), so that the period means, and so the
            weights, are those of the whole batch on every rank (``False``: each rank's own).
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import DWA
        >>> dwa = DWA(tasks=["depth", "seg"])
        >>> for epoch_losses in ([2.0, 1.0], [1.0, 1.0]):  # one call per epoch, for brevity
        ...     total = dwa(torch.tensor(epoch_losses))
        ...     dwa.end_epoch()
        >>> dwa.weights  # depth fell by half, seg stalled: seg gets the larger weight
        tensor([0.8756, 1.1244])
    """

    weights: Tensor
    period_loss_sums: Tensor
    period_means: Tensor
    _observes_losses = True
    _host_state = ("_host_steps",)

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        tasks: Sequence[str] | None = None,
        temperature: float = 2.0,
        period_steps: int | None = None,
        reduction: Reduction = None,
        backend: Backend = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_tasks, tasks, reduction, backend, sync, process_group)
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, Real)
            or not (math.isfinite(temperature) and temperature > 0)
        ):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if period_steps is not None:
            period_steps = as_integer("period_steps", period_steps)
        self.temperature = float(temperature)
        self.period_steps = period_steps
        num = self.num_tasks
        self.register_buffer("weights", torch.ones(num))
        self.register_buffer("period_loss_sums", torch.zeros(num))
        # Row 0: the mean losses of the last finished period, t - 1; row 1: of t - 2.
        self.register_buffer("period_means", torch.full((2, num), math.nan))
        # The counters live on the device, so that a compiled forward neither reads the host
        # nor recompiles as they change; they are saved as extra state (plain integers).
        self.register_buffer("step_count", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("period_count", torch.zeros((), dtype=torch.int64), persistent=False)
        # Calls of the current period left out per task for a non-finite loss, for the warning.
        self.register_buffer(
            "nonfinite_calls", torch.zeros(num, dtype=torch.int64), persistent=False
        )
        # The host's copy of step_count in eager calls (None after a compiled call): it tells
        # an eager call that it closes a period, to check the means, without reading the device.
        self._host_steps: int | None = 0

    @property
    def steps_in_period(self) -> int:
        """Training calls in the current period (reads the device)."""
        return int(self.step_count)

    @property
    def periods_finished(self) -> int:
        """Periods ended so far (reads the device)."""
        return int(self.period_count)

    def _observe(self, losses: Tensor) -> None:
        # Every training call with grad counts (LossWeighting.forward): under
        # torch.distributed each must be made on every rank.
        if self._sync.active(self):
            # Every step, not once a period: DDP broadcasts rank 0's buffers at each forward
            # when DWA sits inside the wrapped module, which would overwrite local sums.
            losses = self._sync.mean(losses)
        # A call with a non-finite loss changes nothing, selected on the device (no host read).
        finite_tasks = torch.isfinite(losses)
        finite = finite_tasks.all()
        nonfinite = self.nonfinite_calls + (~finite_tasks).to(torch.int64)
        sums = torch.where(
            finite,
            self.period_loss_sums + losses.to(self.period_loss_sums.dtype),
            self.period_loss_sums,
        )
        steps = self.step_count + finite.to(self.step_count.dtype)
        if self.period_steps is None:
            self.period_loss_sums, self.step_count, self.nonfinite_calls = sums, steps, nonfinite
            return
        closing = steps == self.period_steps
        if torch.compiler.is_compiling():
            # No host read and no branch in a compiled region: every call runs the period's
            # end, selected on the device; means that cannot be used give NaN weights (see
            # _end_period) instead of the eager call's error.
            self._host_steps = None
            self.nonfinite_calls = nonfinite
            self._end_period(sums, steps, closing, sums / steps.clamp_min(1))
            return
        # The host counts calls, an upper bound of the counted ones: a call that may end the
        # period reads the device's count (once a period, and again after a left-out call).
        host_steps = self._host_steps if self._host_steps is not None else int(self.step_count)
        if host_steps + 1 >= self.period_steps:
            host_steps = int(steps) - 1
        if host_steps + 1 < self.period_steps:
            self._host_steps = host_steps + 1
            self.period_loss_sums, self.step_count, self.nonfinite_calls = sums, steps, nonfinite
            return
        if "torch._dynamo" in sys.modules:
            # A compiled training step runs this eager end of a period after a graph break (at
            # backward), and dynamo would compile it anew at every period, whose state is new
            # tensors. Without dynamo loaded nothing can compile it (and importing it here
            # would cost every eager user its import).
            torch.compiler.disable(self._close_period)(sums, steps, closing, nonfinite)
        else:
            self._close_period(sums, steps, closing, nonfinite)

    def _close_period(
        self, sums: Tensor, steps: Tensor, closing: Tensor, nonfinite: Tensor
    ) -> None:
        """The end of a period in eager mode: the host checks, then the new state."""
        # Divided by the host's count, as a period's means always were (on CUDA a division by a
        # host number rounds differently from one by a device tensor, by an ulp).
        means = sums / self.period_steps
        # A rejected call changes nothing: the period closes at the next call instead.
        self._check_period_means(means)
        self._warn_left_out_calls(nonfinite)
        self._host_steps = 0
        self.nonfinite_calls = nonfinite
        self._end_period(sums, steps, closing, means)

    @torch.no_grad()
    def end_epoch(self) -> None:
        """End the current period: its mean losses become ``L(t-1)``; update the weights.

        Reads the step count and the K means on the host: call it outside a compiled region.
        """
        steps = int(self.step_count)
        if steps == 0:
            raise RuntimeError(
                "DWA.end_epoch: no finite training losses since the last period ended; call "
                "the module (or its backward) in training mode during the period"
            )
        means = self.period_loss_sums / steps
        self._check_period_means(means)
        self._warn_left_out_calls(self.nonfinite_calls)
        closing = torch.ones((), dtype=torch.bool, device=self.step_count.device)
        self._end_period(self.period_loss_sums, self.step_count, closing, means)
        self._host_steps = 0

    def _check_period_means(self, means: Tensor) -> None:
        """Raise naming the task whose mean loss over the closing period is not finite and
        positive (one host read of K numbers, once a period)."""
        for index, value in enumerate(means.tolist()):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"task {task_label(index, self.tasks)}: mean loss over period "
                    f"{self.periods_finished} is {value}; DWA's rates L(t-1) / L(t-2) need "
                    "finite, positive losses"
                )

    def _warn_left_out_calls(self, nonfinite: Tensor) -> None:
        """Warn, naming the tasks, when calls of the ending period were left out (one host read
        of K counts, once a period)."""
        counts = nonfinite.tolist()
        if any(counts):
            described = ", ".join(
                f"task {task_label(index, self.tasks)}: {count}"
                for index, count in enumerate(counts)
                if count
            )
            warnings.warn(
                f"DWA: period {self.periods_finished} left out the calls with a non-finite "
                f"loss (calls per task: {described}); its means are those of the other calls",
                RuntimeWarning,
                stacklevel=4,
            )

    def _end_period(self, sums: Tensor, steps: Tensor, closing: Tensor, means: Tensor) -> None:
        """The state after this call, the period (of mean losses ``means``) ended where
        ``closing`` (a 0-dim bool tensor): the same tensor operations whether or not it ends, so
        that a compiled forward is one graph. New tensors, not in-place updates: a total
        computed before may still need the old weights in its backward."""
        self.period_means = torch.where(
            closing, torch.stack([means, self.period_means[0]]), self.period_means
        )
        self.period_count = self.period_count + closing.to(self.period_count.dtype)
        last, before_last = self.period_means
        updated = reference.dwa_weights(last, before_last, self.temperature)
        # Both periods the rates divide by: an unusable one (never checked inside a compiled
        # region) poisons the weights visibly rather than giving finite, wrong ones.
        usable = torch.isfinite(self.period_means).all() & (self.period_means > 0).all()
        updated = torch.where(usable, updated, torch.full_like(updated, math.nan))
        self.weights = torch.where(closing & (self.period_count >= 2), updated, self.weights)
        self.period_loss_sums = torch.where(closing, torch.zeros_like(sums), sums)
        self.step_count = torch.where(closing, torch.zeros_like(steps), steps)
        self.nonfinite_calls = torch.where(
            closing, torch.zeros_like(self.nonfinite_calls), self.nonfinite_calls
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A DWA pickled whole before the counters moved to the device kept them as integers.
        legacy = {
            key: state.pop(key) for key in ("steps_in_period", "periods_finished") if key in state
        }
        super().__setstate__(state)
        if "nonfinite_calls" not in self._buffers:  # pickled before calls could be left out
            self.register_buffer(
                "nonfinite_calls",
                torch.zeros(self.num_tasks, dtype=torch.int64, device=self.weights.device),
                persistent=False,
            )
        if legacy:
            device = self.period_loss_sums.device
            for name, key in (
                ("step_count", "steps_in_period"),
                ("period_count", "periods_finished"),
            ):
                self.register_buffer(
                    name, torch.tensor(int(legacy[key]), device=device), persistent=False
                )
            self._host_steps = int(legacy["steps_in_period"])

    def _extra_state(self) -> dict[str, Any]:
        return {"steps_in_period": self.steps_in_period, "periods_finished": self.periods_finished}

    def _checkpoint_faults(self, tensors: dict[str, Any]) -> list[str]:
        faults = self._value_faults(
            "weights",
            tensors.get("weights"),
            "DWA's weights are finite and >= 0",
            lambda value: math.isfinite(value) and value >= 0,
        )
        faults += self._value_faults(
            "period_loss_sums", tensors.get("period_loss_sums"), "must be finite", math.isfinite
        )
        faults += self._value_faults(
            "period_means",
            tensors.get("period_means"),
            "a finished period's mean losses are finite and positive (NaN: no such period yet)",
            lambda value: math.isnan(value) or (math.isfinite(value) and value > 0),
        )
        extra = tensors.get("_extra_state")
        if isinstance(extra, dict) and "steps_in_period" in extra:
            try:
                steps, periods = int(extra["steps_in_period"]), int(extra["periods_finished"])
            except (KeyError, TypeError, ValueError):
                return [*faults, f"its counters are not integers: {extra!r}"]
            limit = self.period_steps if self.period_steps is not None else math.inf
            if not 0 <= steps < limit or periods < 0:
                faults.append(
                    f"steps_in_period {steps} and periods_finished {periods}: expected "
                    f"0 <= steps_in_period < period_steps ({self.period_steps}) and "
                    "periods_finished >= 0"
                )
        return faults

    def _set_extra_state(self, state: dict[str, Any]) -> None:
        device = self.step_count.device
        self.step_count = torch.tensor(int(state["steps_in_period"]), device=device)
        self.period_count = torch.tensor(int(state["periods_finished"]), device=device)
        self._host_steps = int(state["steps_in_period"])

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, temperature={self.temperature}, "
            f"period_steps={self.period_steps}"
        )
