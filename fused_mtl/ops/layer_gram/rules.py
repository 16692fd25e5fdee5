"""Which rule a layer gets: the first entry of ``RULES`` whose type it is, else the generic one.

Adding a layer type is adding its rule's file and one line here.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from fused_mtl.ops.layer_gram.conv import ConvRule
from fused_mtl.ops.layer_gram.embedding import EmbeddingRule
from fused_mtl.ops.layer_gram.linear import LinearRule
from fused_mtl.ops.layer_gram.module_jacobian import ModuleJacobianRule
from fused_mtl.ops.layer_gram.norm import NormRule
from fused_mtl.ops.layer_gram.rule import LayerRule

RULES: tuple[tuple[tuple[type[nn.Module], ...], LayerRule], ...] = (
    ((nn.Linear,), LinearRule()),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), ConvRule()),
    ((nn.Embedding,), EmbeddingRule()),
    ((nn.SyncBatchNorm,), ModuleJacobianRule()),
    (
        (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm),
        NormRule(),
    ),
    ((nn.MultiheadAttention,), ModuleJacobianRule(owns_children=True)),
)

_GENERIC = ModuleJacobianRule()
_GENERIC_WITH_CHILDREN = ModuleJacobianRule(owns_children=True)


def rule_for(module: nn.Module) -> LayerRule:
    """The rule of ``module``'s type, if the module is that layer as torch defines it: a
    subclass that changes ``forward`` or adds parameters (a LoRA adapter), or a parametrized
    layer (``weight_norm``: its ``weight`` is computed from other parameters), gets the
    generic rule."""
    if parametrize.is_parametrized(module):
        return _GENERIC_WITH_CHILDREN
    for types, rule in RULES:
        if isinstance(module, types):
            base = next(kind for kind in types if isinstance(module, kind))
            own = {name for name, _ in module.named_parameters(recurse=False)}
            if rule.through_engine_backward or (
                type(module).forward is base.forward and own <= {"weight", "bias"}
            ):
                return rule
            break
    return _GENERIC
