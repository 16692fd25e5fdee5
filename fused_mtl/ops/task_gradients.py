"""Per-task gradients of the shared parameters: one batched backward, or one backward per task.

For K task losses and shared parameters ``W_1 .. W_n``, ``TaskGradients`` returns one tensor per
parameter shaped ``(K, *W_j.shape)`` whose row ``i`` is ``dL_i / dW_j``, the input of
``task_grad_norms`` and ``task_gram``.

- ``"batched"``: one call of ``torch.autograd.grad`` on the stacked ``(K,)`` losses with the
  identity as ``K`` batched output gradients (``is_grads_batched=True``, which vmaps the
  backward). The graph is walked once instead of K times. When the losses are separate (their
  graph shows each task's own part: its head), each task's loss goes back through its own head
  alone, to where the shared part begins, and one batched backward of those K gradients then
  crosses the shared part (``task_frontiers``).
- ``"loop"``: K calls of ``torch.autograd.grad``, one per task loss, as common implementations
  do. It works with every model.

The mode is chosen on the first call, which runs both: the loop and then the batched backward.
The loop also finds a task that does not reach the shared parameters and names it: at once
from the graph, when it shows each task's loss (given one by one, or stacked with
``torch.stack``) and that loss has no path to a parameter. A gradient that is exactly zero at
one point (``theta ** 2`` at 0, a head initialised at zero, a ReLU inactive on the whole batch)
is not a fault, and is not named. Where the graph cannot tell, from the values: one ``(K,)``
tensor out of one operation (``per_sample_losses.mean(0)``), or task losses taken from one
tensor of every task's outputs (its columns), whose graphs all reach the parameters through it.
There a task is named when, at each of the first ``UNREACHED_CALLS`` calls, its gradient is
exactly zero for every shared parameter and no path carries a NaN from its loss to them
(``_carries_nan``: 0 * NaN is NaN, so a zero that is a product still shows its path); the calls
before are balanced with the zero gradient they see.

With ``requested="auto"`` the batched mode is kept only if it runs and agrees with the loop;
otherwise the loop is kept and ``reason`` says why. ``requested="batched"`` raises instead of
falling back; ``requested="loop"`` never tries the batched backward. So a model whose operations
cannot be vmapped costs one failed attempt, never a wrong gradient. A later call's graph can
hold an operation the first one's did not (a branch taken later): when its batched backward
fails, that call and the following ones take the loop (``"auto"``, on that rank: the weights
come from the synced Gram either way; ``reason`` says why), or it raises (``"batched"``). The
first call costs K + 1 backward passes and a host synchronisation; the following calls cost
one (batched) or K (loop) and never synchronise, but for the few calls that watch a task whose
gradient was zero (one host read each). Under torch.distributed the first call's findings are
agreed over the ranks (one ``all_reduce`` of 2K + 1 flags, see ``agree``): a task is named only
if it is unreached on every rank, and the batched backward is kept only if every rank can use
it, so that every rank raises, or goes on, alike.

Which is faster depends on the device and the model. The batched backward replaces K walks of
the graph by one, which saves K - 1 sets of kernel launches on a GPU. On a CPU the two cost
about the same now that the batched backward crosses each head with its own task only: GradNorm
on the toy's network (K = 8, 2 cores), 8.1 ms batched vs 7.8 ms for the loop with per-head
losses, and 11.8 vs 12.7 ms with losses computed together from stacked outputs, whose graph
does not tell the heads apart. Before that change, K rows went through every head and the loop
won on a CPU by 2x (3.8 vs 1.9 ms). ``"auto"`` therefore keeps the batched backward on every
device; the two give the same gradients to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from fused_mtl._losses import task_label

GradientMode = Literal["batched", "loop"]
SharedParameters = nn.Module | Tensor | Iterable[Tensor]
GRADIENT_MODES = ("auto", "batched", "loop")

#: Calls in a row, from the first, at which a task that the graph cannot judge must look
#: unreached to be named (see the module docstring): a zero gradient at a single step (a batch on
#: which its head's ReLUs are all inactive) is not a fault, as it is not when the graph decides.
UNREACHED_CALLS = 2


def _agreement_rtol(dtype: torch.dtype) -> float:
    # The two modes add the same products in different orders: they differ by a few ulps per
    # reduction. The square root of the dtype's epsilon (3e-4 in fp32) is far above that and far
    # below the O(1) difference of a wrong gradient.
    return torch.finfo(dtype).eps ** 0.5


# fully_shard replaces a module's parameters: a balancer built before it holds the old ones.
_SHARDING_HINT = (
    "; under FSDP2, build the balancer after fully_shard, from the sharded module's parameters"
)


def _distributed_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _retained_grad(*args: object, **kwargs: object) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad``, keeping the graph for the next pass, with torch.compile's
    donated-buffer refusal turned into what to do about it."""
    try:
        return torch.autograd.grad(*args, retain_graph=True, **kwargs)  # type: ignore[arg-type]
    except RuntimeError as error:
        if "donated buffers" not in str(error):
            raise
        raise RuntimeError(
            "the per-task gradients are extra backward passes through the losses' graph, and "
            "part of it was compiled by torch.compile with donated buffers, whose backward runs "
            "only once. Compile the model alone (torch.compile(model)) and call the balancer "
            "outside the compiled function, or set torch._functorch.config.donated_buffer = "
            "False before compiling the whole step"
        ) from error


def first_line(error: BaseException) -> str:
    """The first line of an error's message (vmap's run to a paragraph), for ``reason``."""
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)


def _unreached_error(index: int, task_names: Sequence[str] | None, found: str = "") -> ValueError:
    return ValueError(
        f"task {task_label(index, task_names)}: its loss does not depend on the shared "
        f"parameters (choose parameters that all tasks use){found}"
    )


def _zero_rows(grads: Sequence[Tensor]) -> Tensor:
    """``(K,)`` flags: whether task i's gradient is exactly zero for every parameter."""
    return torch.stack([grad.reshape(grad.shape[0], -1).eq(0).all(1) for grad in grads]).all(0)


def _carries_nan(losses: Tensor, parameters: Sequence[Tensor], index: int) -> bool:
    """Whether a backward of NaN from task ``index``'s loss alone reaches a parameter: whether
    a path leads there, even one whose gradient is zero at this point (0 * NaN is NaN: a head
    initialised at zero, ``theta ** 2`` at 0). Operations that select (a ReLU inactive on the
    whole batch, ``torch.where``) stop it as they stop the gradient."""
    probe = torch.zeros_like(losses)
    probe[index] = float("nan")
    # Anomaly detection would report the NaN put there on purpose.
    with torch.autograd.set_detect_anomaly(False):
        grads = _retained_grad(losses, parameters, grad_outputs=probe, allow_unused=True)
    return any(grad is not None and bool(grad.ne(0).any()) for grad in grads)


def task_graph_roots(
    losses: Tensor, separate_losses: Sequence[Tensor] | None
) -> list[object | None] | None:
    """Each task's own node of the autograd graph, where the graph shows one: the separate
    losses' ``grad_fn``, or the inputs of the ``torch.stack`` that made the ``(K,)`` tensor
    (``None`` for a task whose loss has no graph). ``None`` when the tensor came out of one
    operation over every task, whose graph does not tell the tasks apart."""
    if separate_losses is not None:
        return [loss.grad_fn for loss in separate_losses]
    node = losses.grad_fn
    if node is not None and type(node).__name__ == "StackBackward0":
        return [child for child, _ in node.next_functions]
    return None


def graph_nodes(root: object | None) -> Iterator[object]:
    """Every node of the autograd graph below ``root`` (itself included), each once."""
    # The nodes are kept alive while their ids are used: on torch 2.10 and older (seen on 2.9.1
    # and 2.10.0, not on 2.13) a node's Python wrapper dies with its last reference, and the
    # next wrapper of the same node gets another id, or a dead node's id goes to another node.
    seen: dict[int, object] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        yield node
        stack.extend(child for child, _ in node.next_functions)  # type: ignore[attr-defined]


def reaches(root: object | None, targets: Sequence[Tensor]) -> bool:
    """Whether the graph below ``root`` reaches one of ``targets`` (leaf parameters through
    their accumulation node, other tensors through the node that made them)."""
    leaves = {id(t) for t in targets if t.grad_fn is None}
    alive = [t.grad_fn for t in targets if t.grad_fn is not None]
    nodes = {id(node) for node in alive}
    return any(
        id(node) in nodes or id(getattr(node, "variable", None)) in leaves
        for node in graph_nodes(root)
    )


def task_root_edges(
    losses: Tensor, separate_losses: Sequence[Tensor] | None
) -> list[GradientEdge] | None:
    """Each task's loss as an edge of the autograd graph (see ``task_graph_roots``), or
    ``None`` when the graph does not tell the tasks apart or a task's loss has no graph."""
    if separate_losses is not None:
        if any(loss.grad_fn is None for loss in separate_losses):
            return None
        return [get_gradient_edge(loss) for loss in separate_losses]
    node = losses.grad_fn
    if node is None or type(node).__name__ != "StackBackward0":
        return None
    edges = [GradientEdge(child, number) for child, number in node.next_functions]
    return None if any(edge.node is None for edge in edges) else edges


def task_frontiers(
    roots: Sequence[GradientEdge], shared: Sequence[Tensor]
) -> list[list[GradientEdge]] | None:
    """For each task, the edges where its own part of the graph (the nodes that no other
    task's loss reaches: its head) enters the part that several tasks share.

    ``None`` when a task has no own part, when a shared parameter is reached from inside a
    task's own part (a weight tied between the trunk and a head: the gradient at the edges
    would then miss, or count twice, that parameter's share), or when one of a task's edges
    lies below another (``_one_below_another``).
    """
    counts: dict[int, int] = {}
    alive = []  # the nodes counted, kept alive so that their ids stay theirs (graph_nodes)
    for root in roots:
        for node in graph_nodes(root.node):
            alive.append(node)
            counts[id(node)] = counts.get(id(node), 0) + 1
    shared_ids = {id(parameter) for parameter in shared}
    frontiers = []
    for root in roots:
        if counts[id(root.node)] > 1:
            return None
        edges: dict[tuple[int, int], GradientEdge] = {}
        seen: set[int] = set()
        stack = [root.node]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            for child, number in node.next_functions:  # type: ignore[attr-defined]
                if child is None:
                    continue
                leaf = getattr(child, "variable", None)
                if counts[id(child)] > 1:
                    if leaf is not None:
                        return None
                    edges[(id(child), number)] = GradientEdge(child, number)
                elif leaf is not None and id(leaf) in shared_ids:
                    return None
                else:
                    stack.append(child)
        if len(edges) > 1 and _one_below_another(list(edges.values())):
            return None
        frontiers.append(list(edges.values()))
    return frontiers


def _one_below_another(edges: Sequence[GradientEdge]) -> bool:
    """Whether one edge's node lies in the graph below another's (a head that reads both a
    trunk tensor and one computed from it, a skip connection): the gradient at the lower edge
    then already holds the path through the upper one, and the second stage would cross that
    path twice."""
    nodes = {id(edge.node) for edge in edges}
    for edge in edges:
        below = {id(node) for node in graph_nodes(edge.node) if node is not edge.node}
        if below & nodes:
            return True
    return False


def shared_parameters(shared: SharedParameters) -> tuple[list[Tensor], list[str]]:
    """The shared parameters as a list, with the names errors use."""
    if isinstance(shared, nn.Module):
        named = list(shared.named_parameters())
    elif isinstance(shared, Tensor):
        named = [("0", shared)]
    else:
        named = [(str(index), p) for index, p in enumerate(shared)]
    if not named:
        raise ValueError("shared_parameters is empty: give the parameters all tasks share")
    parameters, names = [], []
    for key, parameter in named:
        if not isinstance(parameter, Tensor):
            raise TypeError(f"shared parameter {key}: expected a tensor, got {type(parameter)}")
        name = f"{key!r} (shape {tuple(parameter.shape)})"
        if not parameter.requires_grad:
            raise ValueError(f"shared parameter {name} does not require grad")
        if not parameter.is_leaf:
            raise ValueError(
                f"shared parameter {name} is not a leaf tensor (it was computed by an "
                "operation); pass the model's parameters, e.g. model.trunk[-1].parameters()"
            )
        if any(parameter is seen for seen in parameters):
            raise ValueError(f"shared parameter {name} is given twice")
        parameters.append(parameter)
        names.append(name)
    return parameters, names


class TaskGradients:
    """Computes per-task gradients of fixed shared parameters; see the module docstring."""

    def __init__(
        self,
        parameters: Sequence[Tensor],
        parameter_names: Sequence[str],
        requested: str = "auto",
    ) -> None:
        if requested not in GRADIENT_MODES:
            raise ValueError(
                f"per_task_gradients must be one of {GRADIENT_MODES}, got {requested!r}"
            )
        self.parameters = list(parameters)
        self.parameter_names = list(parameter_names)
        self.requested = requested
        self.mode: GradientMode | None = None
        self.reason = "not chosen yet: the mode is chosen on the first call"
        self._identity: Tensor | None = None

    #: The tasks that looked unreached at each call so far, how many calls that is, and how
    #: many losses those calls had (``_watch``); class defaults for objects pickled before.
    _watched: tuple[int, ...] = ()
    _watched_calls = 0
    _watched_size = 0

    def __call__(
        self,
        losses: Tensor,
        task_names: Sequence[str] | None,
        separate_losses: Sequence[Tensor] | None = None,
        inputs: Sequence[Tensor] | None = None,
        agree: Callable[[Tensor], Tensor] | None = None,
    ) -> list[Tensor]:
        """Gradients of each of the ``(K,)`` ``losses``; the graph is retained for a backward.

        ``separate_losses``: the same losses before stacking, when the caller has them.
        ``inputs``: tensors to differentiate instead of the parameters given at construction
        (for example a representation that is new at every call); the names stay. They are
        used for this call only and not kept: a step's non-leaf tensors held past the call
        would keep its graph alive and make ``copy.deepcopy`` of the model fail.
        ``agree``: under torch.distributed, the smallest over ranks of a tensor of flags, so
        that the first call's checks and choice are the same on every rank (see
        ``_choose_mode``).
        """
        parameters = self.parameters if inputs is None else list(inputs)
        self.check_trainable(parameters)
        if self.mode is None:
            return self._choose_mode(losses, task_names, separate_losses, parameters, agree)
        grads = None
        if self.mode == "batched":
            try:
                grads = self._batched(losses, separate_losses, parameters)
            except RuntimeError as error:
                # A later step's graph can hold an operation the first call's did not (a branch
                # taken later, a backward that copies into a buffer), which vmap refuses. The
                # attempt changed nothing: torch.autograd.grad writes no .grad and the graph
                # was retained, so the loop runs on it as if it were the first choice.
                self._fall_back(f"the batched backward failed at a later call: {first_line(error)}")
        if grads is None:
            grads = self._loop(separate_losses or losses, task_names, parameters)
        if self._watched and losses.shape[0] != self._watched_size:
            # Another number of losses (SDMGrad's weight batches given, or no longer): the
            # positions watched are not these tasks'.
            self._watched = ()
        if self._watched:
            zero = _zero_rows(grads)[list(self._watched)].float()
            zero = agree(zero) if agree is not None else zero
            still = [
                index for index, flag in zip(self._watched, zero.tolist(), strict=True) if flag
            ]
            self._watch(losses, parameters, still, task_names, agree)
        return grads

    def _choose_mode(
        self,
        losses: Tensor,
        task_names: Sequence[str] | None,
        separate_losses: Sequence[Tensor] | None,
        parameters: Sequence[Tensor],
        agree: Callable[[Tensor], Tensor] | None,
    ) -> list[Tensor]:
        looped = self._loop(separate_losses or losses, task_names, parameters)
        num_tasks = looped[0].shape[0]
        # From the graph, not the values: a gradient can be exactly zero at one point (the
        # first step's theta = 0 in theta ** 2) for a loss that depends on the parameters.
        roots = task_graph_roots(losses, separate_losses)
        reached = torch.tensor(
            [True] * num_tasks if roots is None else [reaches(r, parameters) for r in roots],
            device=losses.device,
        )
        # Where the graph cannot tell (one operation over every task, or task losses that
        # share the graph below them), an exactly zero gradient is watched (_watch).
        zero = _zero_rows(looped)
        batched, failure = None, None
        if self.requested != "loop":
            batched, failure = self._try_batched(losses, separate_losses, looped, parameters)
        flags = torch.cat([~reached, zero, reached.new_tensor([failure is None])]).float()
        if agree is not None:
            # A task is unreached (or its gradient zero) only if it is so on every rank; the
            # batched backward is kept only if every rank could use it. Every rank then raises,
            # or goes on, alike: none is left waiting in a collective.
            flags = agree(flags)
        # One host read for every task and the choice.
        *found, batched_everywhere = flags.tolist()
        for index, task_unreached in enumerate(found[:num_tasks]):
            if task_unreached:
                raise _unreached_error(index, task_names)
        zeros = [index for index, flag in enumerate(found[num_tasks:]) if flag]
        if zeros:
            self._watch(losses, parameters, zeros, task_names, agree)
        if self.requested == "loop":
            self.mode, self.reason = "loop", "requested (per_task_gradients='loop')"
            return looped
        if failure is None and not batched_everywhere:
            failure = "another rank could not use the batched backward"
        if failure is not None:
            self._fall_back(failure)
            return looped
        self.mode = "batched"
        self.reason = "one batched backward agreed with per-task backward passes"
        return batched

    def check_trainable(self, parameters: Sequence[Tensor]) -> None:
        """An error naming a parameter frozen after construction (a Python flag, no tensor
        read)."""
        for name, parameter in zip(self.parameter_names, parameters, strict=False):
            if not parameter.requires_grad:
                raise ValueError(
                    f"shared parameter {name} does not require grad (it was frozen after the "
                    "balancer was built); unfreeze it, or build the balancer from the "
                    "parameters that are still trained"
                )

    def _watch(
        self,
        losses: Tensor,
        parameters: Sequence[Tensor],
        zeros: Sequence[int],
        task_names: Sequence[str] | None,
        agree: Callable[[Tensor], Tensor] | None,
    ) -> None:
        """Of ``zeros`` (tasks whose gradient is exactly zero at this call, on every rank, and
        whose loss the graph does not show unreached), keep watching those to which no NaN
        leads from their loss (``_carries_nan``), and name the first once it has been so at each
        of the first ``UNREACHED_CALLS`` calls. The watch ends at the first call where none is:
        a host read per call until then, none after."""
        unreached = [not _carries_nan(losses, parameters, index) for index in zeros]
        if zeros and agree is not None:
            # Every rank has the same ``zeros`` (agreed), so every rank joins this collective.
            unreached = agree(torch.tensor(unreached, device=losses.device).float()).tolist()
        self._watched = tuple(index for index, flag in zip(zeros, unreached, strict=True) if flag)
        self._watched_size = losses.shape[0]
        self._watched_calls = self._watched_calls + 1 if self._watched else 0
        if self._watched and self._watched_calls >= UNREACHED_CALLS:
            raise _unreached_error(
                self._watched[0],
                task_names,
                "; found from its gradient: exactly zero, with no path from its loss to them, "
                f"at each of the first {UNREACHED_CALLS} calls",
            )

    def _try_batched(
        self,
        losses: Tensor,
        separate_losses: Sequence[Tensor] | None,
        looped: list[Tensor],
        parameters: Sequence[Tensor],
    ) -> tuple[list[Tensor] | None, str | None]:
        """The batched gradients and ``None``, or ``None`` and why they cannot be used."""
        try:
            batched = self._batched(losses, separate_losses, parameters)
        except RuntimeError as error:
            return None, f"the batched backward failed: {first_line(error)}"
        for name, one, other in zip(self.parameter_names, batched, looped, strict=True):
            rtol = _agreement_rtol(other.dtype)
            scale = float(other.abs().max()) if other.numel() else 0.0
            if not torch.allclose(one, other, rtol=rtol, atol=rtol * scale):
                return None, (
                    f"the batched backward disagrees with per-task backward passes on {name} "
                    f"(largest difference {float((one - other).abs().max()):.3g})"
                )
        return batched, None

    def _fall_back(self, reason: str) -> None:
        """Take the loop from now on; raise, naming the fix, when the batched backward was
        requested."""
        if self.requested == "batched":
            raise RuntimeError(
                f"per_task_gradients='batched' cannot be used with this model: {reason}; build "
                "the balancer with per_task_gradients='loop' (or 'auto', which falls back to "
                "the loop)"
            )
        self.mode, self.reason = "loop", reason

    def _identity_for(self, losses: Tensor) -> Tensor:
        num_tasks = losses.shape[0]
        identity = self._identity
        if (
            identity is None
            or identity.shape[0] != num_tasks
            or identity.dtype != losses.dtype
            or identity.device != losses.device
        ):
            identity = torch.eye(num_tasks, dtype=losses.dtype, device=losses.device)
            self._identity = identity
        return identity

    def _batched(
        self,
        losses: Tensor,
        separate_losses: Sequence[Tensor] | None,
        parameters: Sequence[Tensor],
    ) -> list[Tensor]:
        roots = task_root_edges(losses, separate_losses)
        frontiers = task_frontiers(roots, parameters) if roots is not None else None
        if frontiers is None:
            grads = _retained_grad(
                losses,
                parameters,
                grad_outputs=self._identity_for(losses),
                is_grads_batched=True,
                allow_unused=True,
            )
        else:
            grads = self._through_frontiers(roots, frontiers, losses, parameters)  # type: ignore[arg-type]
        for name, grad in zip(self.parameter_names, grads, strict=True):
            if grad is None:
                raise ValueError(f"no task loss reaches the shared parameter {name}")
        return list(grads)

    def _through_frontiers(
        self,
        roots: Sequence[GradientEdge],
        frontiers: list[list[GradientEdge]],
        losses: Tensor,
        parameters: Sequence[Tensor],
    ) -> tuple[Tensor | None, ...]:
        """The batched backward in two stages: each task's loss back through its own head to
        where the shared part begins (``task_frontiers``), then one batched backward of those
        K gradients through the shared part.

        A batched backward from the losses carries K rows through every head, K - 1 of them
        zero: K^2 head backward passes instead of K (on the toy's network at K = 8, 5 of its 9
        ms). Here each head is crossed once, by its own task.
        """
        edges: dict[tuple[int, int], GradientEdge] = {}
        for frontier in frontiers:
            for edge in frontier:
                edges.setdefault((id(edge.node), edge.output_nr), edge)
        keys = list(edges)
        per_task: list[dict[tuple[int, int], Tensor]] = []
        one = torch.ones((), dtype=losses.dtype, device=losses.device)
        for root, frontier in zip(roots, frontiers, strict=True):
            grads = _retained_grad([root], frontier, grad_outputs=[one], allow_unused=True)
            per_task.append(
                {
                    (id(edge.node), edge.output_nr): grad
                    for edge, grad in zip(frontier, grads, strict=True)
                    if grad is not None
                }
            )
        batched_outputs = []
        for key in keys:
            example = next(task[key] for task in per_task if key in task)
            batched_outputs.append(
                torch.stack([task.get(key, torch.zeros_like(example)) for task in per_task])
            )
        return _retained_grad(
            [edges[key] for key in keys],
            parameters,
            grad_outputs=batched_outputs,
            is_grads_batched=True,
            allow_unused=True,
        )

    def _loop(
        self,
        losses: Tensor | Sequence[Tensor],
        task_names: Sequence[str] | None,
        parameters: Sequence[Tensor],
    ) -> list[Tensor]:
        per_task = []
        for index in range(len(losses)):
            grads = _retained_grad(losses[index], parameters, allow_unused=True)
            for name, grad in zip(self.parameter_names, grads, strict=True):
                if grad is None:
                    raise ValueError(
                        f"task {task_label(index, task_names)}: its loss does not reach the "
                        f"shared parameter {name}; every task needs a gradient for every shared "
                        "parameter (choose parameters that all tasks use"
                        f"{_SHARDING_HINT if _distributed_initialized() else ''})"
                    )
            per_task.append(grads)
        return [torch.stack(grads) for grads in zip(*per_task, strict=True)]
