"""Task bookkeeping shared by every balancing module: names, types and the calling conventions.

A module is called with its task losses in any of these forms, all equivalent::

    module(l1, l2, l3)                    # one scalar per task, positional
    module([l1, l2, l3])                  # a list, a tuple, or any iterable in task order
    module(losses.values())               # (a dict's values, a generator)
    module(torch.stack([l1, l2, l3]))     # one tensor of shape (K,) (or (K, ...) with a reduction)
    module({"depth": l1, "seg": l2, ...}) # by task name, needs tasks=[...] at construction

and ``stack_losses`` turns each into one ``(K,)`` tensor, checking every loss on the way: Python
checks of shapes, dtypes and devices only, never a tensor value (no host synchronisation).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import Any, Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum"] | None
REDUCTIONS = (None, "mean", "sum")

TaskTypes = str | Sequence[str] | Mapping[str, str] | None


#: How many names an error lists before it says how many more there are: a message about
#: 65,536 tasks stays one line.
LISTED_NAMES = 8


def listed(names: Sequence[object]) -> str:
    """The first ``LISTED_NAMES`` of ``names`` for an error message, and how many more."""
    shown = ", ".join(repr(name) for name in list(names[:LISTED_NAMES]))
    more = len(names) - LISTED_NAMES
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def task_label(index: int, names: Sequence[str] | None) -> str:
    """How errors name a task: its name when it has one, else its index."""
    return repr(names[index]) if names is not None else str(index)


def as_integer(what: str, value: object, low: int = 1) -> int:
    """``value`` as a Python ``int`` >= ``low``: any integer (``3``, ``np.int64(3)``, anything
    ``operator.index`` takes) but a bool; otherwise a ValueError naming ``what``."""
    need = f"{what} must be {'a positive integer' if low == 1 else f'an integer >= {low}'}"
    if isinstance(value, bool):
        raise ValueError(f"{need}, got the bool {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        if isinstance(value, float) and value.is_integer():
            raise ValueError(f"{need}, got the float {value!r}; pass int({value!r})") from None
        raise ValueError(f"{need}, got {type(value).__name__} {value!r}") from None
    if number < low:
        raise ValueError(f"{need}, got {number}")
    return number


def resolve_tasks(
    num_tasks: int | None, tasks: Sequence[str] | None
) -> tuple[int, list[str] | None]:
    """Check ``num_tasks`` / ``tasks`` of a constructor; return ``(K, names or None)``."""
    if tasks is None:
        if num_tasks is None:
            raise ValueError("give the number of tasks (num_tasks=K) or their names (tasks=[...])")
        return as_integer("num_tasks", num_tasks), None
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a sequence of task names, got {type(tasks).__name__}")
    names = list(tasks)
    if not names:
        raise ValueError("tasks is empty: at least one task is needed")
    # A set, not list look-ups: O(K) for 65,536 names.
    seen: set[str] = set()
    duplicates: set[str] = set()
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"task names must be strings, got {name!r}")
        if name in seen:
            duplicates.add(name)
        seen.add(name)
    if duplicates:
        raise ValueError(f"duplicate task names: {listed(sorted(duplicates))}")
    if num_tasks is not None and as_integer("num_tasks", num_tasks) != len(names):
        raise ValueError(
            f"num_tasks={num_tasks} but {len(names)} task names were given: {listed(names)}"
        )
    return len(names), names


def check_names(given: Sequence[str], names: Sequence[str] | None, what: str) -> None:
    """Raise on a dict keyed by task names that has unknown or missing names."""
    if names is None:
        raise ValueError(f"{what} given as a dict need task names: construct with tasks=[...]")
    known, keys = set(names), set(given)
    unknown = [key for key in given if key not in known]
    missing = [name for name in names if name not in keys]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown task(s) {listed(unknown)}")
        if missing:
            parts.append(f"missing task(s) {listed(missing)}")
        raise ValueError(f"{what}: {' and '.join(parts)}; the tasks are {listed(names)}")


def resolve_task_types(
    task_types: TaskTypes, num_tasks: int, names: Sequence[str] | None
) -> list[str] | None:
    """One type per task, in task order (a single string applies to every task)."""
    if task_types is None:
        return None
    if isinstance(task_types, str):
        types = [task_types] * num_tasks
    elif isinstance(task_types, Mapping):
        check_names(list(task_types), names, "task_types")
        types = [task_types[name] for name in names]  # type: ignore[union-attr]
    elif isinstance(task_types, Sequence):
        types = list(task_types)
        if len(types) != num_tasks:
            raise ValueError(f"task_types has {len(types)} entries for {num_tasks} tasks")
    else:
        raise TypeError(
            "task_types must be one string for every task, a sequence with one per task or a "
            f"dict by task name, got {type(task_types).__name__} {task_types!r}"
        )
    return types


def check_reduction(reduction: Reduction) -> Reduction:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be None, 'mean' or 'sum', got {reduction!r}")
    return reduction


def _check_tensor(loss: object, what: str, device: torch.device) -> Tensor:
    """Type, dtype and device of one loss (``what`` names it in errors: "task 'depth'")."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"{what}: loss must be a tensor, got {type(loss).__name__}")
    if not loss.is_floating_point():
        raise TypeError(f"{what}: loss must be a floating-point tensor, got {loss.dtype}")
    if loss.device != device:
        raise ValueError(
            f"{what}: loss is on {loss.device} but the module's parameters are on {device}; "
            "move the module with .to(device)"
        )
    return loss


def _check_task_loss(
    loss: object, label: str, reduction: Reduction, device: torch.device
) -> Tensor:
    """One task's loss as a 0-dim tensor, reduced when the module has a reduction."""
    checked = _check_tensor(loss, f"task {label}", device)
    if checked.numel() == 0:
        raise ValueError(f"task {label}: loss is empty (shape {tuple(checked.shape)})")
    if reduction == "mean":
        return checked.mean()
    if reduction == "sum":
        return checked.sum()
    if checked.numel() != 1:
        raise ValueError(
            f"task {label}: loss has shape {tuple(checked.shape)}; pass reduction='mean' or "
            "reduction='sum', or reduce it to a scalar"
        )
    # A 0-dim loss is used as it is: a reshape would add a view node to autograd for each task.
    return checked if checked.dim() == 0 else checked.reshape(())


def _from_stacked(
    losses: Tensor, num_tasks: int, reduction: Reduction, device: torch.device
) -> Tensor:
    """A ``(K,)`` tensor as it is; ``(K, ...)`` reduced over everything but the task axis."""
    _check_tensor(losses, "the losses tensor", device)
    if losses.dim() > 1 and losses.shape[0] != num_tasks and losses.shape[-1] == num_tasks:
        # A (batch, K) tensor, as a per-sample loss of K outputs comes out of a model.
        shape = tuple(losses.shape)
        moved = (num_tasks, *shape[:-1])
        fix = "losses.T" if losses.dim() == 2 else "losses.movedim(-1, 0)"
        raise ValueError(
            f"the losses tensor has shape {shape}: its last axis has the {num_tasks} tasks, "
            f"but the task axis comes first; pass {fix} (shape {moved}), or one loss per "
            f"task (shape ({num_tasks},))"
        )
    if losses.dim() == 0 or losses.shape[0] != num_tasks:
        raise ValueError(
            f"expected {num_tasks} task losses, got one tensor of shape {tuple(losses.shape)} "
            f"(a stacked tensor needs shape ({num_tasks},))"
        )
    if losses.dim() == 1:
        return losses
    if reduction is None:
        raise ValueError(
            f"the losses tensor has shape {tuple(losses.shape)}: each task's loss is not a "
            "scalar; pass reduction='mean' or reduction='sum'"
        )
    if losses[0].numel() == 0:
        raise ValueError(
            f"the losses tensor has shape {tuple(losses.shape)}: task losses are empty"
        )
    flat = losses.reshape(num_tasks, -1)
    return flat.mean(dim=1) if reduction == "mean" else flat.sum(dim=1)


def loss_arguments(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The arguments of a call, with one iterable of losses (a dict's ``values()``, a
    generator, ...) made a list: read once, in its order, like a list."""
    if len(args) != 1:
        return args
    (arg,) = args
    if isinstance(arg, (Tensor, Mapping, list, tuple, str, bytes)) or not isinstance(arg, Iterable):
        return args
    if isinstance(arg, Set):
        raise TypeError(
            f"the losses were given as a {type(arg).__name__}, which has no order: pass them "
            "in task order (a list or tuple), or as a dict by task name"
        )
    return (list(arg),)


def check_losses(
    args: tuple[object, ...],
    *,
    num_tasks: int,
    names: Sequence[str] | None,
    reduction: Reduction,
    device: torch.device,
) -> tuple[Tensor, list[Tensor] | None]:
    """The ``(K,)`` tensor of ``stack_losses``, and the task losses before stacking when they
    were given one by one (``None`` for one stacked tensor)."""
    args = loss_arguments(args)
    if len(args) == 1:
        (arg,) = args
        if isinstance(arg, Mapping):
            check_names(list(arg), names, "losses")
            losses = [arg[name] for name in names]  # type: ignore[union-attr]
        elif isinstance(arg, (list, tuple)):
            losses = list(arg)
        elif isinstance(arg, Tensor) and arg.dim() > 0 and num_tasks > 1:
            return _from_stacked(arg, num_tasks, reduction, device), None
        else:
            losses = [arg]
    else:
        losses = list(args)
    if len(losses) != num_tasks:
        expected = f"{num_tasks} {listed(names)}" if names is not None else str(num_tasks)
        raise ValueError(f"expected {expected} task losses, got {len(losses)}")
    checked = [
        _check_task_loss(loss, task_label(index, names), reduction, device)
        for index, loss in enumerate(losses)
    ]
    return torch.stack(checked), checked


def stack_losses(
    args: tuple[object, ...],
    *,
    num_tasks: int,
    names: Sequence[str] | None,
    reduction: Reduction,
    device: torch.device,
) -> Tensor:
    """Turn any calling convention into one ``(K,)`` tensor (see the module docstring)."""
    stacked, _ = check_losses(
        args, num_tasks=num_tasks, names=names, reduction=reduction, device=device
    )
    return stacked


def raise_if_not_finite(losses: Tensor, names: Sequence[str] | None) -> None:
    """``FloatingPointError`` naming every task whose loss is NaN or infinite.

    Reads the values on the host: this is the one place where a host synchronisation happens,
    and only when the user asked for it with ``check_finite=True``.
    """
    finite = torch.isfinite(losses.detach())
    if bool(finite.all()):
        return
    bad = (~finite).nonzero().flatten().tolist()
    described = ", ".join(
        f"task {task_label(index, names)} = {losses[index].item()}" for index in bad
    )
    raise FloatingPointError(f"non-finite task loss: {described}")


def raise_if_below(
    owner: str, losses: Tensor, floor: Tensor | float, names: Sequence[str] | None, need: str
) -> None:
    """``check_finite`` of the methods that take a logarithm of the losses: the non-finite
    ones first, then a ``ValueError`` naming the first task whose loss is not above ``floor``
    (``need`` says why it must be). One host read when the losses are usable."""
    detached = losses.detach()
    above = detached > floor
    if bool(above.all()):  # False for NaN too
        return
    raise_if_not_finite(detached, names)
    index = int((~above).nonzero()[0, 0])
    raise ValueError(
        f"{owner}: task {task_label(index, names)}: loss is {detached[index].item()}; {need}"
    )


def per_task_numbers(
    owner: str,
    name: str,
    value: object,
    num_tasks: int,
    names: Sequence[str] | None,
    positive: bool = False,
) -> Tensor:
    """``value`` (one number, or one per task) as ``(K,)`` float64 numbers, each finite (and
    > 0 when ``positive``); otherwise an error naming ``owner``'s ``name`` and the task."""
    try:
        values = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{owner}: {name} must be one number or {num_tasks}") from error
    if values.dim() == 0:
        values = values.expand(num_tasks)
    if values.shape != (num_tasks,):
        raise ValueError(
            f"{owner}: {name} must be one number or {num_tasks} numbers, got shape "
            f"{tuple(values.shape)}"
        )
    for index, number in enumerate(values.tolist()):
        if not math.isfinite(number) or (positive and number <= 0):
            need = "finite and > 0" if positive else "finite"
            raise ValueError(
                f"{owner}: task {task_label(index, names)}: {name} is {number}; it must be {need}"
            )
    return values.clone()
