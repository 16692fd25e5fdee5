"""The op layer, between the methods and the kernels.

- ``backend``: which implementation runs (``"auto"`` / ``"triton"`` / ``"torch"``,
  ``FUSED_MTL_BACKEND``).
- ``uncertainty``: the uncertainty-weighting op (eager ``autograd.Function``, ``torch.library``
  registration for ``torch.compile``, dispatch to the Triton kernels or the reference).
- ``gram``: the Gram matrix and norms of the per-task gradients, likewise.
- ``task_gradients``: the per-task gradients of shared parameters (one batched backward or a
  loop; the two-stage path through the heads' frontiers).
- ``layer_gram``: the Gram of the per-task gradients one shared layer at a time, one rule per
  layer type.

Kernels are imported from here only, lazily, so that ``import fused_mtl`` works without triton.
"""
