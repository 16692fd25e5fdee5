"""``MGDA``: the min-norm point of the task gradients (Sener & Koltun, NeurIPS 2018)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from fused_mtl import reference
from fused_mtl._distributed import ProcessGroup
from fused_mtl._losses import as_integer, task_label
from fused_mtl.balancer import GramBalancer, LossArgs, check_grad_enabled, weighted_sum
from fused_mtl.ops.backend import Backend
from fused_mtl.ops.task_gradients import SharedParameters, TaskGradients

#: Interior-point iterations when K > ``reference.ENUMERATION_MAX_TASKS`` (smaller K are solved
#: by enumeration); see ``reference.min_norm_weights`` for the precision they reach.
SOLVER_ITERATIONS = reference.INTERIOR_POINT_ITERATIONS


class MGDA(GramBalancer):
    r"""Weight the tasks by the min-norm point of the convex hull of their gradients.

    With per-task gradients ``g_i`` of the shared parameters, each ``backward`` finds

    .. math:: \alpha = \arg\min_{\alpha \in \Delta} \Big\| \sum_i \alpha_i \hat g_i \Big\|^2,
              \qquad \hat g_i = g_i / c_i

    on the simplex :math:`\Delta` (the weights sum to 1), and trains the model on
    :math:`\sum_i \alpha_i L_i`: the weights apply to the raw losses, whatever the
    normalisation, as in the authors' code. The direction :math:`\sum_i \alpha_i g_i` decreases
    every task's loss to first order, or is zero at a Pareto-stationary point.

    Only the Gram matrix ``M = Ĝ Ĝᵀ`` enters the problem: it comes from the fused ``task_gram``
    (one launch on CUDA). The solver (``reference.min_norm_weights``) uses the closed form for
    K = 2, is exact up to K = 10 (one batched solve over the faces of the simplex) and runs
    ``solver_iterations`` interior-point (Newton) steps and an exact polish beyond, which
    reach a Frank-Wolfe gap below 1e-8 of the largest squared gradient norm for every K up to
    64 on ill-conditioned and rank-deficient problems. Each is a fixed sequence of tensor
    operations on the device, without a host synchronisation.

    ``total = mgda(losses)`` computes the per-task gradients (one extra batched backward pass,
    or one per task), solves for ``alpha`` and returns :math:`\sum_i \alpha_i L_i`; any engine
    may run its backward. ``mgda.backward(losses)`` is the call followed by ``total.backward()``.
    In eval mode or with grad disabled the call returns the total with the last ``alpha``.
    Under ``torch.distributed`` the Gram matrix is that of the global per-task gradients, so
    every rank solves the same problem (see ``docs/distributed.md``).

    **MGDA-UB.** ``mgda(losses, features=z)``, with ``z`` the shared representation that
    every task's loss is computed from, takes the gradients with respect to ``z`` instead of the
    shared parameters (Sener & Koltun's upper bound). ``torch.autograd.grad`` then only walks
    the heads, from each loss back to ``z``: the per-task passes skip the shared encoder, and
    only the final backward of :math:`\sum_i \alpha_i L_i` crosses it, once. With gradients of
    the shared parameters, each of the K passes (or the batched one) crosses the encoder up to
    those parameters. ``shared_parameters`` may be omitted when only MGDA-UB is used.

    Args:
        shared_parameters: the parameters whose per-task gradients define the problem (all
            shared parameters, or the last shared layer for a cheaper approximation).
        num_tasks: number of tasks K (may be omitted when ``tasks`` is given).
        tasks: task names; enables calling with a dict and names tasks in errors.
        normalization: ``c_i``: ``"none"`` (1, default), ``"l2"`` (``||g_i||``), ``"loss"``
            (``L_i``) or ``"loss+"`` (``L_i ||g_i||``). The two loss normalisations read the
            losses on the host at every call to check that they are positive. With
            ``"l2"`` and two tasks the weights are always 0.5 / 0.5: the min-norm point of two
            unit vectors is their midpoint, whatever their angle (the update
            (u_1 + u_2) / 2 still depends on it).
        solver_iterations: interior-point steps for K > 10 (see ``SOLVER_ITERATIONS``).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, for the Gram matrix.
        per_task_gradients: ``"auto"``, ``"batched"`` or ``"loop"``, as for ``GradNorm``.
        sync: under ``torch.distributed``, solve with the Gram matrix of the per-task gradients
            over all ranks (``False``: of this rank's own).
        process_group: the group to sync over (``None``: the default group).
        gram_by_layer: the older spelling of ``per_task_gradients="layers"``: the Gram one shared
            layer at a time (``fused_mtl.ops.layer_gram``), never falling back.

    Attributes:
        weights: the ``alpha`` of the last call (uniform before the first).
        gram: the (normalised) Gram matrix of the last call, detached, for logging.

    Example:
        >>> import torch
        >>> from fused_mtl import MGDA
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
        >>> mgda = MGDA(trunk.parameters(), tasks=["a", "b"])
        >>> out = heads(torch.relu(trunk(torch.randn(16, 4))))
        >>> total = mgda({"a": out[:, 0].square().mean(), "b": out[:, 1].abs().mean()})
        >>> total.backward()
        >>> float(mgda.weights.sum())
        1.0
    """

    weights: Tensor

    def __init__(
        self,
        shared_parameters: SharedParameters | None = None,
        num_tasks: int | None = None,
        *,
        tasks: Sequence[str] | None = None,
        normalization: str = "none",
        solver_iterations: int = SOLVER_ITERATIONS,
        backend: Backend = "auto",
        per_task_gradients: str = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
        gram_by_layer: bool = False,
    ) -> None:
        super().__init__(
            shared_parameters,
            num_tasks,
            tasks=tasks,
            backend=backend,
            per_task_gradients=per_task_gradients,
            sync=sync,
            process_group=process_group,
            gram_by_layer=gram_by_layer,
        )
        if normalization not in reference.MGDA_NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {reference.MGDA_NORMALIZATIONS}, "
                f"got {normalization!r}"
            )
        self.normalization = normalization
        self.solver_iterations = as_integer("solver_iterations", solver_iterations)
        self._feature_gradients = TaskGradients(
            [], ["features"], "auto" if per_task_gradients == "layers" else per_task_gradients
        )
        self._last_gradients = self._task_gradients

    @property
    def gradient_mode(self) -> str | None:
        """How the last call's Gram was computed: ``"layers"``, ``"batched"`` or ``"loop"``."""
        if self._last_gradients is self._task_gradients:
            return super().gradient_mode
        return self._last_gradients.mode

    @property
    def gradient_mode_reason(self) -> str:
        if self._last_gradients is self._task_gradients:
            return super().gradient_mode_reason
        return self._last_gradients.reason

    def forward(self, *losses: LossArgs, features: Tensor | None = None) -> Tensor:
        """One MGDA step; ``features=z`` for MGDA-UB. Returns ``sum_i alpha_i L_i``."""
        reported = self._reported_total(losses, self.weights.device)
        if reported is not None:
            return reported
        if features is not None:
            device = self._check_features(features)
            gradients = self._feature_gradients
        else:
            device = self._shared_device("pass features=z (MGDA-UB) or ")
            gradients = self._task_gradients
        stacked, separate = self._graph_losses(losses, device)
        window = self._step_call() if features is None else None
        if window is not None:
            self._last_gradients = gradients
            return self._accumulated_step(window, stacked, separate, self._normalized_weights)
        by_loss = self.normalization in ("loss", "loss+")
        # Checked before the per-task gradients; under torch.distributed after the sync, on the
        # global losses, so that every rank raises alike and none waits in a collective.
        syncing = self._syncing()
        if by_loss and not syncing:
            self._check_positive(stacked)
        self._last_gradients = gradients
        try:
            gram, current = self._task_gram(gradients, stacked, separate, False, features)
        except ValueError as error:
            if features is not None and _inside_compiled_graph(features, stacked):
                raise ValueError(
                    "MGDA: the task losses do not reach features: z and the losses come out of "
                    "one torch.compile graph, whose backward autograd cannot enter at z. "
                    "Compile the encoder that computes z on its own (torch.compile(encoder)) "
                    "and the heads apart, or pass MGDA the shared parameters instead of "
                    "features=z"
                ) from error
            raise
        if by_loss and syncing:
            self._check_positive(current)
        alpha = self._normalized_weights(gram, current)
        self.weights = alpha
        return weighted_sum(alpha, stacked)

    def _weights_of(self, gram: Tensor, losses: Tensor) -> Tensor:
        return self._normalized_weights(gram, losses)

    def _normalized_weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        """``alpha`` of the Gram of the normalised gradients (``self.gram`` keeps it)."""
        if self.normalization in ("loss", "loss+"):
            self._check_positive(losses)
        scales = reference.gradient_scales(gram, losses, self.normalization)
        self.gram = gram / (scales[:, None] * scales[None, :])
        weights = reference.min_norm_weights(self.gram, self.solver_iterations)
        # The Gram is float64 whatever the losses are; the weights are in their compute dtype.
        return weights.to(reference.compute_dtype(losses.dtype))

    def backward(self, *losses: LossArgs, features: Tensor | None = None) -> Tensor:
        """``total = self(*losses, features=features)``, then ``total.backward()``; returns the
        total, detached."""
        check_grad_enabled(self)
        total = self(*losses, features=features)
        total.backward()
        return total.detach()

    def _check_positive(self, losses: Tensor) -> None:
        for index, value in enumerate(losses.detach().tolist()):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"task {task_label(index, self.tasks)}: loss is {value}; "
                    f"normalization={self.normalization!r} divides the gradient by the loss, "
                    "which must be finite and positive"
                )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, normalization={self.normalization!r}, "
            f"solver_iterations={self.solver_iterations}"
        )


def _inside_compiled_graph(features: Tensor, losses: Tensor) -> bool:
    """Whether ``features`` and ``losses`` are outputs of one ``torch.compile`` graph.

    Such a graph's backward is one autograd node: the losses reach it through their own output
    of the graph, never through the features' one, so autograd cannot take gradients at the
    features. (Losses computed from compiled features outside the graph reach the node through
    the features' output.)
    """
    node = features.grad_fn
    if node is None or "CompiledFunction" not in type(node).__name__:
        return False
    entries: set[int] = set()
    seen: dict[int, object] = {}  # the nodes themselves kept, so that their ids stay theirs
    stack = [losses.grad_fn]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen[id(current)] = current
        for child, input_nr in current.next_functions:
            if child is node:
                entries.add(input_nr)
            else:
                stack.append(child)
    return bool(entries) and features.output_nr not in entries
