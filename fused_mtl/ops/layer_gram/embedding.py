"""``nn.Embedding``: each task's gradient is its output gradients added at the looked-up rows.

Task i's gradient of the table is ``sum_n e_{idx_n} delta_{i,n}^T``: only the rows that the
batch looks up are non-zero. The rule adds the output gradients into a ``(K, V, dim)`` table
when the vocabulary ``V`` is no larger than the number of lookups; for the Gram alone, and a
larger vocabulary, into one row per distinct index (``torch.unique``, which reads their count
back to the host): the rows' Gram is the table's. The padding
index's row gets no gradient, and ``scale_grad_by_freq`` divides a row by its lookup count, as
the layer's own backward does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fused_mtl.ops.layer_gram.rule import LayerCall, LayerRule, first_tensor, gram_of


class EmbeddingRule(LayerRule):
    """``nn.Embedding``; see the module docstring."""

    def task_gradients(
        self, call: LayerCall, output_grads: Sequence[Tensor], dtype: torch.dtype
    ) -> list[Tensor]:
        return [self._rows(call, output_grads, dtype, compact=False)]

    def prefers_output_gradients(self, call: LayerCall, num_tasks: int) -> bool:
        module: nn.Embedding = call.module  # type: ignore[assignment]
        return module.num_embeddings > first_tensor(call).numel()

    def gram(self, call: LayerCall, output_grads: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
        return gram_of([self._rows(call, output_grads, dtype, compact=True)])

    def _rows(
        self, call: LayerCall, output_grads: Sequence[Tensor], dtype: torch.dtype, compact: bool
    ) -> Tensor:
        """The per-task gradients of the table: every row, or (``compact``, for the Gram) the
        looked-up rows only when they are fewer than the table's."""
        module: nn.Embedding = call.module  # type: ignore[assignment]
        indices = first_tensor(call).reshape(-1)
        grads = output_grads[0]
        num_tasks = grads.shape[0]
        grads = grads.reshape(num_tasks, -1, module.embedding_dim).to(dtype)
        if module.padding_idx is not None:
            grads = grads * indices.ne(module.padding_idx).to(dtype)[None, :, None]
        vocabulary = module.num_embeddings
        if not compact or vocabulary <= indices.numel():
            rows, slots = vocabulary, indices
        else:
            _, slots = torch.unique(indices, return_inverse=True)
            rows = int(slots.max()) + 1 if slots.numel() else 0
        table = grads.new_zeros(num_tasks, rows, module.embedding_dim)
        table.index_add_(1, slots, grads)
        if module.scale_grad_by_freq:
            counts = torch.bincount(slots, minlength=rows).clamp_(min=1).to(dtype)
            table = table / counts[None, :, None]
        return table
