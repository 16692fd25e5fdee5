"""``Balancer``: the interface every loss-balancing method shares.

A training loop that balances its task losses differs from plain training by one line::

    optimizer.zero_grad()
    total = balancer(losses)            # instead of total = sum(losses)
    total.backward()                    # or scaler.scale(total).backward(), or the engine's
    optimizer.step()

``balancer(losses)`` accepts the task losses in every calling convention of
``fused_mtl._losses`` (varargs, a list, a ``(K,)`` tensor, a dict by task name) and returns the
balanced total. Whatever runs its backward (plain code, a ``GradScaler``, Lightning, DDP, FSDP2)
puts into ``.grad`` the balanced gradient of the model's parameters and, for the balancer's own
parameters, the method's rule. ``balancer.backward(losses)`` is the one-line form: the call and
its backward, returning the total detached. ``balancer.weights`` is the current weight of each
task, shape ``(K,)``.

Switching method is a one-line change of the constructor. Two kinds of method share the rest:

- ``LossWeighting``: the weights depend only on loss values or reported metrics (equal
  weighting, DWA, DTP).
- ``GradientBalancer``: the weights depend on the per-task gradients of shared parameters
  (GradNorm, MGDA). The call computes them (one batched backward pass, or one per task) before it
  returns the total; the total's own backward is then the usual one.

Under ``torch.distributed`` every method balances with the global numbers (the losses and the
per-task gradients of the whole batch, over all ranks) and gives bit-for-bit the same weights on
every rank; see ``fused_mtl._distributed`` and ``docs/distributed.md``.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor, nn

from fused_mtl._distributed import ProcessGroup, TaskSync, is_sharded, unsharded_parameters
from fused_mtl._losses import (
    Reduction,
    check_losses,
    check_reduction,
    listed,
    loss_arguments,
    resolve_tasks,
    task_label,
)
from fused_mtl.ops.backend import Backend, check_backend, requested_backend
from fused_mtl.ops.gram import task_gram_or_norms
from fused_mtl.ops.layer_gram import PER_TASK_GRADIENTS, LayerGramChoice
from fused_mtl.ops.task_gradients import (
    SharedParameters,
    TaskGradients,
    reaches,
    shared_parameters,
    task_graph_roots,
)
from fused_mtl.reference import compute_dtype

__all__ = [
    "Balancer",
    "GradientBalancer",
    "GramBalancer",
    "LossObjective",
    "LossWeighting",
    "SampledGramBalancer",
]

LossArgs = Tensor | Sequence[Tensor] | dict[str, Tensor]

#: Where ``nn.Module`` keeps ``get_extra_state()`` in a state dict.
EXTRA_STATE_KEY = "_extra_state"


#: Training calls in a row after which learned weights that hold a gradient but never change
#: are reported (``Balancer._check_optimized``): more micro-batches than gradient accumulation
#: takes per optimiser step, few enough to be seen early in a run.
UNSTEPPED_CALLS = 50


class Balancer(nn.Module):
    """Base class of the balancing methods: task bookkeeping and the backend choice.

    Subclasses implement ``forward(*losses)`` (the balanced total) and provide ``weights`` (a
    property, a buffer, or the parameter itself when the method learns its weights directly, as
    GradNorm does). ``sync`` and ``process_group`` choose what is communicated under
    ``torch.distributed`` (see ``TaskSync``).
    """

    weights: Tensor

    def __init__(
        self,
        num_tasks: int | None,
        tasks: Sequence[str] | None,
        backend: Backend,
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_tasks, (nn.Module, Tensor)) or (
            isinstance(num_tasks, Iterable) and not isinstance(num_tasks, (str, bytes))
        ):
            name = type(self).__name__
            raise TypeError(
                f"{name} takes no shared parameters: it weights the losses alone. Build it as "
                f"{name}(num_tasks) or {name}(tasks=[...]); got {type(num_tasks).__name__} "
                "where the number of tasks goes"
            )
        self.num_tasks, self.tasks = resolve_tasks(num_tasks, tasks)
        self.backend = check_backend(backend)
        # FUSED_MTL_BACKEND is applied here, once: see requested_backend.
        self._requested_backend = requested_backend(self.backend)
        self._sync = TaskSync(self._configuration(), sync, process_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_sync" not in self.__dict__:  # pickled whole before balancers could sync
            self._sync = TaskSync(self._configuration(), True, None)

    def __getstate__(self) -> dict[str, Any]:
        # What ties the balancer to this process's objects stays behind: the last call's
        # losses (weak references) and the optimizer that ends its steps (a copy is tied to
        # none: call step_with on the new optimizer), with the open step's accumulators.
        state = super().__getstate__()
        for name in ("_last_call", "_step_window", "_steps_by_optimizer"):
            state.pop(name, None)
        return state

    def _configuration(self) -> tuple[str, int, tuple[str, ...] | None]:
        """What every rank must have built alike: the method and its tasks."""
        tasks = tuple(self.tasks) if self.tasks is not None else None
        return type(self).__name__, self.num_tasks, tasks

    def _check_optimized(self, parameter: Tensor, what: str) -> None:
        """Warn once when ``parameter`` (the method's learned weights) has held a gradient and
        not changed for ``UNSTEPPED_CALLS`` training calls in a row: no optimiser steps it, and
        the method's weights stay where they started. Called at the start of a training call,
        then ``_seen_at`` after the method's own in-place updates. Host-side reads only (the
        parameter's version counter), and nothing while compiling."""
        if torch.compiler.is_compiling() or getattr(self, "_warned_unstepped", False):
            return
        unchanged = parameter._version == getattr(self, "_seen_version", None)
        if parameter.grad is not None and unchanged:
            self._unstepped_calls = getattr(self, "_unstepped_calls", 0) + 1
        else:
            self._unstepped_calls = 0
        if self._unstepped_calls >= UNSTEPPED_CALLS:
            self._warned_unstepped = True
            warnings.warn(
                f"{type(self).__name__}: its {what} received gradients but have not changed in "
                f"{UNSTEPPED_CALLS} training calls: no optimizer steps them. Give the optimizer "
                "the balancer's parameters too, e.g. "
                "torch.optim.Adam([*model.parameters(), *balancer.parameters()])",
                UserWarning,
                stacklevel=3,
            )

    def _seen_at(self, parameter: Tensor) -> None:
        if not torch.compiler.is_compiling():
            self._seen_version = parameter._version

    # --- dtype ------------------------------------------------------------------------------
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        """``nn.Module._apply`` (``.to()``, ``.half()``, ``.bfloat16()``, ...), except that the
        balancer's floating-point state never goes below float32: ``model.to(torch.bfloat16)``
        (Lightning's ``"bf16-true"``) moves it, and keeps its dtype. Counters, running means
        and learned log-variances in bfloat16 stop at 256 steps and round weights to 3 digits;
        ``weighted_sum`` promotes the total, so the model's half-precision losses still mix
        with it."""

        def keep_precision(tensor: Tensor) -> Tensor:
            applied = fn(tensor)
            if (
                tensor.is_floating_point()
                and applied.is_floating_point()
                and torch.finfo(applied.dtype).bits < 32
                and torch.finfo(tensor.dtype).bits >= 32
            ):
                return tensor.to(device=applied.device)
            return applied

        return super()._apply(keep_precision, recurse)

    # --- which calls change the state -------------------------------------------------------
    # A training call (training mode, grad enabled) is a step of the method: it may change its
    # state. Two kinds of call are not a step of their own:
    # - a call with the very loss tensors of the previous training call (logging the total
    #   again): it returns that call's total, or the same total with the weights in force, and
    #   changes nothing;
    # - under ``step_with(optimizer)``, every call after the first between two optimizer steps
    #   (gradient accumulation): the step is computed again from the state at the step's
    #   start, with the mean of the step's losses (and, for the gradient methods, the sum of
    #   its per-task gradients), so that the state advances once per optimizer step.

    def _updates(self) -> bool:
        """Whether this call may change the method's state: training mode, grad enabled, and
        not a repeat of the previous call (see above)."""
        return self.training and torch.is_grad_enabled() and not self.__dict__.get("_replaying")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # One iterable of losses (a dict's values(), a generator) is read here, once: the
        # repeated-call check below sees its tensors, and forward a list.
        args = loss_arguments(args)
        if torch.compiler.is_compiling() or not (self.training and torch.is_grad_enabled()):
            return super().__call__(*args, **kwargs)
        tensors = _uncompiled(_call_tensors)(args, kwargs)
        last = self.__dict__.get("_last_call")
        if last is not None and _uncompiled(_same_tensors)(last[0], tensors):
            total = last[1]()
            if total is not None:
                return total
            self._replaying = True
            try:
                return super().__call__(*args, **kwargs)
            finally:
                self._replaying = False
        window = self.__dict__.get("_step_window")
        counted = dict(window.__dict__) if window is not None else None
        try:
            total = super().__call__(*args, **kwargs)
        except BaseException:
            # A call that raises is not one of the optimizer step's micro-batches: the step's
            # count and sums are put back (a retried call is then counted once).
            if window is not None:
                window.__dict__.update(counted)
            self.__dict__["_step_window"] = window
            raise
        if tensors and isinstance(total, Tensor):
            self._last_call = ([weakref.ref(t) for t in tensors], weakref.ref(total))
        return total

    def step_with(self, optimizer: torch.optim.Optimizer) -> Any:
        """Take one step of the method per ``optimizer.step()``: the training calls between two
        optimizer steps are the micro-batches of one step (gradient accumulation).

        Each call then weights its micro-batch with the weights of the step's micro-batches so
        far: the mean of their losses, and, for the gradient methods, the sum of their per-task
        gradients, whose update the call completes in the shared parameters' gradient (so that
        after the last micro-batch it is the update of the whole batch). The method's state
        (FAMO's logits, MoCo's tracked gradients, RLW's draw, ...) advances once per optimizer
        step. Scale the total by the number of micro-batches, not the losses: ``(balancer(
        losses) / accumulation).backward()``. Returns a handle whose ``remove()`` goes back to
        one step per training call; ``end_step()`` ends a step by hand (an optimizer without
        step hooks). A pickled or copied balancer is tied to no optimizer. See the guide's
        gradient accumulation section.
        """
        owner = weakref.ref(self)

        def end_step(*_: Any) -> None:
            balancer = owner()
            if balancer is not None:
                balancer.end_step()

        handle = StepHandle(self, optimizer.register_step_post_hook(end_step))
        self._steps_by_optimizer = True
        self.end_step()
        return handle

    def end_step(self) -> None:
        """End the current step: the next training call starts a new one (see ``step_with``).
        Called by the optimizer's step hook that ``step_with`` registers."""
        self._step_window = None

    def _step_call(self) -> StepWindow | None:
        """This training call's place in the optimizer step under ``step_with`` (``None``
        otherwise): at the step's first call, the state is recorded; at each later call it is
        put back, so that the call computes the step again from its start."""
        if not self.__dict__.get("_steps_by_optimizer") or not self._updates():
            return None
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"{type(self).__name__}: step_with(optimizer) keeps the step's micro-batches on "
                "the host, which torch.compile cannot trace; compile the model alone and call "
                "the balancer outside the compiled function"
            )
        window = self.__dict__.get("_step_window")
        if window is not None:
            for name, value in window.start.items():
                setattr(self, name, value)
            if any(parameter.grad is None for parameter in getattr(self, "_shared", ())):
                # The gradients were set to None since the step's last micro-batch without an
                # optimizer step (a GradScaler skipped it, then zero_grad): that step is
                # dropped, and this call starts a new one from the same state.
                window = None
        if window is None:
            window = self._step_window = StepWindow(self._step_state())
        window.calls += 1
        return window

    #: Host-side attributes that are part of a method's state (besides its buffers).
    _host_state: tuple[str, ...] = ()

    def _step_state(self) -> dict[str, Any]:
        """The state a step starts from: the buffers (replaced, never changed in place, by
        every method's step) and the host-side attributes of ``_host_state``."""
        state: dict[str, Any] = dict(self._buffers)
        state.update({name: self.__dict__[name] for name in self._host_state})
        return state

    def _syncing(self) -> bool:
        """Whether a training call communicates (distributed, more than one rank, sync on)."""
        return self.training and torch.is_grad_enabled() and self._sync.active(self)

    def _shared_random(self, draw: Tensor) -> Tensor:
        """``draw`` (random numbers of this call), the same on every rank when syncing; under
        ``step_with``, the draw of the optimizer step's first call (one draw per step)."""
        window = self.__dict__.get("_step_window")
        if window is not None and window.draw is not None:
            return window.draw
        draw = self._sync.from_first_rank(draw) if self._syncing() else draw
        if window is not None:
            window.draw = draw
        return draw

    def set_process_group(self, process_group: ProcessGroup | None) -> None:
        """Sync over ``process_group`` from now on (``None``: the default group); for example
        after loading a balancer pickled whole with ``torch.save``, which cannot keep one."""
        self._sync.set_process_group(process_group)

    # --- checkpoints -----------------------------------------------------------------------
    # The task names travel in the module's extra state, and a checkpoint is checked before any
    # of it loads: the names (a checkpoint of tasks in another order would give each task
    # another's weights), then the values (``_checkpoint_faults``). A fault is reported like
    # torch's own size mismatches (a RuntimeError from ``load_state_dict`` naming the
    # balancer), and nothing of the balancer changes.

    def _extra_state(self) -> dict[str, Any]:
        """What a method saves beside its tensors (counters), merged into the extra state."""
        return {}

    def _set_extra_state(self, state: dict[str, Any]) -> None:
        """Load what ``_extra_state`` saved."""

    def _checkpoint_faults(self, tensors: dict[str, Any]) -> list[str]:
        """What is wrong with the values of a checkpoint (the entries of this module, by name
        without prefix); one line per fault, naming the entry and the task."""
        return []

    def _value_faults(self, what: str, values: object, allowed: str, accept: Any) -> list[str]:
        """The first task whose checkpoint value fails ``accept`` (a float -> bool test), as a
        line for ``_checkpoint_faults``; ``allowed`` says what is expected. A missing entry or
        one of another shape is left to torch's own report."""
        if not isinstance(values, Tensor) or values.dim() == 0:
            return []
        if values.shape[-1] != self.num_tasks:
            return []
        values = values.detach()
        if hasattr(values, "full_tensor"):
            # A DTensor (the balancer inside an FSDP2 module): every rank loads, so every rank
            # gathers the same values and reaches the same verdict.
            values = values.full_tensor()
        for row in values.double().cpu().reshape(-1, self.num_tasks).tolist():
            for index, value in enumerate(row):
                if not accept(value):
                    label = task_label(index, self.tasks)
                    return [f"{what} of task {label} is {value}; {allowed}"]
        return []

    def _simplex_faults(self, name: str, tensors: dict[str, Any]) -> list[str]:
        """``_value_faults`` for weights on the probability simplex (MoCo, SDMGrad, MoDo)."""
        return self._value_faults(
            name,
            tensors.get(name),
            f"{type(self).__name__}'s weights are on the simplex (in [0, 1])",
            lambda value: 0 <= value <= 1,
        )

    def get_extra_state(self) -> dict[str, Any]:
        tasks = list(self.tasks) if self.tasks is not None else None
        return {"tasks": tasks, **self._extra_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._set_extra_state(state)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        own = {
            key[len(prefix) :]: value
            for key, value in state_dict.items()
            if key.startswith(prefix) and "." not in key[len(prefix) :]
        }
        faults = self._checkpoint_names_fault(own.get(EXTRA_STATE_KEY))
        faults = faults or self._checkpoint_faults(own)
        if faults:
            error_msgs.extend(f"{type(self).__name__} checkpoint: {fault}" for fault in faults)
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if EXTRA_STATE_KEY not in own and prefix + EXTRA_STATE_KEY in missing_keys:
            # Saved before the names were: it loads as before.
            missing_keys.remove(prefix + EXTRA_STATE_KEY)

    def _checkpoint_names_fault(self, extra: object) -> list[str]:
        saved = extra.get("tasks") if isinstance(extra, dict) else None
        if saved is None or self.tasks is None or list(saved) == list(self.tasks):
            return []
        if sorted(saved) == sorted(self.tasks):
            return [
                f"its tasks are in another order: saved {listed(saved)}, this module has "
                f"{listed(self.tasks)}; build it with tasks in the saved order (each task's "
                "state would otherwise go to another task)"
            ]
        return [f"its tasks are {listed(saved)}, this module's are {listed(self.tasks)}"]

    def forward(self, *losses: LossArgs) -> Tensor:
        """The balanced total (0-dim) of the task losses, given in any calling convention
        (positional tensors, a list, one ``(K,)`` tensor, a dict by task name); its backward
        trains the model and the balancer's own parameters by the method's rule."""
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def backward(self, *losses: LossArgs) -> Tensor:
        """``total = self(*losses)``, then ``total.backward()``; returns the total, detached.

        The one-line form of a training step's balancing: the call (which, for a gradient
        method, computes the per-task gradients and the weights) and the total's backward.
        Raises under ``torch.no_grad()``, where there is no graph to back-propagate."""
        check_grad_enabled(self)
        total = self(*losses)
        total.backward()
        return total.detach()

    def extra_repr(self) -> str:
        tasks = self.tasks if self.tasks is not None else self.num_tasks
        return f"tasks={tasks}, backend={self.backend!r}"


class StepHandle:
    """What ``Balancer.step_with`` returns: ``remove()`` unties the balancer from the
    optimizer (one step per training call again)."""

    def __init__(self, balancer: Balancer, hook: Any) -> None:
        self._balancer = weakref.ref(balancer)
        self._hook = hook

    def remove(self) -> None:
        self._hook.remove()
        balancer = self._balancer()
        if balancer is not None:
            balancer._steps_by_optimizer = False
            balancer.end_step()


class StepWindow:
    """The micro-batches of one optimizer step so far (see ``Balancer.step_with``)."""

    def __init__(self, start: dict[str, Any]) -> None:
        self.start = start  # the method's state at the step's start
        self.calls = 0
        self.loss_sum: Tensor | None = None  # the sum of the calls' (K,) losses
        # Gradient methods: the sum of the calls' (K, P) per-task gradients, and what the
        # calls so far put into the shared parameters' gradient (a function of it).
        self.gradient_sum: Tensor | None = None
        self.deposited: Tensor | None = None
        self.draw: Tensor | None = None  # the step's random draw (RLW, PCGrad's order, ...)

    def mean_losses(self, losses: Tensor) -> Tensor:
        """Add this call's detached losses; the mean of the step's losses so far."""
        self.loss_sum = losses if self.loss_sum is None else self.loss_sum + losses
        return self.loss_sum / self.calls


def _uncompiled(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` kept out of Dynamo once Dynamo is loaded.

    The call bookkeeping runs only in eager calls (``Balancer.__call__`` skips it when traced),
    but Dynamo may run a balancer call eagerly inside a compiled function (a graph break in it)
    and would then compile the helpers as frames of their own, guarded on the very tensors they
    compare: a recompile at every call. Without Dynamo loaded nothing can compile them, and
    ``import fused_mtl`` does not load it (nor triton with it).
    """
    if "torch._dynamo" not in sys.modules:
        return function
    uncompiled = _UNCOMPILED.get(function)
    if uncompiled is None:
        uncompiled = _UNCOMPILED[function] = torch.compiler.disable(function)
    return uncompiled


_UNCOMPILED: dict[Callable[..., Any], Callable[..., Any]] = {}


def _call_tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    """The tensors a call was given (its losses, in whatever convention, and keywords)."""
    found: list[Tensor] = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, dict):
            found.extend(_call_tensors(tuple(value.values()), {}))
        elif isinstance(value, (list, tuple)):
            found.extend(_call_tensors(tuple(value), {}))
    return found


def _same_tensors(references: list[weakref.ref[Tensor]], tensors: list[Tensor]) -> bool:
    """Whether ``tensors`` are the very tensors of ``references``, one of them with a graph
    (the losses of one forward pass; constants given again are new calls)."""
    return (
        len(references) == len(tensors) > 0
        and any(tensor.requires_grad for tensor in tensors)
        and all(
            reference() is tensor for reference, tensor in zip(references, tensors, strict=True)
        )
    )


def check_grad_enabled(balancer: Balancer) -> None:
    if not torch.is_grad_enabled():
        raise RuntimeError(
            f"{type(balancer).__name__}.backward was called with grad disabled "
            "(torch.no_grad() or torch.inference_mode()): there is no graph to back-propagate; "
            "call it where the losses were computed with grad, or call the balancer itself "
            "(balancer(losses)) to get the total without a backward"
        )


def weighted_sum(weights: Tensor, losses: Tensor) -> Tensor:
    """``sum_i w_i L_i`` in the promoted dtype (float32 for half-precision losses)."""
    dtype = torch.promote_types(weights.dtype, losses.dtype)
    return (weights.to(dtype) * losses.to(dtype)).sum()


class LossWeighting(Balancer):
    """A method whose weights come from loss values or metrics, not from gradients.

    ``forward`` stacks the losses, returns ``sum_i w_i L_i`` with ``w = self.weights`` held
    constant, and then lets the method see them (``_observe``, in training mode only: DWA
    averages them and may end a period, whose new weights apply from the next call). The
    methods keep their state in buffers on the module's device: move the module with
    ``.to(device)`` like a model.
    """

    def __init__(
        self,
        num_tasks: int | None,
        tasks: Sequence[str] | None,
        reduction: Reduction,
        backend: Backend,
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_tasks, tasks, backend, sync, process_group)
        self.reduction = check_reduction(reduction)

    #: Whether ``_observe`` learns from the losses (DWA): its state then takes part in syncs.
    _observes_losses = False

    def _device(self) -> torch.device:
        return self.weights.device

    def _observe(self, losses: Tensor) -> None:
        """Called with the detached ``(K,)`` losses of each training-mode call."""

    def _stacked(self, losses: tuple[object, ...]) -> Tensor:
        """The ``(K,)`` losses of a call, checked and reduced, on the module's device."""
        stacked, _ = check_losses(
            losses,
            num_tasks=self.num_tasks,
            names=self.tasks,
            reduction=self.reduction,
            device=self._device(),
        )
        return stacked

    def forward(self, *losses: LossArgs) -> Tensor:
        """The weighted total (0-dim) of the task losses, in any calling convention."""
        stacked = self._stacked(losses)
        updates = self._updates()
        if updates and self._observes_losses:
            # Under torch.distributed the first sync loads rank 0's state into the buffers:
            # before the weights are used (nothing is communicated after the first call).
            self._sync.active(self)
        window = self._step_call()
        # The weights in force for this call: a call that ends a period (DWA) is still one of
        # its calls, and the next period's weights start with the next call.
        total = weighted_sum(self.weights, stacked)
        # Only steps are seen: not a validation pass under torch.no_grad() through a balancer
        # that model.eval() does not reach, nor a repeated call. A step of several
        # micro-batches is seen once, with their mean losses.
        if updates:
            seen = stacked.detach()
            self._observe(window.mean_losses(seen) if window is not None else seen)
        return total

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reduction={self.reduction!r}"


class LossObjective(LossWeighting):
    """A method whose total is a function ``f(L)`` of this call's losses (GLS, STCH, FAMO, RLW).

    Subclasses implement ``_objective(losses) -> (value, weights)``: ``f`` and its gradient
    ``w_i = df / dL_i`` at the detached losses. The call returns a total whose value is ``f``
    and whose gradient is ``sum_i w_i grad L_i``, the gradient of ``f(L)`` itself. Under
    ``torch.distributed`` (``sync=True``) the losses are first averaged over the ranks (one
    ``all_reduce`` of K numbers): every rank then has the value and weights of the whole batch,
    and DDP's average of the ranks' gradients is the gradient on the whole batch, which a
    nonlinear ``f`` of each rank's own losses would not give. ``weights`` are those of the last
    training call with grad enabled; eval-mode calls and calls under ``torch.no_grad()`` (a
    validation pass through a balancer that ``model.eval()`` does not reach) compute the total
    and change nothing.

    A method whose weights depend on the losses (a nonlinear ``f``) also implements
    ``_weight_function(losses)``: the weights as a differentiable function of the losses.
    A backward with ``create_graph=True`` (a gradient penalty, a meta-learning outer loop)
    takes the weights from it, so that the second derivatives are those of ``f``; a plain
    backward uses the weights of ``_objective``, as they are.
    """

    #: Whether the objective needs the losses over all ranks (not a linear one, RLW's).
    _syncs_losses = True

    def _objective(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _weight_function(self, losses: Tensor) -> Callable[[Tensor], Tensor] | None:
        """``L -> w(L)``, the weights of this call as a differentiable function of the losses
        (``losses``: where ``_objective`` was evaluated); ``None`` where they do not depend on
        the losses (RLW's draw, a call that only reports)."""
        return None

    def _call_losses(
        self, losses: tuple[object, ...], updates: bool
    ) -> tuple[Tensor, Tensor, bool]:
        """The ``(K,)`` losses of this call, their detached values (over all ranks when the
        call ``updates`` the method's state and syncs), and whether they were synced."""
        stacked = self._stacked(losses)
        seen = stacked.detach()
        syncing = self._syncs_losses and updates and self._sync.active(self)
        return stacked, self._sync.mean(seen) if syncing else seen, syncing

    def forward(self, *losses: LossArgs) -> Tensor:
        """The method's total (0-dim) of the task losses, in any calling convention."""
        updates = self._updates()
        stacked, seen, synced = self._call_losses(losses, updates)
        window = self._step_call()
        if window is not None:
            # A micro-batch: the objective at the mean losses of the step's micro-batches.
            seen = window.mean_losses(seen)
        value, weights = self._objective(seen)
        if updates:
            self.weights = weights
        if torch.compiler.is_compiling() or not stacked.requires_grad:
            # Compiled graphs take first derivatives only (AOTAutograd has no double backward).
            return objective_total(value, weights, stacked)
        function = self._weight_function(seen) if updates else None
        if function is not None and (synced or window is not None):
            function = _no_second_derivatives(type(self).__name__, synced)
        return _ObjectiveTotal.apply(stacked, value, weights, function)


def objective_total(value: Tensor, weights: Tensor, losses: Tensor) -> Tensor:
    """A total equal to ``value`` whose gradient is ``sum_i w_i grad L_i`` (``weights``
    detached): ``value + sum_i w_i (L_i - L_i)``, whose second term is exactly 0."""
    return value.detach() + weighted_sum(weights.detach(), losses - losses.detach())


class _ObjectiveTotal(torch.autograd.Function):
    """``objective_total``, the same numbers, whose backward under ``create_graph=True`` takes
    the weights from the method's weight function of the saved losses: the gradient
    ``sum_i w_i(L) grad L_i`` is then differentiable in the losses, and its derivative holds
    ``d^2 f / dL_i dL_j`` besides the terms through ``grad L_i``. A plain backward multiplies
    by the saved weights, in the dtype of ``objective_total``'s product: the same bits."""

    @staticmethod
    def forward(
        ctx: Any,
        losses: Tensor,
        value: Tensor,
        weights: Tensor,
        function: Callable[[Tensor], Tensor] | None,
    ) -> Tensor:
        ctx.function = function
        ctx.save_for_backward(losses, weights)
        return value + weighted_sum(weights, losses - losses)

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor, None, None, None]:
        losses, weights = ctx.saved_tensors
        dtype = torch.promote_types(weights.dtype, losses.dtype)
        if ctx.function is not None and torch.is_grad_enabled():  # create_graph=True
            weights = ctx.function(losses)
        gradient = grad_total.to(dtype) * weights.to(dtype)
        return gradient.to(losses.dtype), None, None, None


def _no_second_derivatives(name: str, synced: bool) -> Callable[[Tensor], Tensor]:
    """The weight function of a call whose weights come from other losses than its own (the
    mean over ranks, or over the optimizer step's micro-batches): a backward with
    ``create_graph=True`` is refused rather than given the second derivatives of another
    function."""
    where = (
        "the losses averaged over the ranks (sync=True)"
        if synced
        else "the mean losses of the optimizer step's micro-batches (step_with)"
    )

    def refuse(losses: Tensor) -> Tensor:
        raise RuntimeError(
            f"{name}: a backward with create_graph=True needs the weights as a function of "
            f"this call's losses, but they come from {where}; for second derivatives, build "
            f"it with sync=False or call it without step_with"
        )

    return refuse


class GradientBalancer(Balancer):
    """A method whose weights come from the per-task gradients of shared parameters.

    Holds the shared parameters (referenced, not registered: they are the model's) and the
    ``TaskGradients`` that computes their per-task gradients; see ``gradient_mode``.

    Calling the module in training mode with grad enabled computes the per-task gradients (one
    extra batched backward pass, or K, over the part of the graph that reaches the shared
    parameters; a plain sum has none), updates the weights and returns the balanced total; its
    backward is the ordinary one. In eval mode or under ``torch.no_grad()`` the call returns
    ``sum_i w_i L_i`` with the current weights and changes nothing.
    """

    #: Whether the method needs the per-task gradients only through their Gram (or norms): it
    #: can then take the Gram one shared layer at a time (``per_task_gradients="layers"``).
    _gram_only = True

    def __init__(
        self,
        shared: SharedParameters | None,
        num_tasks: int | None,
        tasks: Sequence[str] | None,
        backend: Backend,
        per_task_gradients: str,
        sync: bool = True,
        process_group: ProcessGroup | None = None,
        gram_by_layer: bool = False,
    ) -> None:
        super().__init__(num_tasks, tasks, backend, sync, process_group)
        parameters, names = shared_parameters(shared) if shared is not None else ([], [])
        requested = "layers" if gram_by_layer else per_task_gradients
        #: Whether the Gram must come from the layers (``per_task_gradients="layers"``).
        self.gram_by_layer = requested == "layers"
        if requested not in PER_TASK_GRADIENTS:
            raise ValueError(
                f"per_task_gradients must be one of {PER_TASK_GRADIENTS}, got {requested!r}"
            )
        if requested == "layers" and not isinstance(shared, nn.Module):
            raise TypeError(
                "per_task_gradients='layers' (gram_by_layer=True) needs the shared layers as a "
                f"module (e.g. model.trunk), whose layers it hooks; got {type(shared).__name__}"
            )
        if requested == "layers" and not self._gram_only:
            raise ValueError(
                f"{type(self).__name__} needs the per-task gradients themselves, not only their "
                "Gram: per_task_gradients='layers' (gram_by_layer=True) cannot give them; use "
                "'auto', 'batched' or 'loop'"
            )
        self._layer_gram = (
            LayerGramChoice(shared, requested)
            if requested in ("auto", "layers") and isinstance(shared, nn.Module) and self._gram_only
            else None
        )
        self._shared = parameters
        # FSDP2 shards parameters into DTensors: their gradients are taken on the unsharded copy.
        self._sharded = any(is_sharded(parameter) for parameter in parameters)
        if self._layer_gram is not None and self._sharded:
            self._layer_gram.engine.resolve = unsharded_parameters
        self._task_gradients = TaskGradients(
            parameters, names, "auto" if requested == "layers" else requested
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_sharded" not in self.__dict__:  # pickled whole before FSDP2 support
            self._sharded = any(is_sharded(parameter) for parameter in self._shared)

    def _state_options(self) -> dict[str, Any]:
        """The device and dtype of a method's state: the shared parameters', at least float32
        (a float64 model keeps float64 state; a bfloat16 one's sums of squared gradients
        would lose their low bits), the defaults when none were given."""
        if not self._shared:
            return {}
        dtype = torch.promote_types(self._shared[0].dtype, torch.float32)
        return {"device": self._shared[0].device, "dtype": dtype}

    def _layers_active(self) -> bool:
        """Whether the Gram comes from the layers (``LayerGramChoice``) at the next call."""
        layer_gram = getattr(self, "_layer_gram", None)
        return layer_gram is not None and layer_gram.active

    @property
    def gradient_mode(self) -> str | None:
        """``"layers"``, ``"batched"`` or ``"loop"`` once chosen on the first call (``None``
        before)."""
        if self._layers_active():
            return "layers" if self._layer_gram.checked else None
        return self._task_gradients.mode

    @property
    def gradient_mode_reason(self) -> str:
        """Why ``gradient_mode`` was chosen (the batched backward's failure, for example)."""
        layer_gram = getattr(self, "_layer_gram", None)
        if layer_gram is None:
            return self._task_gradients.reason
        if layer_gram.active:
            return layer_gram.reason
        return f"{layer_gram.reason}; {self._task_gradients.reason}"

    def _shared_device(self, alternative: str = "") -> torch.device:
        """The shared parameters' device; an error when none were given (``alternative``: what
        else the method accepts, said first)."""
        if not self._shared:
            name = type(self).__name__
            raise ValueError(
                f"{name}: no shared parameters were given at construction; {alternative}"
                f"construct {name}(shared_parameters, ...)"
            )
        return self._shared[0].device

    def _check_features(self, features: object) -> torch.device:
        """``features=z`` (a shared representation, MGDA-UB's and NTKMTL-SR's): a
        floating-point tensor that the losses are computed from; its device."""
        name = type(self).__name__
        if not isinstance(features, Tensor) or not features.is_floating_point():
            raise TypeError(
                f"{name}: features must be a floating-point tensor, got "
                f"{getattr(features, 'dtype', type(features).__name__)}"
            )
        if not features.requires_grad:
            raise ValueError(
                f"{name}: features does not require grad; pass the shared representation "
                "z that the task losses are computed from (not detached)"
            )
        return features.device

    def _reported_total(self, losses: tuple[object, ...], device: torch.device) -> Tensor | None:
        """``sum_i w_i L_i`` with the current weights when the call only reports (eval mode or
        grad disabled); ``None`` when it balances."""
        if self._updates():
            return None
        stacked, _ = check_losses(
            losses, num_tasks=self.num_tasks, names=self.tasks, reduction=None, device=device
        )
        return weighted_sum(self.weights.detach(), stacked)

    def _graph_losses(
        self, losses: tuple[object, ...], device: torch.device
    ) -> tuple[Tensor, list[Tensor] | None]:
        """The ``(K,)`` losses (and the separate ones), which must carry a graph."""
        stacked, separate = check_losses(
            losses, num_tasks=self.num_tasks, names=self.tasks, reduction=None, device=device
        )
        if not stacked.requires_grad:
            raise ValueError(
                f"{type(self).__name__}: no task loss requires grad; compute the losses "
                "from the model's outputs (not under torch.no_grad() and not detached)"
            )
        # Every call, in every mode: a task whose loss has no graph has no gradient, and would
        # read as a zero one (MGDA would give it all the weight).
        roots = task_graph_roots(stacked, separate)
        for index, root in enumerate(roots or ()):
            if root is None:
                raise ValueError(
                    f"{type(self).__name__}: task {task_label(index, self.tasks)}: its loss has "
                    "no graph (a constant, a detached tensor, or computed under "
                    "torch.no_grad()); compute every task's loss from the model's outputs"
                )
        return stacked, separate

    def _task_gram(
        self,
        gradients: TaskGradients,
        losses: Tensor,
        separate: list[Tensor] | None,
        diagonal: bool,
        features: Tensor | None = None,
        names: Sequence[str] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The Gram matrix ``(K, K)`` (``diagonal``: the norms ``(K,)``) of the per-task
        gradients, and the detached losses: over all ranks when syncing, else this process's.

        ``features``: a tensor to differentiate instead of the shared parameters (MGDA-UB),
        whose rows are this rank's own samples. ``names``: one per loss, when the losses are
        not the K tasks' (several mini-batches of them); the task names by default.
        """
        syncing = self._syncing()
        agree = self._sync.smallest if syncing else None
        parameters = unsharded_parameters(self._shared) if self._sharded else None
        if self._layers_active() and features is None and names is None:
            gradients.check_trainable(parameters or self._shared)
            self._check_reached(losses, separate, parameters or self._shared)
            gram = self._layer_gram(
                losses,
                parameters or self._shared,
                self._sync.shard_gram if syncing else None,
                agree,
            )
            if gram is not None:
                current = losses.detach()
                if syncing:
                    gram, current = self._sync.summed_gram(gram, current)
                if diagonal:  # the norms in the gradients' compute dtype, as the fused op's
                    norms = gram.diagonal().clamp(min=0).sqrt()
                    return norms.to(compute_dtype(self._shared[0].dtype)), current
                return gram, current
        inputs = [features] if features is not None else parameters
        names = names if names is not None else self.tasks
        task_grads = gradients(losses, names, separate, inputs, agree)
        if not syncing:
            gram = task_gram_or_norms(task_grads, diagonal, self._requested_backend)
            return gram, losses.detach()
        if features is not None:
            local = task_gram_or_norms(task_grads, diagonal, self._requested_backend)
            return self._sync.gram_of_samples(local, losses)
        return self._sync.gram(task_grads, losses, diagonal, self._requested_backend)

    def _check_reached(
        self, losses: Tensor, separate: list[Tensor] | None, parameters: Sequence[Tensor]
    ) -> None:
        """On the layers' first call: a task whose loss the graph shows not reaching the shared
        parameters is named, as the per-task gradients' first call names it."""
        if self._layer_gram.checked:
            return
        roots = task_graph_roots(losses, separate)
        for index, root in enumerate(roots or ()):
            if not reaches(root, parameters):
                raise ValueError(
                    f"task {task_label(index, self.tasks)}: its loss does not depend on the "
                    "shared parameters (choose parameters that all tasks use)"
                )

    def _step_gradients(
        self, window: StepWindow, losses: Tensor, separate: list[Tensor] | None
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """A micro-batch's per-task gradients (this rank's, per parameter) added to its step's
        (``step_with``); returns them, the mean ``(K, P)`` per-task gradients of the step's
        micro-batches so far (over all ranks when syncing), and their mean losses. The step
        holds the sum: K x P numbers in the state's dtype (as much as one call's gradients)."""
        name = type(self).__name__
        if self.gram_by_layer:
            raise NotImplementedError(
                f"{name}: step_with(optimizer) cannot be used with per_task_gradients='layers' "
                "(gram_by_layer=True; a step of several micro-batches needs their per-task "
                "gradients summed); build it with per_task_gradients='auto'"
            )
        if self._sharded:
            raise NotImplementedError(
                f"{name}: step_with(optimizer) does not support FSDP2-sharded shared parameters "
                "(a step of several micro-batches holds their K x P per-task gradients); use DDP"
            )
        task_grads, matrix = self._task_matrix(losses, separate)
        seen = losses.detach()
        mean_losses = window.mean_losses(self._sync.mean(seen) if self._syncing() else seen)
        matrix = matrix.to(self._state_options().get("dtype", matrix.dtype))
        window.gradient_sum = (
            matrix if window.gradient_sum is None else window.gradient_sum + matrix
        )
        return task_grads, window.gradient_sum / window.calls, mean_losses

    def _complete_step(
        self,
        total: Tensor,
        window: StepWindow | None,
        task_grads: list[Tensor],
        weights: Tensor,
        update: Tensor,
    ) -> Tensor:
        """``total`` (``sum_i w_i L_i`` of this micro-batch, ``weights`` its ``w``), whose
        backward completes the shared parameters' gradient to ``calls x update``: ``update``
        (``(P,)``) is the method's update for the mean gradients of the step's micro-batches
        so far. After the step's last micro-batch (each total scaled by 1 / calls, as
        accumulation does) the gradient is the update of the whole batch. Without a step
        (``window`` None: one call per step) the gradient is ``update`` itself."""
        target = update * window.calls if window is not None else update
        deposited = window.deposited if window is not None else None
        if window is not None:
            window.deposited = target
        start = 0
        for parameter, grads in zip(self._shared, task_grads, strict=True):
            end = start + parameter.numel()
            # What this micro-batch's own total puts there: w . its per-task gradients.
            own = weights.to(grads.dtype) @ grads.detach().reshape(self.num_tasks, -1)
            correction = target[start:end].to(grads.dtype) - own
            if deposited is not None:
                correction = correction - deposited[start:end].to(grads.dtype)
            total = with_parameter_gradient(total, parameter, correction.reshape(parameter.shape))
            start = end
        return total

    def _update_step(
        self,
        losses: tuple[object, ...],
        update_of: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
        value_of: Callable[[Tensor], Tensor] | None = None,
        uses_losses: bool = False,
    ) -> Tensor:
        """A training call of a method whose update is not a combination of this call's
        per-task gradients (MoCo, DB-MTL, the trimmed mean): ``update_of(matrix, losses)``
        takes the ``(K, P)`` per-task gradients and the ``(K,)`` losses (both over all ranks
        when syncing; under ``step_with`` the means of the step's micro-batches so far) and
        returns the weights ``w`` of the total and the ``(P,)`` update; a method that does
        not read the losses (``uses_losses`` False) is given this call's own, not synced. The
        total is ``sum_i w_i L_i`` (each task-specific parameter gets ``w_i grad L_i``), and
        its backward puts the update into the shared parameters' gradient. ``value_of(losses)``,
        when given, is the total's value instead (DB-MTL's sum of log-losses); its gradient is
        the same."""
        stacked, separate = self._graph_losses(losses, self._shared_device())
        window = self._step_call()
        if window is not None:
            task_grads, matrix, mean_losses = self._step_gradients(window, stacked, separate)
        else:
            task_grads, matrix = self._task_matrix(stacked, separate)
            # In the state's dtype, as a step's sum is (float32 at least: a bfloat16 model's).
            matrix = matrix.to(self._state_options().get("dtype", matrix.dtype))
            seen = stacked.detach()
            mean_losses = self._sync.mean(seen) if uses_losses and self._syncing() else seen
        weights, update = update_of(matrix, mean_losses)
        self.weights = weights
        total = (
            weighted_sum(weights, stacked)
            if value_of is None
            else objective_total(value_of(mean_losses), weights, stacked)
        )
        return self._complete_step(total, window, task_grads, weights, update)

    def _accumulated_step(
        self,
        window: StepWindow,
        losses: Tensor,
        separate: list[Tensor] | None,
        weights_of: Callable[[Tensor, Tensor], Tensor],
    ) -> Tensor:
        """A Gram method's micro-batch under ``step_with``: the weights ``weights_of(gram,
        mean_losses)`` of the Gram of the step's mean per-task gradients so far, and a total
        whose backward completes the shared gradient to their update (``_complete_step``)."""
        task_grads, mean_gradients, mean_losses = self._step_gradients(window, losses, separate)
        gram = task_gram_or_norms([mean_gradients], False, self._requested_backend)
        self.gram = gram
        weights = weights_of(gram, mean_losses)
        total = weighted_sum(weights, losses)
        if window.calls > 1:
            update = weights.to(mean_gradients.dtype) @ mean_gradients
            total = self._complete_step(total, window, task_grads, weights, update)
        else:
            window.deposited = weights.to(mean_gradients.dtype) @ mean_gradients
        self.weights = weights
        return total

    def _task_matrix(
        self, losses: Tensor, separate: list[Tensor] | None
    ) -> tuple[list[Tensor], Tensor]:
        """The per-task gradients of the shared parameters (this rank's, one tensor per
        parameter, for the backward's bookkeeping) and, detached, as one ``(K, P)`` matrix:
        the mean over ranks when syncing (one ``all_reduce`` of K x P numbers), else this
        process's. For the methods that need the gradients themselves, not their Gram."""
        syncing = self._syncing()
        agree = self._sync.smallest if syncing else None
        inputs = unsharded_parameters(self._shared) if self._sharded else None
        task_grads = self._task_gradients(losses, self.tasks, separate, inputs, agree)
        matrix = torch.cat([grad.detach().reshape(self.num_tasks, -1) for grad in task_grads], 1)
        return task_grads, self._sync.mean(matrix) if syncing else matrix


class GramBalancer(GradientBalancer):
    """A method whose weights are a function of the Gram matrix of the per-task gradients.

    The Gram-family methods (PCGrad, CAGrad, UPGrad, Nash-MTL, ...) aggregate the per-task
    gradients ``g_i`` of the shared parameters into ``d = sum_i w_i g_i`` with weights that
    depend on the gradients only through ``M = G G^T``. A method is then its weights: it
    implements ``_gram_weights(gram)`` (usually a call into ``fused_mtl.reference.gram_weights``)
    and this class does the rest. A training call computes the per-task gradients (one batched
    backward, or the two-stage one through the heads; see ``TaskGradients``), their Gram matrix
    (the fused ``task_gram``; the global one under ``torch.distributed``, so every rank gets the
    same weights), the weights, and returns ``sum_i w_i L_i``: its ordinary backward puts ``d``
    into the shared parameters' ``.grad`` and ``w_i grad L_i`` into each task-specific
    parameter's. In eval mode or with grad disabled the call returns the total with the last
    weights and changes nothing.

    Subclasses whose update is a sum over the tasks (PCGrad) set ``_update_is_sum``: their
    weights start at 1, the others' at ``1 / K``. Random draws go through ``_shared_random``,
    which gives every rank the first rank's draw.

    Args (every method of the family takes these; its own hyper-parameters come first):
        shared_parameters: the parameters whose per-task gradients define the problem (the
            trunk's, or a module).
        num_tasks: K (may be omitted when ``tasks`` is given).
        tasks: task names; enables calling with a dict and names tasks in errors.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, for the Gram matrix.
        per_task_gradients: ``"auto"``, ``"layers"``, ``"batched"`` or ``"loop"``: the Gram one
            shared layer at a time (``"layers"``, see ``fused_mtl.ops.layer_gram``; ``"auto"``
            takes it when ``shared_parameters`` is a module and it passes its first-call
            check), or from the per-task gradients of every shared parameter (see
            ``TaskGradients``).
        sync: under ``torch.distributed``, use the Gram matrix of the gradients over all ranks.
        process_group: the group to sync over (``None``: the default group).
        gram_by_layer: the older spelling of ``per_task_gradients="layers"``.
    """

    weights: Tensor
    #: Whether the method's update is a sum over the tasks (weights start at 1, else 1 / K).
    _update_is_sum = False

    def __init__(
        self,
        shared_parameters: SharedParameters | None = None,
        num_tasks: int | None = None,
        *,
        tasks: Sequence[str] | None = None,
        backend: Backend = "auto",
        per_task_gradients: str = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
        gram_by_layer: bool = False,
    ) -> None:
        super().__init__(
            shared_parameters,
            num_tasks,
            tasks,
            backend,
            per_task_gradients,
            sync,
            process_group,
            gram_by_layer,
        )
        device = self._shared[0].device if self._shared else None
        initial = 1.0 if self._update_is_sum else 1 / self.num_tasks
        # The last weights: what the method computed, not state to resume from.
        self.register_buffer(
            "weights", torch.full((self.num_tasks,), initial, device=device), persistent=False
        )
        self.gram: Tensor | None = None

    def _gram_weights(self, gram: Tensor) -> Tensor:
        """The ``(K,)`` weights of this call, from the ``(K, K)`` Gram matrix (detached)."""
        raise NotImplementedError

    def _weights_of(self, gram: Tensor, losses: Tensor) -> Tensor:
        """``_gram_weights`` in the losses' compute dtype: float64 for float64 losses, else
        float32. The Gram is float64 whatever the gradients' dtype; the total ``sum_i w_i L_i``
        keeps the dtype it had when the Gram was float32."""
        return self._gram_weights(gram).to(compute_dtype(losses.dtype))

    def forward(self, *losses: LossArgs) -> Tensor:
        """One step: the per-task gradients, their Gram, the weights; ``sum_i w_i L_i``."""
        reported = self._reported_total(losses, self.weights.device)
        if reported is not None:
            return reported
        stacked, separate = self._graph_losses(losses, self._shared_device())
        window = self._step_call()
        if window is not None:
            return self._accumulated_step(
                window,
                stacked,
                separate,
                lambda gram, mean_losses: self._weights_of(gram, mean_losses),
            )
        gram, current = self._task_gram(self._task_gradients, stacked, separate, False)
        gram = gram.detach()
        # The losses over all ranks when syncing (MGDA's loss normalisation, under CR-MOGM).
        weights = self._weights_of(gram, current)
        self.gram = gram
        self.weights = weights
        return weighted_sum(weights, stacked)


class SampledGramBalancer(GramBalancer):
    """A Gram method whose weights may come from two other mini-batches (double sampling).

    SDMGrad and MoDo update their weights with the cross Gram matrix ``G_a G_b^T`` of the
    per-task gradients of two independent mini-batches, and apply them to a third one's
    gradients; their analysis needs the three to be independent. The call takes the update's
    losses as usual and the two others as ``weight_losses=(losses_a, losses_b)``, each in any
    calling convention: ``total = sdmgrad(losses, weight_losses=(losses_a, losses_b))``. The
    total is ``sum_i w_i L_i`` of ``losses`` only, so the task-specific parameters get the
    update batch's gradients. Without ``weight_losses`` the three are the same mini-batch and
    the cross Gram is the Gram matrix. Subclasses implement ``_gram_weights(cross_gram)``.
    """

    def backward(
        self, *losses: LossArgs, weight_losses: Sequence[LossArgs] | None = None
    ) -> Tensor:
        """``total = self(*losses, weight_losses=weight_losses)``, then ``total.backward()``;
        returns the total, detached."""
        check_grad_enabled(self)
        total = self(*losses, weight_losses=weight_losses)
        total.backward()
        return total.detach()

    def forward(self, *losses: LossArgs, weight_losses: Sequence[LossArgs] | None = None) -> Tensor:
        """One step: the weights from ``weight_losses``' cross Gram (``losses``' Gram when
        omitted), then ``sum_i w_i L_i`` of ``losses``."""
        if weight_losses is None:
            return super().forward(*losses)
        name = type(self).__name__
        if isinstance(weight_losses, (Tensor, dict)) or len(weight_losses) != 2:
            raise ValueError(
                f"{name}: weight_losses must be a pair (losses_a, losses_b): the task losses of "
                "two more mini-batches, each like the call's losses"
            )
        reported = self._reported_total(losses, self.weights.device)
        if reported is not None:
            return reported
        # Under step_with, each micro-batch computes the step again from its start: the state
        # advances once per optimizer step, with the last micro-batch's cross Gram.
        self._step_call()
        if self.gram_by_layer:
            raise NotImplementedError(
                f"{name}: weight_losses cannot be used with per_task_gradients='layers' "
                "(gram_by_layer=True; the layers' recorded calls are those of one mini-batch); "
                "build it with per_task_gradients='auto'"
            )
        device = self._shared_device()
        batches = [self._graph_losses(losses, device)]
        for position, batch in enumerate(weight_losses):
            try:
                batches.append(self._graph_losses((batch,), device))
            except ValueError as error:
                fault = str(error).removeprefix(f"{name}: ")
                raise ValueError(f"{name}: weight_losses[{position}]: {fault}") from None
        stacked = torch.cat([batch[0] for batch in batches])
        separate_lists = [batch[1] for batch in batches]
        separate = (
            [loss for found in separate_lists for loss in found]  # type: ignore[union-attr]
            if all(found is not None for found in separate_lists)
            else None
        )
        names = [
            f"{task_label(index, self.tasks)}{suffix}"
            for suffix in ("", " (weight batch a)", " (weight batch b)")
            for index in range(self.num_tasks)
        ]
        gram, _ = self._task_gram(self._task_gradients, stacked, separate, False, names=names)
        num = self.num_tasks
        cross = gram.detach()[num : 2 * num, 2 * num :]
        weights = self._weights_of(cross, batches[0][0])
        self.gram = cross
        self.weights = weights
        return weighted_sum(weights, batches[0][0])


def check_number(
    owner: str,
    name: str,
    value: object,
    *,
    low: float,
    high: float = float("inf"),
    low_open: bool = False,
) -> float:
    """``value`` as a float, or a ValueError naming ``owner``'s hyper-parameter ``name`` and
    the range ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    # numbers.Real: Python's and numpy's integers and floats alike (np.int64(2), np.float32).
    number = float(value) if isinstance(value, Real) and not isinstance(value, bool) else None
    if number is None or not (number > low if low_open else number >= low) or not number <= high:
        bracket = "(" if low_open else "["
        raise ValueError(
            f"{owner}: {name} must be a number in {bracket}{low}, {high}], got {value!r}"
        )
    return number


def check_count(owner: str, name: str, value: object, *, low: int) -> int:
    """``value`` as an int, or a ValueError naming ``owner``'s hyper-parameter ``name``: a
    whole number ``>= low`` (Python's or numpy's integers; not a bool, not a float)."""
    if isinstance(value, Integral) and not isinstance(value, bool) and value >= low:
        return int(value)
    raise ValueError(f"{owner}: {name} must be a whole number >= {low}, got {value!r}")


def with_parameter_gradient(total: Tensor, parameter: Tensor, gradient: Tensor) -> Tensor:
    """``total`` itself, whose backward also accumulates ``gradient`` (times the upstream
    gradient) into ``parameter.grad``: for a method that trains its own parameter by a rule of
    its own (GradNorm's weights), through autograd, where DDP, FSDP and a GradScaler see it
    like any parameter's gradient. The total's value is untouched, whatever ``gradient`` is."""
    return _WithParameterGradient.apply(total, parameter, gradient)


class _WithParameterGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, total: Tensor, parameter: Tensor, gradient: Tensor) -> Tensor:
        ctx.save_for_backward(gradient)
        return total.clone()

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor, Tensor, None]:
        (gradient,) = ctx.saved_tensors
        return grad_total, grad_total.to(gradient.dtype) * gradient, None
