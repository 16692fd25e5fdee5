"""``FAMO``: fast adaptive multitask optimization (Liu, Liu, Stone & Liu, NeurIPS 2023)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fused_mtl._distributed import ProcessGroup
from fused_mtl._losses import Reduction, per_task_numbers, raise_if_below
from fused_mtl.balancer import LossArgs, LossObjective, check_number, weighted_sum
from fused_mtl.ops.backend import Backend
from fused_mtl.reference import loss_weights


class FAMO(LossObjective):
    r"""Balance the tasks' rates of improvement, in O(1) time and memory per step.

    FAMO keeps logits ``xi`` (``z = softmax(xi)``) and trains with the gradient of
    ``sum_i z_i log(L_i - L*_i)`` scaled to the step ``c``:

    .. math:: d = \sum_i w_i \nabla L_i, \qquad
              w_i = \frac{c\, z_i}{L_i - L^*_i}, \qquad
              c = \Big(\sum_i \frac{z_i}{L_i - L^*_i}\Big)^{-1},

    weights that sum to 1 (``L*``, ``min_losses``, is 0 by default; ``1e-8`` is added to
    ``L_i - L*_i``, as in the authors' code). After the model's step it compares each task's
    log-loss before and after, ``delta_i = log(L_i^t - L^*_i) - log(L_i^{t+1} - L^*_i)``, and
    takes one Adam step (L2 weight decay ``gamma``) on ``xi`` along ``J_z^T delta``: the
    logits of the tasks that improved most go down, so the weights move toward the tasks that
    improve least, until every task's log-loss falls at the same rate.

    The paper's loop gives FAMO the losses after the step, on the same mini-batch::

        total = famo(losses)           # sum_i w_i L_i
        total.backward()
        optimizer.step()
        with torch.no_grad():
            famo.update(task_losses(model(inputs), targets))   # the same batch, new model

    Without ``update`` (one forward less per step), the next training call compares with its
    own losses, which are those of the next mini-batch, before it weights them. ``weights``
    are those of the last training call; eval-mode calls and calls under ``torch.no_grad()``
    (validation) reuse them and change nothing.

    The logits, Adam's moments and step count, and the pending losses are buffers:
    ``load_state_dict(state_dict())`` continues bit-identically. No host synchronisation.

    Args:
        num_tasks: number of tasks K (may be omitted when ``tasks`` is given).
        tasks: task names; enables calling with a dict and names tasks in errors.
        lr: Adam's learning rate on the logits (default 0.025, the authors' value).
        gamma: the logits' weight decay (default 1e-3, LibMTL's value; the authors use 1e-3 to
            1e-2 by benchmark).
        min_losses: ``L*``, each loss's lower bound (one number or one per task; default 0).
        reduction: ``None`` requires scalar losses; ``"mean"`` / ``"sum"`` reduce each loss.
        check_finite: raise naming the task on a NaN or infinite loss, or one below its
            ``min_losses`` (a host read per call).
        backend: accepted so that every method is constructed alike (no kernel).
        sync: under ``torch.distributed``, use the losses averaged over the ranks in the
            weights and in ``update`` (one ``all_reduce`` of K numbers each).
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import FAMO
        >>> famo = FAMO(tasks=["depth", "seg"], lr=0.5)
        >>> for before, after in ([1.0, 1.0], [0.5, 0.95]), ([0.5, 0.95], [0.25, 0.9]):
        ...     _ = famo(torch.tensor(before))
        ...     famo.update(torch.tensor(after))
        >>> famo.task_shares  # depth halves each step, seg barely moves: seg's share grows
        tensor([0.1207, 0.8793])
    """

    weights: Tensor
    logits: Tensor
    min_losses: Tensor
    _host_state = ("_pending",)

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        tasks: Sequence[str] | None = None,
        lr: float = 0.025,
        gamma: float = 1e-3,
        min_losses: float | Sequence[float] = 0.0,
        reduction: Reduction = None,
        check_finite: bool = False,
        backend: Backend = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        rate = check_number("FAMO", "lr", lr, low=0.0, low_open=True)
        decay = check_number("FAMO", "gamma", gamma, low=0.0)
        super().__init__(num_tasks, tasks, reduction, backend, sync, process_group)
        if not (math.isfinite(rate) and math.isfinite(decay)):
            raise ValueError(f"FAMO: lr and gamma must be finite, got {lr!r} and {gamma!r}")
        self.lr, self.gamma = rate, decay
        self.check_finite = bool(check_finite)
        num = self.num_tasks
        floor = per_task_numbers("FAMO", "min_losses", min_losses, num, self.tasks)
        self.register_buffer("min_losses", floor, persistent=False)
        self.register_buffer("logits", torch.zeros(num))
        self.register_buffer("logit_first_moment", torch.zeros(num))
        self.register_buffer("logit_second_moment", torch.zeros(num))
        self.register_buffer("logit_steps", torch.zeros(()))
        # The losses of the last training call, until an update compares them (NaN: none).
        self.register_buffer("pending_losses", torch.full((num,), math.nan))
        self.register_buffer("weights", torch.full((num,), 1 / num))
        # The host's copy of "a call awaits its update", so that no call reads the device.
        self._pending = False

    @property
    def task_shares(self) -> Tensor:
        """``z = softmax(xi)``, the tasks' shares before the division by their losses."""
        return torch.softmax(self.logits, dim=0)

    def _check(self, losses: Tensor) -> None:
        if self.check_finite:
            raise_if_below(
                "FAMO",
                losses,
                self.min_losses.to(losses) - loss_weights.FAMO_EPSILON,
                self.tasks,
                "FAMO takes log(L - min_losses + 1e-8), which needs losses of at least min_losses",
            )

    def _objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        if not self._updates():
            return weighted_sum(self.weights, losses), self.weights
        self._check(losses)
        if self._pending:
            self._update_logits(losses)
        weights = loss_weights.famo_weights(self.logits, losses, self.min_losses)
        self.pending_losses = losses.to(self.pending_losses.dtype)
        self._pending = True
        return weighted_sum(weights, losses), weights

    def _weight_function(self, losses: Tensor) -> Callable[[Tensor], Tensor]:
        # The authors' objective sum_i z_i log(L_i - L*_i + 1e-8) / c, with z and c held at
        # this call's values (their code detaches c). Computed only by a backward that asks
        # for it; the logits are replaced, never changed in place, by a later update.
        logits, floor = self.logits, self.min_losses

        def weights(graph_losses: Tensor) -> Tensor:
            values = losses.to(torch.promote_types(losses.dtype, torch.float32))
            shares = torch.softmax(logits.to(values), dim=-1)
            scale = (shares / (values - floor.to(values) + loss_weights.FAMO_EPSILON)).sum()
            return loss_weights.famo_gradient_weights(graph_losses, shares, scale, floor)

        return weights

    @torch.no_grad()
    def update(self, *losses: LossArgs) -> None:
        """Update the logits from the losses after the model's step (the same mini-batch as
        the last training call, computed again with the new parameters), in any calling
        convention; the next call's weights use them."""
        if not self._pending:
            raise RuntimeError(
                "FAMO.update: no training call awaits an update (call famo(losses) in training "
                "mode first; each call is updated once, by update or by the next call)"
            )
        # It runs under no_grad: it updates whenever the module trains.
        _, seen, _ = self._call_losses(losses, self.training)
        self._check(seen)
        self._update_logits(seen)

    def _update_logits(self, after: Tensor) -> None:
        gradient = loss_weights.famo_logit_gradient(
            self.logits, self.pending_losses, after, self.min_losses
        )
        steps = self.logit_steps + 1
        self.logits, self.logit_first_moment, self.logit_second_moment = loss_weights.adam_step(
            self.logits,
            gradient.to(self.logits.dtype),
            self.logit_first_moment,
            self.logit_second_moment,
            steps,
            self.lr,
            self.gamma,
        )
        self.logit_steps = steps
        self._pending = False

    def _extra_state(self) -> dict[str, Any]:
        return {"pending": self._pending}

    def _set_extra_state(self, state: dict[str, Any]) -> None:
        self._pending = bool(state.get("pending", False))

    def _checkpoint_faults(self, tensors: dict[str, Any]) -> list[str]:
        faults = []
        for name in ("logits", "logit_first_moment", "weights"):
            faults += self._value_faults(name, tensors.get(name), "must be finite", math.isfinite)
        faults += self._value_faults(
            "logit_second_moment",
            tensors.get("logit_second_moment"),
            "Adam's second moment is finite and >= 0",
            lambda value: math.isfinite(value) and value >= 0,
        )
        return faults

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lr={self.lr}, gamma={self.gamma}"
