"""``Balancer``: the interface every loss-balancing method shares.

A training loop that balances its task losses differs from plain training by one line::

    optimizer.zero_grad()
    total = balancer.backward(losses)   # instead of sum(losses).backward()
    optimizer.step()

``backward`` accepts the task losses in every calling convention of ``fused_mtl._losses``
(varargs, a list, a ``(K,)`` tensor, a dict by task name), accumulates into ``.grad`` every
gradient that ``loss.backward()`` on the balanced total would (the model's parameters, and the
balancer's own parameters by the method's rule), and returns the balanced total, detached, for
logging. ``balancer.weights`` is the current weight of each task, shape ``(K,)``.

Switching method is a one-line change of the constructor.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from fused_mtl._backend import Backend, check_backend, requested_backend
from fused_mtl._losses import resolve_tasks

__all__ = ["Balancer"]

LossArgs = Tensor | Sequence[Tensor] | dict[str, Tensor]


class Balancer(nn.Module):
    """Base class of the balancing methods: task bookkeeping and the backend choice.

    Subclasses implement ``backward(*losses)`` and provide ``weights`` (a property, or the
    parameter itself when the method learns its weights directly, as GradNorm does).
    """

    weights: Tensor

    def __init__(
        self, num_tasks: int | None, tasks: Sequence[str] | None, backend: Backend
    ) -> None:
        super().__init__()
        self.num_tasks, self.tasks = resolve_tasks(num_tasks, tasks)
        self.backend = check_backend(backend)
        # FUSED_MTL_BACKEND is applied here, once: see requested_backend.
        self._requested_backend = requested_backend(self.backend)

    def backward(self, *losses: LossArgs) -> Tensor:
        """Accumulate the balanced gradients of the task losses; return the total, detached."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        tasks = self.tasks if self.tasks is not None else self.num_tasks
        return f"tasks={tasks}, backend={self.backend!r}"
