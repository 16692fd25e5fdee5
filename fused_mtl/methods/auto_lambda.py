"""``AutoLambda``: task weights meta-learned on a validation loss (Liu et al., TMLR 2022)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fused_mtl._distributed import ProcessGroup
from fused_mtl._losses import check_losses
from fused_mtl.balancer import (
    GradientBalancer,
    LossArgs,
    check_grad_enabled,
    check_number,
    weighted_sum,
)
from fused_mtl.ops.backend import Backend
from fused_mtl.ops.task_gradients import SharedParameters
from fused_mtl.reference import compute_dtype, loss_weights

#: What ``validation`` returns: the validation losses, in any calling convention (summed).
Validation = Callable[[], LossArgs]


class AutoLambda(GradientBalancer):
    r"""Learn each task's weight by how much a step on it lowers a validation loss.

    Auto-Lambda looks one step ahead: with the model's parameters ``theta`` and the weights
    ``lambda``, the virtual step ``theta' = theta - alpha sum_i lambda_i g_i`` and the
    validation loss at ``theta'``, the weights descend

    .. math:: \frac{\partial L_{val}(\theta')}{\partial \lambda_i}
              = -\alpha\, \langle g_i, \nabla L_{val}(\theta')\rangle,

    one Adam step per training step, before the model's: a task whose gradient lowers the
    validation loss gains weight. ``theta'`` is linear in ``lambda``, so this derivative is
    exact; the authors' code approximates the same product by finite differences of the
    training losses at ``theta +- eps nabla L_val`` (two more forward passes). The validation
    loss is the sum of the tasks' losses (the paper's multi-task setting; weight them in the
    closure to favour primary tasks).

    The call: ``total = auto_lambda(losses, validation=closure)``, where ``closure()``
    computes the validation losses from the model (a batch other than the training one: the
    authors draw another batch of the training set) and returns them in any calling
    convention. The call evaluates it at ``theta'`` (the parameters' values are swapped, not
    changed in place, and put back; the closure must call the model itself, not a DDP or
    compiled wrapper), so it costs one forward and one backward more. Without ``validation``
    the training batch serves as its own validation batch at first order (``theta' = theta``:
    ``nabla L_val = sum_j g_j``, no extra pass). The total is ``sum_i lambda_i L_i`` with the
    updated weights; ``weights`` are ``lambda`` (saved in ``state_dict`` with Adam's
    moments), not constrained to be positive (as in the authors' code). ``parameters`` are
    those the virtual step moves and the per-task gradients are taken of: the model's, as in
    the paper (a task's row is 0 on the parameters it does not reach). The closure runs the
    model as it is (in training mode it updates BatchNorm's running statistics and draws
    dropout masks, as the authors' look-ahead does); under ``step_with`` it runs at every
    micro-batch and the step's last one counts. Under ``torch.distributed`` the per-task gradients
    are averaged over the ranks (one ``all_reduce`` of K x P numbers) and, with a closure, the
    derivatives (K numbers); FSDP2-sharded parameters are not supported.

    Args:
        parameters: the model's parameters (those of the virtual step).
        num_tasks: K (may be omitted when ``tasks`` is given).
        lr: Adam's learning rate for the weights (default 1e-4, the authors' for NYU-v2;
            3e-5 for CityScapes, 3e-4 for CIFAR-100).
        init: the weights' start (default 0.1, the authors').
        virtual_lr: ``alpha``, the virtual step's learning rate: your optimizer's (default
            0.1, the authors' SGD; their virtual step also applies its momentum and weight
            decay, left out here).
        tasks: task names; enables calling with a dict and names tasks in errors.
        backend: accepted so that every method is constructed alike.
        per_task_gradients: ``"auto"``, ``"batched"`` or ``"loop"`` (see ``TaskGradients``).
        sync: under ``torch.distributed``, average the per-task gradients over the ranks.
        process_group: the group to sync over (``None``: the default group).

    Example:
        >>> import torch
        >>> from fused_mtl import AutoLambda
        >>> layers = torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
        >>> model = torch.nn.Sequential(*layers)
        >>> auto_lambda = AutoLambda(model.parameters(), 2)
        >>> inputs, validation_inputs = torch.randn(16, 4), torch.randn(16, 4)
        >>> def validation():
        ...     out = model(validation_inputs)
        ...     return [out[:, 0].square().mean(), (out[:, 1] - 1).square().mean()]
        >>> out = model(inputs)
        >>> losses = [out[:, 0].square().mean(), (out[:, 1] - 1).square().mean()]
        >>> _ = auto_lambda.backward(losses, validation=validation)
        >>> auto_lambda.weights.shape
        torch.Size([2])
    """

    _gram_only = False  # it needs the per-task gradients' products with another gradient

    weights: Tensor
    weight_first_moment: Tensor
    weight_second_moment: Tensor
    weight_steps: Tensor

    def __init__(
        self,
        parameters: SharedParameters | None = None,
        num_tasks: int | None = None,
        *,
        lr: float = 1e-4,
        init: float = 0.1,
        virtual_lr: float = 0.1,
        tasks: Sequence[str] | None = None,
        backend: Backend = "auto",
        per_task_gradients: str = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        self.lr = check_number("AutoLambda", "lr", lr, low=0.0, high=1e3, low_open=True)
        self.init = check_number("AutoLambda", "init", init, low=-1e6, high=1e6)
        self.virtual_lr = check_number(
            "AutoLambda", "virtual_lr", virtual_lr, low=0.0, high=1e6, low_open=True
        )
        super().__init__(
            parameters, num_tasks, tasks, backend, per_task_gradients, sync, process_group
        )
        if self._sharded:
            raise NotImplementedError(
                "AutoLambda: FSDP2-sharded parameters are not supported (its virtual step "
                "moves the whole parameters); use DDP"
            )
        options = self._state_options()
        num = self.num_tasks
        self.register_buffer("weights", torch.full((num,), self.init, **options))
        self.register_buffer("weight_first_moment", torch.zeros(num, **options))
        self.register_buffer("weight_second_moment", torch.zeros(num, **options))
        self.register_buffer(
            "weight_steps", torch.zeros((), dtype=torch.float64, device=options.get("device"))
        )

    def forward(self, *losses: LossArgs, validation: Validation | None = None) -> Tensor:
        """One Adam step of the weights, then ``sum_i lambda_i L_i`` with the new ones."""
        reported = self._reported_total(losses, self.weights.device)
        if reported is not None:
            return reported
        stacked, _ = self._graph_losses(losses, self._shared_device())
        window = self._step_call()
        # The stacked losses, not the separate ones: a parameter that a task does not reach (a
        # head of another task) is moved by the virtual step too, and its row there is 0.
        if window is not None:
            task_grads, matrix, _ = self._step_gradients(window, stacked, None)
        else:
            task_grads, matrix = self._task_matrix(stacked, None)
        if validation is None:
            validation_gradient = matrix.sum(dim=0)
            derivative = -self.virtual_lr * (matrix @ validation_gradient)
        else:
            derivative = self._lookahead_derivative(matrix, validation)
        steps = self.weight_steps + 1
        weights, first, second = loss_weights.adam_step(
            self.weights,
            derivative.to(self.weights.dtype),
            self.weight_first_moment,
            self.weight_second_moment,
            steps,
            self.lr,
            0.0,
        )
        self.weights, self.weight_first_moment, self.weight_second_moment = weights, first, second
        self.weight_steps = steps
        current = weights.to(compute_dtype(stacked.dtype))
        total = weighted_sum(current, stacked)
        if window is None:
            return total
        update = current.to(matrix.dtype) @ matrix
        return self._complete_step(total, window, task_grads, current, update)

    def _lookahead_derivative(self, matrix: Tensor, validation: Validation) -> Tensor:
        """``-alpha <g_i, grad L_val(theta')>`` with ``theta'`` the virtual step's."""
        step = -self.virtual_lr * (self.weights.to(matrix.dtype) @ matrix)
        originals = [parameter.data for parameter in self._shared]
        start = 0
        try:
            for parameter in self._shared:
                end = start + parameter.numel()
                moved = parameter.data + step[start:end].reshape(parameter.shape).to(parameter)
                # A new tensor, not an in-place change: the training graph's saved parameters
                # keep their values and versions.
                parameter.data = moved
                start = end
            # Autocast keeps its casts of the parameters for its region: they are of theta.
            torch.clear_autocast_cache()
            with torch.enable_grad():
                stacked, _ = check_losses(
                    (validation(),),
                    num_tasks=self.num_tasks,
                    names=self.tasks,
                    reduction=None,
                    device=self._shared_device(),
                )
                if not stacked.requires_grad:
                    raise ValueError(
                        "AutoLambda: the validation losses have no graph; compute them from "
                        "the model in the closure (not under torch.no_grad(), not detached)"
                    )
                gradients = torch.autograd.grad(
                    stacked.sum(), self._shared, allow_unused=True, materialize_grads=True
                )
        finally:
            for parameter, original in zip(self._shared, originals, strict=True):
                parameter.data = original
            torch.clear_autocast_cache()  # and now of theta', for the region's next forwards
        gradient = torch.cat([grad.detach().reshape(-1) for grad in gradients]).to(matrix.dtype)
        derivative = -self.virtual_lr * (matrix @ gradient)
        return self._sync.mean(derivative) if self._syncing() else derivative

    def backward(self, *losses: LossArgs, validation: Validation | None = None) -> Tensor:
        """``total = self(*losses, validation=validation)``, then ``total.backward()``; returns
        the total, detached."""
        check_grad_enabled(self)
        total = self(*losses, validation=validation)
        total.backward()
        return total.detach()

    def _checkpoint_faults(self, tensors: dict[str, Any]) -> list[str]:
        faults = []
        for name in ("weights", "weight_first_moment"):
            faults += self._value_faults(name, tensors.get(name), "must be finite", math.isfinite)
        return faults + self._value_faults(
            "weight_second_moment",
            tensors.get("weight_second_moment"),
            "Adam's second moment is finite and >= 0",
            lambda value: math.isfinite(value) and value >= 0,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, lr={self.lr}, init={self.init}, virtual_lr={self.virtual_lr}"
        )
