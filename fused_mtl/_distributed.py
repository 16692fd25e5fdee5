"""What a balancer communicates under ``torch.distributed``: the global view of each task.

Data-parallel training gives every rank its own slice of the batch, so each rank sees its local
task losses and its local per-task gradients. One process trained on the whole batch would see
their means over the ranks (equal local batch sizes, losses that are means over the local
batch). A balancer that weighs its tasks with local numbers gives every rank different weights;
``TaskSync`` gives it the global numbers instead, with the fewest collectives that carry them:

- ``mean(values)``: the mean over ranks of a few numbers (DWA's losses): one ``all_reduce``.
- ``mean_grad(parameter)``: identity in the forward; in the backward, the gradient of the
  parameter averaged over ranks (uncertainty weighting's ``log_vars``): one ``all_reduce`` of K
  numbers, in the backward pass, where the gradient appears.
- ``gather(values)``: every rank's values, in rank order (DTP's KPIs, checked and averaged
  identically everywhere): one ``all_gather``.
- ``gram(task_grads, losses)``: the Gram matrix (or the norms) of the global per-task gradients,
  and the global losses. The global gradient of task i is the mean of the ranks' gradients, and
  its Gram matrix needs their cross terms, so the gradients themselves must be reduced. They are
  reduced *sharded*: one ``reduce_scatter`` of the ``(K, P)`` gradients leaves each rank the sum
  over ranks of ``P / W`` columns, each rank takes the Gram of its columns (the fused kernel), and
  one ``all_reduce`` of ``K*K + K`` numbers adds the partial Grams and the losses. That moves about
  half the bytes of an ``all_reduce`` of the gradients (``(W-1)/W * K*P`` per rank instead of
  ``2 (W-1)/W * K*P``) and never holds more than ``K*P/W`` reduced numbers.
- ``gram_of_samples(gram, losses)``: MGDA-UB's gradients are taken with respect to features,
  whose rows are the rank's own samples, so the global Gram is the sum of the local ones over
  ``W**2``: one ``all_reduce`` of ``K*K + K`` numbers.

Every rank receives the same bytes from a collective, and then computes the same thing from
them: the weights are bit-for-bit identical on every rank.

Syncing is active when ``torch.distributed`` is initialised and the group has more than one
rank; with one process nothing is communicated and nothing changes. The first active call
checks, with one ``all_gather_object``, that every rank built the same balancer (method, task
count, task names); a mismatch is an error on every rank, naming the ranks and the difference,
before any collective whose size could disagree. It then gives every rank rank 0's state of the
balancer (one ``broadcast_object_list``), as DDP does for a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import Module

from fused_mtl._losses import listed
from fused_mtl.ops.backend import Backend
from fused_mtl.ops.gram import task_gram_or_norms, task_matrices

ProcessGroup = Any  # torch.distributed.ProcessGroup, which exists only in builds with distributed


class TaskSync:
    """The collectives of one balancer; see the module docstring.

    Args:
        configuration: what every rank must agree on: the method's name, K and the task names
            (or None).
        enabled: ``False`` turns every collective off (each rank balances on its own numbers).
        process_group: the group to sync over; ``None`` is the default (world) group.
    """

    def __init__(
        self,
        configuration: tuple[str, int, tuple[str, ...] | None],
        enabled: bool,
        process_group: ProcessGroup | None,
    ) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"sync must be True or False, got {enabled!r}")
        if process_group is not None and not enabled:
            raise ValueError("process_group is given but sync=False: give one or the other")
        self.configuration = configuration
        self.enabled = enabled
        self.process_group = process_group
        # id() of the group the first sync ran on: a new default group syncs anew.
        self._synced_group: int | None = None
        self._group_lost = False

    def __deepcopy__(self, memo: dict[int, object]) -> TaskSync:
        # A process group is a handle shared by the whole process, not state to copy (and it
        # cannot be copied): a copy of a balancer (an EMA model, say) syncs over the same group.
        copied = object.__new__(TaskSync)
        copied.__dict__.update(self.__dict__)
        memo[id(self)] = copied
        return copied

    def __getstate__(self) -> dict[str, Any]:
        # A process group cannot be pickled (torch.save of a whole module): the loaded balancer
        # refuses to sync until it is given one, rather than syncing over another group.
        state = dict(self.__dict__)
        state["_group_lost"] = self._group_lost or self.process_group is not None
        state["process_group"] = None
        state["_synced_group"] = None
        return state

    def set_process_group(self, process_group: ProcessGroup | None) -> None:
        """Sync over ``process_group`` from now on (``None``: the default group)."""
        self.process_group = process_group
        self._synced_group = None
        self._group_lost = False

    def active(self, module: Module) -> bool:
        """Whether this call communicates: distributed, initialised, more than one rank.

        The first active call checks that every rank built the same balancer and gives every
        rank rank 0's state of ``module`` (its parameters, buffers and extra state), as DDP does
        for a model: ranks that started from different values (an unseeded initialisation, a
        checkpoint loaded on one rank only) continue identically.
        """
        if not (self.enabled and dist.is_available() and dist.is_initialized()):
            return False
        if self._group_lost:
            raise RuntimeError(
                f"{_described(self.configuration)} was pickled with a process group, which "
                "cannot be saved: call balancer.set_process_group(group) before training it again"
            )
        if dist.get_world_size(self.process_group) == 1:
            return False
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if self._synced_group != id(group):
            # Kept out of compiled graphs: the object collectives pickle Python objects. Wrapped
            # here, not at import: torch.compiler.disable imports dynamo (and triton).
            torch.compiler.disable(self._first_sync)(module)
            self._synced_group = id(group)
        return True

    def _first_sync(self, module: Module) -> None:
        """The configuration check, then rank 0's state to every rank (two object collectives,
        once)."""
        self._check_same_balancer()
        state = {
            key: value.detach().cpu() if isinstance(value, Tensor) else value
            for key, value in module.state_dict().items()
        }
        objects = [state]
        source = 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)
        dist.broadcast_object_list(objects, src=source, group=self.process_group)
        if dist.get_rank(self.process_group) != 0:
            module.load_state_dict(objects[0])

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    def _check_same_balancer(self) -> None:
        """One ``all_gather_object`` of the configuration; raise on every rank if they differ."""
        configs: list[Any] = [None] * dist.get_world_size(self.process_group)
        dist.all_gather_object(configs, self.configuration, group=self.process_group)
        first = configs[0]
        differing = [rank for rank, config in enumerate(configs) if config != first]
        if differing:
            lines = "; ".join(
                f"rank {rank}: {_described(config)}" for rank, config in enumerate(configs)
            )
            raise RuntimeError(
                f"the ranks built different balancers (ranks {differing} differ from rank 0): "
                f"{lines}. Every rank must construct the same method with the same tasks"
            )

    def mean(self, values: Tensor) -> Tensor:
        """The mean over ranks of ``values`` (a new tensor): one ``all_reduce``."""
        total = values.detach().clone()
        dist.all_reduce(total, group=self.process_group)
        return total / self.world_size

    def smallest(self, values: Tensor) -> Tensor:
        """The smallest over ranks of ``values`` (a new tensor): one ``all_reduce``."""
        result = values.detach().clone()
        dist.all_reduce(result, op=dist.ReduceOp.MIN, group=self.process_group)
        return result

    def from_first_rank(self, values: Tensor) -> Tensor:
        """The first rank's ``values`` on every rank (a new tensor): one ``broadcast``. For
        random draws that every rank must share (PCGrad's task orders)."""
        result = values.detach().clone()
        group = self.process_group
        source = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast(result, src=source, group=self.process_group)
        return result

    def gather(self, values: Tensor) -> Tensor:
        """Every rank's ``(n,)`` values, shape ``(W, n)``, in rank order: one ``all_gather``."""
        flat = values.detach().reshape(-1).contiguous()
        gathered = flat.new_empty(self.world_size * flat.numel())
        _collective("all_gather_single", "all_gather_into_tensor")(
            gathered, flat, group=self.process_group
        )
        return gathered.reshape(self.world_size, -1)

    def mean_grad(self, parameter: Tensor) -> Tensor:
        """``parameter`` itself in the forward; its gradient averaged over ranks in the backward."""
        return _MeanGradient.apply(parameter, self)

    def gram(
        self,
        task_grads: Sequence[Tensor],
        losses: Tensor,
        diagonal: bool,
        backend: Backend,
    ) -> tuple[Tensor, Tensor]:
        """Gram ``(K, K)`` (or norms ``(K,)``) of the global per-task gradients, global losses."""
        partial = self.shard_gram(task_matrices(task_grads), diagonal, backend)
        return self.summed_gram(partial, losses, diagonal)

    def shard_gram(
        self, matrices: Sequence[Tensor], diagonal: bool = False, backend: Backend = "torch"
    ) -> Tensor:
        """This rank's share of the Gram (``diagonal``: of the squared norms) of the sum over
        ranks of the ``(K, P)`` gradients ``matrices`` (side by side): one ``reduce_scatter``
        of K x P numbers gives each rank the sum of a block of columns, whose Gram it
        computes. The shares of the ranks add up to the Gram of the sum (``summed_gram``)."""
        num_tasks, world = matrices[0].shape[0], self.world_size
        send = _rank_major(matrices, world)
        columns = send.shape[2]
        shard = send.new_empty(num_tasks * columns)
        _collective("reduce_scatter_single", "reduce_scatter_tensor")(
            shard, send.reshape(-1), group=self.process_group
        )
        partial = task_gram_or_norms(shard.reshape(num_tasks, columns), diagonal, backend)
        return partial.square() if diagonal else partial

    def summed_gram(
        self, partial: Tensor, losses: Tensor, diagonal: bool = False
    ) -> tuple[Tensor, Tensor]:
        """The Gram of the mean gradients from the ranks' ``shard_gram`` shares, and the mean
        losses: one ``all_reduce`` of K x K + K numbers."""
        world = self.world_size
        packed = torch.cat([partial.reshape(-1), losses.detach().to(partial.dtype)])
        dist.all_reduce(packed, group=self.process_group)
        # The reduced gradients are sums over ranks: the means' Gram is the sums' over W^2.
        result = packed[: partial.numel()].reshape(partial.shape) / world**2
        if diagonal:
            result = result.sqrt()
        return result, packed[partial.numel() :].to(losses.dtype) / world

    def gram_of_samples(self, local_gram: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """Global Gram of per-sample gradients (MGDA-UB's features), global losses."""
        world = self.world_size
        packed = torch.cat([local_gram.reshape(-1), losses.detach().to(local_gram.dtype)])
        dist.all_reduce(packed, group=self.process_group)
        gram = packed[: local_gram.numel()].reshape(local_gram.shape) / world**2
        return gram, packed[local_gram.numel() :].to(losses.dtype) / world


def _described(configuration: tuple[str, int, tuple[str, ...] | None]) -> str:
    """``UncertaintyWeighting(num_tasks=3, tasks=['a', 'b', 'c'])``, the names shortened."""
    method, num_tasks, tasks = configuration
    names = listed(tasks) if tasks is not None else None
    return f"{method}(num_tasks={num_tasks}, tasks={names})"


def _collective(name: str, older_name: str) -> Any:
    """``torch.distributed.<name>``, or its older spelling in torch versions without it."""
    return getattr(dist, name, None) or getattr(dist, older_name)


def _rank_major(matrices: Sequence[Tensor], world: int) -> Tensor:
    """The ``(K, P)`` gradients, side by side, as a ``(W, K, ceil(P / W))`` buffer: block ``r``
    holds columns ``[r*c, (r+1)*c)`` of every task, zero past ``P``, so that a
    ``reduce_scatter`` gives rank ``r`` the sum over ranks of its block.

    Each parameter's columns are copied straight into their blocks (one buffer, no
    intermediate copy of all the gradients), in float32 at least: half-precision gradients
    summed over ranks in their own dtype would lose what one process's float32 Gram keeps.
    """
    num_tasks = matrices[0].shape[0]
    total = sum(matrix.shape[1] for matrix in matrices)
    columns = -(-total // world)
    dtype = torch.float32
    for matrix in matrices:
        dtype = torch.promote_types(dtype, matrix.dtype)
    send = matrices[0].new_empty((world, num_tasks, columns), dtype=dtype)
    start = 0
    for matrix in matrices:
        width, done = matrix.shape[1], 0
        while done < width:
            block, offset = divmod(start + done, columns)
            take = min(width - done, columns - offset)
            send[block, :, offset : offset + take] = matrix[:, done : done + take]
            done += take
        start += width
    for block in range(world):
        first_pad = max(0, total - block * columns)
        if first_pad < columns:
            send[block, :, first_pad:] = 0
    return send


class _MeanGradient(torch.autograd.Function):
    """Identity whose backward averages the incoming gradient over the ranks."""

    @staticmethod
    def forward(ctx, parameter: Tensor, sync: TaskSync) -> Tensor:
        ctx.sync = sync
        return parameter.view_as(parameter)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.sync.mean(grad.contiguous()), None


def unsharded_parameters(parameters: Sequence[Tensor]) -> list[Tensor]:
    """The tensors autograd differentiates for ``parameters``.

    A parameter sharded by FSDP2 (``fully_shard``) is a ``DTensor`` holding the rank's shard; the
    forward pass runs on an unsharded copy that FSDP gathers, and autograd's graph reaches that
    copy, not the shard. Its per-task gradients are taken with respect to the copy (full shape,
    this rank's batch), and reduced over the ranks like any other. Other parameters are returned
    as they are.
    """
    owners = _fsdp_params_by_sharded_parameter()
    result = []
    for parameter in parameters:
        owner = owners.get(id(parameter)) if is_sharded(parameter) else None
        unsharded = getattr(owner, "_unsharded_param", None) if owner is not None else None
        result.append(unsharded if unsharded is not None else parameter)
    return result


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter that FSDP2 or tensor parallelism shards)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without distributed
        return False
    return isinstance(tensor, DTensor)


def _fsdp_params_by_sharded_parameter() -> dict[int, Any]:
    """``id(sharded parameter) -> FSDPParam`` over every module that ``fully_shard`` manages."""
    try:
        from torch.distributed import _composable_state
    except ImportError:  # a build without distributed
        return {}
    owners: dict[int, Any] = {}
    for state_ref in list(_composable_state._module_state_mapping.values()):
        state = state_ref()
        group = getattr(state, "_fsdp_param_group", None)
        for fsdp_param in getattr(group, "fsdp_params", ()):
            owners[id(fsdp_param.sharded_param)] = fsdp_param
    return owners
