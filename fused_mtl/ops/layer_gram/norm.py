"""Normalisation layers' affine parameters: LayerNorm, RMSNorm, GroupNorm, BatchNorm.

Each computes ``y = x_hat * gamma + beta`` with ``x_hat`` the normalised input, so task i's
gradients are ``dL_i/dgamma = sum(delta_i * x_hat)`` and ``dL_i/dbeta = sum(delta_i)``, summed
over every dimension but the parameter's. ``x_hat`` is computed again from the recorded input
with the layer's own statistics: over the normalised shape (LayerNorm, RMSNorm), per group
(GroupNorm), and for BatchNorm the batch's when the call was in training mode (or keeps no
running statistics), else the running ones, which the call did not change.

BatchNorm in training mode mixes the samples of a batch through its statistics; that mixing is
in the gradient of its *input*, which the batched backward carries exactly, not in those of
gamma and beta, which are the sums above. ``nn.SyncBatchNorm``'s statistics are the global
batch's, which this process's input does not give: it has no rule here (it goes to the
per-task gradients of the whole model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_mtl.ops.layer_gram.rule import LayerCall, LayerRule, first_tensor


def normalised_input(call: LayerCall, dtype: torch.dtype) -> tuple[Tensor, int]:
    """``x_hat`` in ``dtype`` and how many trailing dimensions the parameters span (``-1``:
    one per channel, dimension 1)."""
    module = call.module
    inputs = first_tensor(call).detach().to(dtype)
    if isinstance(module, nn.LayerNorm):
        shape = module.normalized_shape
        return F.layer_norm(inputs, shape, None, None, module.eps), len(shape)
    if isinstance(module, nn.RMSNorm):
        shape = module.normalized_shape
        return F.rms_norm(inputs, shape, None, module.eps), len(shape)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(inputs, module.num_groups, None, None, module.eps), -1
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)
    batch_statistics = call.training or module.running_mean is None
    mean = None if batch_statistics else module.running_mean.to(dtype)
    var = None if batch_statistics else module.running_var.to(dtype)  # type: ignore[union-attr]
    hat = F.batch_norm(inputs, mean, var, None, None, batch_statistics, 0.0, module.eps)
    return hat, -1


class NormRule(LayerRule):
    """LayerNorm, RMSNorm, GroupNorm and BatchNorm (not SyncBatchNorm); see the module
    docstring."""

    def task_gradients(
        self, call: LayerCall, output_grads: Sequence[Tensor], dtype: torch.dtype
    ) -> list[Tensor]:
        module = call.module
        # x_hat once per call (a layer called twice, or the local and reduced shares).
        if "hat" not in call.cache:
            call.cache["hat"], call.cache["trailing"] = normalised_input(call, dtype)
        hat, trailing = call.cache["hat"], int(call.cache["trailing"])
        grads = output_grads[0].to(dtype)
        if trailing == -1:  # one parameter per channel: dimension 1 of (N, C, *spatial)
            summed = tuple(d for d in range(1, grads.dim()) if d != 2)
        else:
            summed = tuple(range(1, grads.dim() - trailing))
        result = []
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if weight is not None and weight.requires_grad:
            result.append((grads * hat).sum(summed))
        if bias is not None and bias.requires_grad:
            result.append(grads.sum(summed))
        return result
