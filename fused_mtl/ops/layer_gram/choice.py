"""Whether a balancer's Gram comes from the layers (``LayerGram``) or from the per-task
gradients of every shared parameter (``TaskGradients``).

``"auto"`` (the default of every gradient method) takes the layers when the shared parameters
are given as a module, and checks their Gram on the first call against K + 1 ordinary backward
passes (``LayerGram.verify``); it keeps the layers only if that check passes (on every rank),
and otherwise takes the per-task gradients from then on, with ``reason`` saying why: a layer
whose backward cannot be batched, a parameter used outside its layer's call, a first call that
ran no shared layer (a model compiled by ``torch.compile``, whose hooks do not run). A later
call that finds no recorded layer call also moves to the per-task gradients. ``"layers"``
raises instead of moving.

How the layers' backward runs (``LayerGram.batched``): on CUDA, batched (one walk of the graph
for the K tasks). Elsewhere the first call runs it batched and the second one task at a time,
and the faster is kept: on one CPU thread the loop was 2.3x faster on a ResNet-style CNN
(functorch's batched BatchNorm and ReLU backward run about 5x slower than K native calls) and
1.4x on a transformer encoder, the batched backward 1.1x faster on a 4 x 1024 MLP.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fused_mtl.ops.layer_gram.engine import LayerGram, NoLayerCalls
from fused_mtl.ops.task_gradients import first_line

#: ``per_task_gradients`` of the gradient methods: ``"layers"`` is this module's Gram, the
#: others ``TaskGradients``' modes.
PER_TASK_GRADIENTS = ("auto", "layers", "batched", "loop")


class LayerGramChoice:
    """The layers' Gram while it can be used; see the module docstring."""

    def __init__(self, shared: nn.Module, requested: str) -> None:
        self.engine = LayerGram(shared)
        self.requested = requested
        self.active = True
        self.checked = False
        # Off CUDA, the wall time of the first call's batched backward, against which the
        # second call's loop over the tasks is timed (LayerGram.batched).
        self._batched_seconds = float("inf")
        self.reason = "not chosen yet: the layers' Gram is checked on the first call"

    def __call__(
        self,
        losses: Tensor,
        parameters: Sequence[Tensor],
        reduce: Callable[[list[Tensor]], Tensor] | None,
        agree: Callable[[Tensor], Tensor] | None,
    ) -> Tensor | None:
        """The Gram ``(K, K)`` of the per-task gradients (with ``reduce``, this rank's share of
        the global one: see ``LayerGram``), or ``None`` when the per-task gradients must give
        it (from this call on)."""
        if not self.checked:
            return self._first(losses, parameters, reduce, agree)
        try:
            if self.engine.batched is None:
                return self._timed_loop(losses, reduce, agree)
            return self.engine(losses, reduce)
        except NoLayerCalls as missing:  # found before any collective, alike on every rank
            self._give_up(str(missing))
            return None

    def _timed_loop(
        self,
        losses: Tensor,
        reduce: Callable[[list[Tensor]], Tensor] | None,
        agree: Callable[[Tensor], Tensor] | None,
    ) -> Tensor:
        """The second call off CUDA: one task at a time, timed; the faster of it and the first
        call's batched backward is kept (on every rank: the loop only if every rank found it
        faster)."""
        self.engine.batched = False
        started = time.perf_counter()
        try:
            gram = self.engine(losses, reduce)
        finally:
            self.engine.batched = None
        loop_faster = time.perf_counter() - started < self._batched_seconds
        if agree is not None:
            flag = torch.tensor([1.0 if loop_faster else 0.0], device=losses.device)
            loop_faster = float(agree(flag)[0]) == 1.0
        self.engine.batched = not loop_faster
        return gram

    def _first(
        self,
        losses: Tensor,
        parameters: Sequence[Tensor],
        reduce: Callable[[list[Tensor]], Tensor] | None,
        agree: Callable[[Tensor], Tensor] | None,
    ) -> Tensor | None:
        gram: Tensor | None = None
        problem: str | None = None
        way = ""
        # This rank's own Gram first, with no collective: a rank whose backward fails leaves
        # none of the others waiting in one. The calls stay in the losses' graph, for a
        # second try and for the global Gram once the ranks agreed.
        for batched in (True, False):
            self.engine.batched = batched
            started = time.perf_counter()
            try:
                gram = self.engine(losses)
            except NoLayerCalls as missing:
                problem = str(missing)
                break
            except Exception as error:  # whatever the model's backward raises: noted
                if not batched:
                    problem = f"the layers' backward failed: {first_line(error)}"
                    break
                way = f" (one task at a time: the batched backward failed: {first_line(error)})"
                continue
            if batched and losses.device.type != "cuda":
                self._batched_seconds = time.perf_counter() - started
            problem = self.engine.verify(losses, gram, parameters)
            break
        # Off CUDA after a batched first call: the second call is timed one task at a time.
        # After a failed batched call: one task at a time from now on.
        self.engine.batched = False if way else None
        if not way and losses.device.type == "cuda":
            self.engine.batched = True
        if agree is not None:
            # Every rank takes the layers, or none does: their Grams are summed over the ranks.
            flag = torch.tensor([0.0 if problem else 1.0], device=losses.device)
            if float(agree(flag)[0]) == 0.0 and problem is None:
                problem = "another rank cannot use the layers' Gram"
        self.checked = True
        if problem is not None:
            self._give_up(problem)
            return None
        self.reason = (
            "the Gram of the shared layers, one layer at a time, from a backward of the "
            f"activation gradients{way}; checked against per-task backward passes on the first "
            "call"
        )
        if reduce is not None:
            gram = self.engine(losses, reduce)
        return gram

    def _give_up(self, problem: str) -> None:
        if self.requested == "layers":
            raise RuntimeError(
                f"per_task_gradients='layers' cannot be used with this model: {problem}; build "
                "the balancer with per_task_gradients='auto' (which then takes the per-task "
                "gradients) or 'batched'"
            )
        self.active = False
        self.reason = f"the per-task gradients of every shared parameter: {problem}"
        self.engine.remove()
