"""``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``: the per-task gradients in one weight backward.

A convolution's weight gradient is ``sum_n x_n (*) delta_n``, the same input ``x`` for every
task. The K tasks' output gradients set side by side as ``K x out_channels`` output channels
(group by group, so that ``groups`` keeps its meaning) are then one convolution's output
gradient, and one call of the convolution's weight backward gives every task's gradient:
``(K out, in / groups, *kernel)``, with no unfolded input (a 3 x 3 layer of 64 channels on
32 x 32 inputs at batch 64 would unfold to 151 MB). The row products of ``LinearRule`` would
have a row per output position (65536 here): the per-task gradients are cheaper for every
convolution this rule sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fused_mtl.ops.layer_gram.rule import LayerCall, LayerRule, first_tensor


class ConvRule(LayerRule):
    """``nn.Conv1d/2d/3d``; see the module docstring."""

    def task_gradients(
        self, call: LayerCall, output_grads: Sequence[Tensor], dtype: torch.dtype
    ) -> list[Tensor]:
        module: nn.modules.conv._ConvNd = call.module  # type: ignore[assignment]
        dims = len(module.kernel_size)
        inputs = first_tensor(call).detach().to(dtype)
        grads = output_grads[0].to(dtype)
        if inputs.dim() == dims + 1:  # an unbatched call: (C, *spatial)
            inputs, grads = inputs.unsqueeze(0), grads.unsqueeze(1)
        padding = module.padding
        if isinstance(padding, str) or module.padding_mode != "zeros":
            # The layer pads the input itself (a padding mode, or "same" / "valid").
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            inputs = F.pad(inputs, module._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * dims
        num_tasks, batch = grads.shape[:2]
        groups, out_channels = module.groups, module.out_channels
        per_group = out_channels // groups
        spatial = grads.shape[3:]
        # (K, N, O, *S) -> (N, groups, K, O / groups, *S) -> (N, groups K O / groups, *S)
        stacked = grads.reshape(num_tasks, batch, groups, per_group, *spatial)
        stacked = stacked.movedim(0, 2).reshape(batch, groups * num_tasks * per_group, *spatial)
        weight_shape = (groups * num_tasks * per_group, *module.weight.shape[1:])
        weight = inputs.new_empty(weight_shape)
        _, weight_grad, _ = torch.ops.aten.convolution_backward(
            stacked,
            inputs,
            weight,
            None,
            list(module.stride),
            list(padding),
            list(module.dilation),
            False,
            [0] * dims,
            groups,
            [False, True, False],
        )
        weight_grad = weight_grad.reshape(groups, num_tasks, per_group, *module.weight.shape[1:])
        result = []
        if module.weight.requires_grad:
            result.append(weight_grad.movedim(1, 0).reshape(num_tasks, *module.weight.shape))
        if module.bias is not None and module.bias.requires_grad:
            result.append(grads.sum(dim=(1, *range(3, grads.dim()))))
        return result
