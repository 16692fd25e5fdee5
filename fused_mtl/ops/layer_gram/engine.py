"""The per-task Gram of the shared layers, one layer at a time, from activation gradients.

For K task losses and shared layers with parameters ``W_1 .. W_n``, ``LayerGram`` computes the
Gram ``M = sum_l J_l J_l^T`` of the per-task gradients without ever holding them all:

1. Each shared layer's forward hook records its call (``LayerCall``: inputs, the outputs'
   shapes) in a tap on its outputs, an identity whose backward, during step 2 only, hands the
   layer's per-task output gradients to the layer's rule (``rules.rule_for``). The calls a
   Gram uses are the taps in its losses' graph; nothing is kept between calls.
2. A backward of the K losses runs from the losses to the taps: batched by ``torch.func.vmap``
   over the K rows of the identity (``batched``), or one task at a time. It computes activation
   gradients only: no parameter is differentiated but those of the layers whose rule asks for
   it (``ModuleJacobianRule``: attention, any layer without a rule), so no other weight
   gradient is formed. Below the lowest tap nothing runs.
3. Batched, as a layer's ``(K, *output)`` gradients arrive its rule adds its share to ``M`` and
   they are freed: the peak extra memory is about K times the largest layer's output gradient
   (and the rule's own work, at most K times the layer's parameters), never K times all of
   them. One task at a time, autograd's own backward of a layer (input and weight gradients in
   one call) is cheaper than a rule's second pass over it: each pass differentiates every
   parameter but those of the layers whose Gram is cheaper from their rows' products (wide
   linear layers at a small batch), whose calls hold their K output gradients (``_Held``)
   until the last pass; the others' K per-task gradients are held (K x their parameters).

A parameter used by several calls (a layer called twice, a weight tied between two layers) has
gradients that are sums over its uses, whose Gram has cross terms: its per-task gradients are
summed over the calls as they arrive and its share is added once, after the backward.

Under ``torch.distributed`` the Gram is that of the *global* per-task gradients (the means over
the ranks). Their products across ranks need the gradients themselves, so each layer's rule
gives its per-task gradients (no row products), and as they arrive one ``reduce_scatter`` of
K x the layer's parameters (in float32 at least) gives each rank the sum over ranks of a block
of their columns, whose Gram it adds (``TaskSync.shard_gram``); the caller then sums the ranks'
shares in one ``all_reduce`` of K x K numbers. What crosses the wire is what the per-task
gradients of every parameter send (K x P numbers per call), a layer at a time. The layers
arrive in the backward's order, the same on every rank for the same model.

The final update is the ordinary backward of ``sum_i w_i L_i``, by the caller.

Whether the engine's Gram is the Gram of the per-task gradients depends on the model calling
its layers as modules: a parameter used outside its layer's call (a head that multiplies by a
trunk's weight directly) has a share that no tap sees. ``verify`` checks one call's Gram
against K + 1 ordinary backward passes (the per-task norms and the norm of the sum, one
parameter-sized gradient at a time): the caller runs it on the first call.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from fused_mtl.ops.layer_gram.rule import LayerCall, LayerRule
from fused_mtl.ops.layer_gram.rules import rule_for
from fused_mtl.ops.task_gradients import graph_nodes
from fused_mtl.reference import compute_dtype


class NoLayerCalls(RuntimeError):
    """The losses' graph holds no call of a shared layer that the hooks recorded."""


class LayerGram:
    """The Gram of the per-task gradients of a module's parameters; see the module docstring.

    ``shared``: the module whose parameters are shared (e.g. ``model.trunk``); every one of its
    sub-modules that owns parameters is hooked, with the rule of its type.
    """

    def __init__(self, shared: nn.Module, batched: bool | None = None) -> None:
        self.batched = batched
        self.layers: list[tuple[nn.Module, LayerRule, list[Tensor]]] = []
        self._find_layers(shared, set())
        # The parameters of the layers whose rule has them differentiated by the engine's own
        # backward (``ModuleJacobianRule``), each once.
        direct: dict[int, Tensor] = {}
        for _, rule, own in self.layers:
            if rule.through_engine_backward:
                for parameter in own:
                    direct.setdefault(id(parameter), parameter)
        self._direct = list(direct.values())
        #: Maps the parameters to the tensors autograd differentiates (FSDP2's unsharded ones).
        self.resolve: Callable[[list[Tensor]], list[Tensor]] = list
        self._collecting = False
        self._reduce: Callable[[list[Tensor]], Tensor] | None = None
        # Looping over the tasks: the rows of the current pass, and what each call holds.
        self._rows: slice | None = None
        self._held: dict[int, _Held] = {}
        self._delivered: set[int] = set()
        self._start()

    def _start(self) -> None:
        """The per-object state that is not copied: the hooks and the anchors."""
        self._by_module = {id(module): (rule, own) for module, rule, own in self.layers}
        self._anchors: dict[torch.device, Tensor] = {}
        recorder = _CallRecorder(self)
        self._hooks = [
            module.register_forward_hook(recorder, with_kwargs=True) for module, _, _ in self.layers
        ]
        # The hooks live on the user's modules: they go when this object does.
        self._finalizer = weakref.finalize(self, _remove_hooks, self._hooks)

    def _find_layers(self, module: nn.Module, seen: set[int]) -> None:
        if id(module) in seen:  # a module registered under two parents: hooked once
            return
        seen.add(id(module))
        rule = rule_for(module)
        own = rule.parameters(module)
        if own:
            self.layers.append((module, rule, own))
        if rule.owns_children:
            return
        for child in module.children():
            self._find_layers(child, seen)

    # -- recording ------------------------------------------------------------------------

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling() or _inside_transform():
            # No graph to tap; or a function transform (torch.func, the engine's own vmap
            # running an activation checkpoint's recomputation), inside which a tap would be a
            # wrapped tensor of that transform's.
            return output
        flat, spec = tree_flatten(output)
        positions = [
            index
            for index, value in enumerate(flat)
            if isinstance(value, Tensor) and value.requires_grad
        ]
        if not positions:
            return output
        tensors = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, Tensor)]
        rule, _ = self._by_module[id(module)]
        outputs = [flat[index] for index in positions]
        call = LayerCall(
            module,
            args,
            kwargs,
            tuple((value.shape, value.dtype, value.device) for value in outputs),
            module.training,
            tuple(tensor._version for tensor in tensors),
            delivers=not rule.through_engine_backward,
        )
        # Every call is tapped, so that the losses' graph shows which calls they come from.
        anchor = self._anchor(outputs[0].device)
        tapped = _Tap.apply(self, call, anchor, *outputs)
        for index, value in zip(positions, tapped, strict=True):
            flat[index] = value
        return tree_unflatten(flat, spec)

    def _anchor(self, device: torch.device) -> Tensor:
        """A leaf on ``device`` that every tap takes as an input: the batched backward
        differentiates it, so that it reaches every tap and nothing below them."""
        anchor = self._anchors.get(device)
        if anchor is None:
            anchor = torch.zeros((), device=device, requires_grad=True)
            self._anchors[device] = anchor
        return anchor

    def __getstate__(self) -> dict[str, object]:
        # Hooks, anchors and the finalizer are this object's: a copy makes its own.
        hidden = ("_hooks", "_finalizer", "_anchors", "_by_module")
        return {key: value for key, value in self.__dict__.items() if key not in hidden}

    def __setstate__(self, state: dict[str, object]) -> None:
        # A copy of the model and its balancer together (copy.deepcopy, a pickle): the copied
        # layers carry the original's inert hook; the copy hooks them anew.
        self.__dict__.update(state)
        self._start()

    def remove(self) -> None:
        """Take the hooks off the layers."""
        _remove_hooks(self._hooks)
        self._hooks.clear()

    # -- the Gram -------------------------------------------------------------------------

    def __call__(
        self,
        losses: Tensor,
        reduce: Callable[[list[Tensor]], Tensor] | None = None,
    ) -> Tensor:
        """The ``(K, K)`` Gram of the per-task gradients of ``losses`` (``(K,)``, with a graph
        through the recorded calls). ``reduce`` (under torch.distributed): this rank's share of
        the Gram of the sum over ranks of ``(K, P)`` gradients (``TaskSync.shard_gram``); the
        result is then the sum of those shares."""
        # The calls the losses come from: the taps in their graph (not whatever forward ran
        # last: a validation pass, another batch).
        calls = [
            node.call  # type: ignore[attr-defined]
            for node in graph_nodes(losses.grad_fn)
            if type(node).__name__ == "_TapBackward" and node.engine is self  # type: ignore[attr-defined]
        ]
        if not calls:
            raise NoLayerCalls(
                "the losses' graph holds no recorded call of a shared layer (a model compiled "
                "by torch.compile runs no hooks; a copy of the model alone carries them inert: "
                "build the balancer on the copy)"
            )
        num_tasks = losses.shape[0]
        dtype = compute_dtype(self.layers[0][2][0].dtype)
        # The coarsest dtype the layers computed in (bfloat16 under autocast): verify's scale.
        self.coarsest_eps = max(
            [
                torch.finfo(dtype).eps
                for call in calls
                for _, dtype, _ in call.outputs
                if dtype.is_floating_point
            ],
            default=torch.finfo(torch.float32).eps,
        )
        calls = [call for call in calls if call.delivers]
        uses: dict[int, int] = {}
        for call in calls:
            for parameter in self._parameters(call):
                uses[id(parameter)] = uses.get(id(parameter), 0) + 1
        # The layers' products are in ``dtype``; their sum, like the fused Gram, in float64.
        self._gram = torch.zeros(num_tasks, num_tasks, dtype=torch.float64, device=losses.device)
        self._shared_calls = {
            id(call) for call in calls if any(uses[id(p)] > 1 for p in self._parameters(call))
        }
        self._sums: dict[int, tuple[Tensor, Tensor]] = {}
        self._reduce, self._dtype = reduce, dtype
        anchor = self._anchor(losses.device)
        identity = torch.eye(num_tasks, dtype=losses.dtype, device=losses.device)
        self._num_tasks = num_tasks

        batched = self.batched if self.batched is not None else losses.device.type == "cuda"
        direct_parameters = list(self._direct)
        if batched:
            self._delivered = {id(call) for call in calls}
        else:
            # One task at a time, autograd's own backward of a layer (its input and weight
            # gradients in one call) is cheaper than a rule's second pass over the layer: every
            # parameter is differentiated but those of the layers whose Gram is cheaper from
            # their rows' products, which alone receive their output gradients.
            self._delivered = set()
            rowwise: dict[int, bool] = {}
            for call in calls:
                cheaper = (
                    id(call) not in self._shared_calls
                    and reduce is None
                    and self._rule(call.module).prefers_output_gradients(call, num_tasks)
                )
                rowwise[id(call.module)] = rowwise.get(id(call.module), True) and cheaper
            seen = {id(parameter) for parameter in direct_parameters}
            for call in calls:
                if rowwise[id(call.module)]:
                    self._delivered.add(id(call))
                    continue
                for parameter in self._parameters(call):
                    if id(parameter) not in seen:
                        seen.add(id(parameter))
                        direct_parameters.append(parameter)
        direct = self.resolve(direct_parameters)

        def backward(row: Tensor) -> tuple[Tensor, ...]:
            # Only the anchor and the direct parameters are differentiated: every tap is on
            # the way to the anchor, and no other parameter's gradient is formed.
            return torch.autograd.grad(
                losses,
                [anchor, *direct],
                row,
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )

        self._collecting = True
        try:
            if batched:
                with warnings.catch_warnings():
                    # An operation without a batching rule (CPU attention's backward) runs once
                    # per task: slower, exact, and nothing the user's code can change.
                    warnings.filterwarnings("ignore", "There is a performance drop")
                    direct_grads = list(torch.func.vmap(backward)(identity)[1:])
            else:
                direct_grads = [p.new_empty((num_tasks, *p.shape), dtype=dtype) for p in direct]
                for task in range(num_tasks):
                    self._rows = slice(task, task + 1)
                    grads = backward(identity[task])[1:]
                    for buffer, grad in zip(direct_grads, grads, strict=True):
                        buffer[task] = grad
                self._rows = None
                held, self._held = self._held, {}
                for entry in held.values():
                    self._add(entry.call, entry.output_grads)  # type: ignore[arg-type]
            if direct_grads:
                self._add_flat(
                    torch.cat([g.reshape(num_tasks, -1).to(dtype) for g in direct_grads], 1)
                )
            # The parameters used by several calls: their summed gradients, once.
            for _, grads in self._sums.values():
                self._add_flat(grads.reshape(num_tasks, -1))
        finally:
            self._collecting = False
            self._rows, self._held, self._sums = None, {}, {}
            self._reduce = None
        gram = self._gram
        del self._gram
        return symmetric(gram)

    def _rule(self, module: nn.Module) -> LayerRule:
        return self._by_module[id(module)][0]

    def _parameters(self, call: LayerCall) -> list[Tensor]:
        return self._by_module[id(call.module)][1]

    def _receive(self, call: LayerCall, output_grads: list[Tensor]) -> None:
        """A layer's ``(K, *output)`` gradients (one task's rows when looping)."""
        module = call.module
        for value, version in zip(_tensors(call), call.versions, strict=True):
            if value._version != version:
                raise RuntimeError(
                    f"shared layer {module}: its input was changed in place after the layer "
                    "ran (an in-place operation such as nn.ReLU(inplace=True) before it), so "
                    "its recorded input is no longer the one its gradient came from; use the "
                    "operation with inplace=False"
                )
        if self._rows is None:
            self._add(call, output_grads)
            call.cache.clear()
            return
        # One task's rows: held until every task's pass is done (``_Held``).
        entry = self._held.get(id(call))
        if entry is None:
            entry = self._held[id(call)] = _Held(call)
        entry.put(output_grads, self._rows, self._num_tasks)

    def _add(self, call: LayerCall, output_grads: list[Tensor]) -> None:
        """A call's share of the Gram, from every task's output gradients."""
        rule = self._rule(call.module)
        if id(call) in self._shared_calls or self._reduce is not None:
            self._add_gradients(call, rule.task_gradients(call, output_grads, self._dtype))
            return
        self._gram += rule.gram(call, output_grads, self._dtype).double()

    def _add_gradients(self, call: LayerCall, task_grads: list[Tensor]) -> None:
        """A call's share of the Gram, from every task's gradients of its parameters."""
        if id(call) in self._shared_calls:
            for parameter, grad in zip(self._parameters(call), task_grads, strict=True):
                held = self._sums.get(id(parameter))
                self._sums[id(parameter)] = (parameter, grad if held is None else held[1] + grad)
            return
        self._add_flat(torch.cat([grad.reshape(grad.shape[0], -1) for grad in task_grads], 1))

    def _add_flat(self, flat: Tensor) -> None:
        """The share of ``(K, P)`` per-task gradients (over the ranks with ``reduce``)."""
        if self._reduce is not None:
            self._gram += self._reduce([flat])
            return
        self._gram += (flat @ flat.T).double()

    def verify(self, losses: Tensor, gram: Tensor, parameters: Sequence[Tensor]) -> str | None:
        """``None`` when ``gram`` agrees with ordinary backward passes through ``parameters``
        (each task's squared norm, and that of the sum of the tasks); else what differs."""
        squares = []
        num_tasks = losses.shape[0]
        for index in range(num_tasks + 1):
            target = losses.sum() if index == num_tasks else losses[index]
            grads = torch.autograd.grad(target, parameters, retain_graph=True, allow_unused=True)
            squares.append(
                sum(
                    (g.detach().to(gram.dtype).square().sum() for g in grads if g is not None),
                    torch.zeros((), dtype=gram.dtype, device=gram.device),
                )
            )
        expected = torch.stack(squares)
        found = torch.cat([gram.diagonal(), gram.sum().reshape(1)])
        # The two add the same products in another order, and autograd rounds the products of
        # layers that ran in a lower precision (autocast) to it: a few ulps of the coarsest
        # dtype. Its square root (3e-4 in float32, 0.09 in bfloat16) is far above that, and
        # below a missed share. Each task against its own norm (the tasks' losses may differ by
        # orders of magnitude: a sum of squares is rounded relative to itself); the sum, whose
        # cross terms can cancel, against the square of the sum of the norms.
        eps = max(getattr(self, "coarsest_eps", 0.0), torch.finfo(torch.float32).eps)
        scales = expected.clone()
        scales[-1] = expected[:-1].clamp(min=0).sqrt().sum().square()
        tolerance = eps**0.5 * scales + torch.finfo(torch.float64).tiny
        if bool(((found - expected).abs() <= tolerance).all()):
            return None
        worst = int(((found - expected).abs() / tolerance).argmax())
        what = "the sum of the tasks" if worst == num_tasks else f"task {worst}"
        return (
            f"the layers' Gram disagrees with per-task backward passes on {what}'s squared "
            f"gradient norm ({float(found[worst]):.6g} against {float(expected[worst]):.6g}): "
            "a shared parameter is used outside its layer's call (a weight tied to a head, or "
            "used directly by another module)"
        )


class _Held:
    """A layer call's K output gradients, while the tasks' backward passes run one at a time
    (for a rule whose Gram is cheaper from them: ``LinearRule``'s rows' products)."""

    def __init__(self, call: LayerCall) -> None:
        self.call = call
        self.output_grads: list[Tensor] | None = None

    def put(self, rows: list[Tensor], where: slice, num_tasks: int) -> None:
        if self.output_grads is None:
            self.output_grads = [row.new_empty((num_tasks, *row.shape[1:])) for row in rows]
        for buffer, row in zip(self.output_grads, rows, strict=True):
            buffer[where] = row


def _remove_hooks(hooks: list[Any]) -> None:
    for hook in hooks:
        hook.remove()


def _inside_transform() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev) is running."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def symmetric(gram: Tensor) -> Tensor:
    """``gram`` with its lower triangle the mirror of its upper one (their sums of products
    are the same up to rounding)."""
    return torch.triu(gram) + torch.triu(gram, diagonal=1).T


def _tensors(call: LayerCall) -> list[Tensor]:
    return [
        value for value in tree_flatten((call.args, call.kwargs))[0] if isinstance(value, Tensor)
    ]


class _CallRecorder:
    """The layers' forward hook. It lives on the user's modules: it holds its ``LayerGram``
    weakly (it keeps no balancer alive and does nothing once it is gone), and a pickled or
    deep-copied model carries it inert."""

    def __init__(self, owner: LayerGram) -> None:
        self._owner: weakref.ref[LayerGram] | None = weakref.ref(owner)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        owner = self._owner() if self._owner is not None else None
        if owner is None:
            return output
        return owner._record(module, args, kwargs, output)

    def __getstate__(self) -> dict[str, object]:
        return {}

    def __setstate__(self, state: dict[str, object]) -> None:
        self._owner = None


class _Tap(torch.autograd.Function):
    """The identity on a layer's outputs; in the engine's batched backward it hands their
    gradients to the engine (``_Deliver``) and gives the anchor a zero gradient."""

    @staticmethod
    def forward(engine: LayerGram, call: LayerCall, anchor: Tensor, *outputs: Tensor) -> Any:
        return tuple(output.detach() for output in outputs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.engine, ctx.call = inputs[0], inputs[1]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        engine, call = ctx.engine, ctx.call
        if not engine._collecting or id(call) not in engine._delivered:
            return (None, None, None, *grads)
        present = [
            grad if grad is not None else torch.zeros(shape, dtype=dtype, device=device)
            for grad, (shape, dtype, device) in zip(grads, call.outputs, strict=True)
        ]
        anchor_grad = _Deliver.apply(engine, call, *present)
        return (None, None, anchor_grad, *grads)


class _Deliver(torch.autograd.Function):
    """Called inside the vmapped backward: its ``vmap`` rule sees the K rows at once."""

    @staticmethod
    def forward(engine: LayerGram, call: LayerCall, *grads: Tensor) -> Tensor:
        # Outside vmap (one task): the gradients of one row.
        engine._receive(call, [grad.unsqueeze(0) for grad in grads])
        return grads[0].new_zeros(())

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        pass

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple, engine: LayerGram, call: LayerCall, *grads: Tensor
    ) -> tuple:
        rows = [
            grad.movedim(dim, 0) if dim is not None else grad.expand(info.batch_size, *grad.shape)
            for grad, dim in zip(grads, in_dims[2:], strict=True)
        ]
        engine._receive(call, rows)
        return grads[0].new_zeros(()), None
