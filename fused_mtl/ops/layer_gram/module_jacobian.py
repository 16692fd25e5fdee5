"""Any other layer with parameters: the per-task gradients through the layer's own graph.

The output gradients that the batched backward brings a layer are taken, one task at a time,
back through the part of the graph that the layer's call made, to its parameters only
(``torch.autograd.grad`` from its outputs): K backward passes of that one layer, the cost of
its own weight gradients plus the activation gradients inside it. This is the rule of
``nn.MultiheadAttention`` (whose call uses ``in_proj_weight`` and ``out_proj``'s parameters
without calling ``out_proj``: the rule covers its children's parameters too), of the
transformer layers through it, and of any layer without a rule of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fused_mtl.ops.layer_gram.rule import LayerCall, LayerRule


class ModuleJacobianRule(LayerRule):
    """A layer's per-task gradients from its own graph; see the module docstring."""

    def __init__(self, owns_children: bool = False) -> None:
        self.owns_children = owns_children

    def task_gradients(
        self, call: LayerCall, output_grads: Sequence[Tensor], dtype: torch.dtype
    ) -> list[Tensor]:
        parameters = self.parameters(call.module)
        num_tasks = output_grads[0].shape[0]
        per_task = []
        for task in range(num_tasks):
            grads = torch.autograd.grad(
                call.outputs,
                parameters,
                [grad[task] for grad in output_grads],
                retain_graph=True,
                allow_unused=True,
            )
            per_task.append(
                [
                    torch.zeros_like(p, dtype=dtype) if g is None else g.to(dtype)
                    for p, g in zip(parameters, grads, strict=True)
                ]
            )
        return [torch.stack(column) for column in zip(*per_task, strict=True)]


def owns_children(module: nn.Module) -> bool:
    """Whether a layer uses parameters of children that it does not call."""
    return isinstance(module, nn.MultiheadAttention)
