"""Which rule a layer gets: the first entry of ``RULES`` whose type it is, else the generic one.

Adding a layer type is adding its rule's file and one line here.
"""

from __future__ import annotations

from torch import nn

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


def rule_for(module: nn.Module) -> LayerRule:
    """The rule of ``module``'s type."""
    for types, rule in RULES:
        if isinstance(module, types):
            return rule
    return _GENERIC
