"""Any other layer with parameters: differentiated by the engine's backward itself.

A layer without a rule of its own (and ``nn.MultiheadAttention``, whose call uses
``in_proj_weight`` and ``out_proj``'s parameters without calling ``out_proj``: the rule covers
its children's parameters too) has its parameters among the tensors that the engine's backward
differentiates, next to the anchor that reaches the taps: each task's gradient of them comes
out of the same pass that carries the activation gradients, at the cost of the layer's own
weight gradients and no second walk through it. Those K gradients are held until the pass
ends (K x the parameters of such layers).
"""

from __future__ import annotations

from fused_mtl.ops.layer_gram.rule import LayerRule


class ModuleJacobianRule(LayerRule):
    """A layer whose parameters the engine's backward differentiates; see the module
    docstring."""

    through_engine_backward = True

    def __init__(self, owns_children: bool = False) -> None:
        self.owns_children = owns_children
