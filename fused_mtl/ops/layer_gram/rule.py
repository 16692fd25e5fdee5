"""What a layer rule is: a shared layer's share of the per-task Gram, from one of its calls.

A call of a shared layer records its inputs and outputs (``LayerCall``). The batched backward
then brings the layer the K per-task gradients of its outputs, ``(K, *output.shape)`` each, and
the layer's rule turns them into its parameters' per-task gradients, ``(K, *parameter.shape)``
each, or straight into its share of the Gram ``(K, K)`` where that is cheaper (``gram``): the
Gram of a sum of layers is the sum of the layers' Grams, the parameters being distinct.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class LayerCall:
    """One call of a shared layer, as its forward hook saw it."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    #: The shape, dtype and device of each of the layer's outputs that require grad (a tap
    #: holds no output: the layer's backward keeps what it needs).
    outputs: tuple[tuple[torch.Size, torch.dtype, torch.device], ...]
    #: The module's ``training`` flag during the call (BatchNorm's statistics depend on it).
    training: bool
    #: The tensor arguments' versions at the call: an in-place change after it is refused.
    versions: tuple[int, ...] = field(default=())
    #: Whether the tap hands the output gradients to the rule (not for a rule whose layer
    #: the engine's backward differentiates: ``through_engine_backward``).
    delivers: bool = True
    #: What a rule computes from the call once and uses for every task (``NormRule``'s
    #: normalised input), while the call's Gram is being taken.
    cache: dict[str, Any] = field(default_factory=dict)


class LayerRule:
    """The per-task gradients of one kind of layer's own parameters; see the module docstring.

    A rule implements ``task_gradients``; it overrides ``gram`` when the Gram can be had without
    them (``LinearRule``'s products of inputs and output gradients).
    """

    #: Whether the rule covers the parameters of the layer's children too (a layer that uses
    #: its children's parameters without calling them: ``nn.MultiheadAttention``'s ``out_proj``).
    owns_children = False
    #: Whether the layer's parameters are differentiated by the engine's backward itself
    #: (``ModuleJacobianRule``) instead of from the output gradients that a tap hands over.
    through_engine_backward = False

    def parameters(self, module: nn.Module) -> list[Tensor]:
        """The parameters whose per-task gradients the rule gives, in its order."""
        owned = module.parameters(recurse=self.owns_children)
        return [parameter for parameter in owned if parameter.requires_grad]

    def task_gradients(
        self, call: LayerCall, output_grads: Sequence[Tensor], dtype: torch.dtype
    ) -> list[Tensor]:
        """``(K, *parameter.shape)`` per parameter (``parameters``' order), in ``dtype``."""
        raise NotImplementedError

    def prefers_output_gradients(self, call: LayerCall, num_tasks: int) -> bool:
        """Whether ``gram`` is cheaper from the K output gradients than ``task_gradients``
        are: when the tasks' backward passes run one at a time, a call then holds those."""
        return False

    def gram(self, call: LayerCall, output_grads: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        """The layer's share ``(K, K)`` of the Gram, for a call that is its parameters' only
        use in the graph."""
        grads = self.task_gradients(call, output_grads, dtype)
        return gram_of(grads)


def gram_of(task_grads: Sequence[Tensor]) -> Tensor:
    """``sum_p G_p G_p^T`` over per-task gradients ``(K, *shape)`` of several parameters."""
    num_tasks = task_grads[0].shape[0]
    flat = torch.cat([grad.reshape(num_tasks, -1) for grad in task_grads], 1)
    return flat @ flat.T


def first_tensor(call: LayerCall) -> Tensor:
    """The layer's input: its first positional argument (or ``input=``)."""
    value = call.args[0] if call.args else call.kwargs.get("input")
    if not isinstance(value, Tensor):
        raise TypeError(f"{type(call.module).__name__}: its input is not a tensor")
    return value
