"""The per-task Gram one shared layer at a time (``LayerGram``), with one rule per layer type.

- ``choice``: whether a balancer takes the layers' Gram (checked on the first call).
- ``engine``: the hooks, the batched backward of activation gradients, the accumulation.
- ``rule``: what a rule is (``LayerRule``, ``LayerCall``).
- ``linear``, ``conv``, ``embedding``, ``norm``: the rules of those layers.
- ``module_jacobian``: any other layer (and ``nn.MultiheadAttention``).
- ``rules``: which rule a layer gets.
"""

from fused_mtl.ops.layer_gram.choice import PER_TASK_GRADIENTS, LayerGramChoice
from fused_mtl.ops.layer_gram.engine import LayerGram
from fused_mtl.ops.layer_gram.rules import rule_for

__all__ = ["PER_TASK_GRADIENTS", "LayerGram", "LayerGramChoice", "rule_for"]
