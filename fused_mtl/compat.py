"""Drop-in replacements for the uncertainty-weighting modules users copy into their projects.

Each class keeps the constructor arguments, parameter name, initial values, calling convention,
numbers and gradients of the module it replaces, and runs through the fused op. Swap the import
and nothing else changes:

- ``AutomaticWeightedLoss(num=2)``: parameter ``params`` initialised to ones, called as
  ``awl(l1, l2, ...)``; ``sum_i 0.5 / p_i^2 * L_i + log(1 + p_i^2)`` (Liebel & Koerner).
- ``MultiNoiseLoss(n_losses)``: parameter ``noise_params`` drawn uniform in (0, 1) with
  ``torch.rand``, called as ``multi_loss([l1, l2])``; ``sum_i L_i / eta_i^2 + log(eta_i)``.

Differences, all on the safe side: non-scalar losses raise instead of broadcasting into a
non-scalar "total", and losses must be tensors on the parameters' device. The variance ``p^2``
or ``eta^2`` is kept in ``[e^-20, e^20]`` (``fused_mtl.reference.LOG_VARIANCE_BOUNDS``): where a
zero or negative loss would drive it to 0 and the total to minus infinity, it stops at the
bound; inside the range the gradients are the snippets', bit for bit, and the totals too up
to the order of the sum over tasks (a few ulps from K = 5 on). ``MultiNoiseLoss`` takes
``log |eta|``, so a parameter that crossed zero gives a finite total where the snippet's
``log(eta)`` gives NaN. Under
``torch.distributed`` the parameter's gradient is averaged over the ranks, as for
``UncertaintyWeighting`` (``sync=False`` turns that off). ``MultiNoiseLoss`` is
created on the default device: unlike the usual snippet, it does not move itself to CUDA at
construction; call ``.to(device)`` like for any module. Its ``noise_params`` is a registered
``nn.Parameter``, so it also appears in ``parameters()`` and ``state_dict()``.

Checkpoints go both ways: a drop-in's ``state_dict()`` holds its parameter alone, under the
snippet's name, so it loads strictly into the snippet's module and the snippet's into the
drop-in, on their own or inside a model (the usual snippet keeps ``noise_params`` as a plain
tensor, outside its ``state_dict()``: only a snippet that registers it as a parameter has one
to exchange).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fused_mtl._distributed import ProcessGroup
from fused_mtl.balancer import EXTRA_STATE_KEY
from fused_mtl.methods.uncertainty import UncertaintyModule
from fused_mtl.ops.backend import Backend
from fused_mtl.reference import Parametrization

__all__ = ["AutomaticWeightedLoss", "MultiNoiseLoss"]


class _SnippetModule(UncertaintyModule):
    """An uncertainty module whose checkpoint is the snippet's: its parameter, nothing else.

    The other balancers save their task names in the module's extra state (``_extra_state``)
    to check a checkpoint's task order; a drop-in has no names, and the snippet's module, which
    has no extra state, would refuse that key under ``strict=True``.
    """

    # nn.Module writes and reads ``_extra_state`` only where a class overrides these two.
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # Saved by a release whose drop-ins had extra state (task names, always None): it
        # loads as before.
        if prefix + EXTRA_STATE_KEY in unexpected_keys:
            unexpected_keys.remove(prefix + EXTRA_STATE_KEY)


class AutomaticWeightedLoss(_SnippetModule):
    """``sum_i 0.5 / p_i^2 * L_i + log(1 + p_i^2)``, with ``p`` (``params``) starting at one.

    Example:
        >>> import torch
        >>> from fused_mtl.compat import AutomaticWeightedLoss
        >>> awl = AutomaticWeightedLoss(2)
        >>> awl(torch.tensor(1.0), torch.tensor(3.0))  # 0.5 * 4 + 2 * log(2) at p = 1
        tensor(3.3863, grad_fn=<...>)
    """

    params: nn.Parameter
    _parametrization = Parametrization.LIEBEL_KOERNER

    def __init__(
        self,
        num: int = 2,
        *,
        backend: Backend = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(num, None, None, False, backend, sync, process_group)
        self.params = nn.Parameter(torch.ones(num))

    def _task_parameter(self) -> Tensor:
        return self.params


class MultiNoiseLoss(_SnippetModule):
    """``sum_i L_i / eta_i^2 + log(eta_i)``, with ``eta`` (``noise_params``) uniform in (0, 1).

    Example:
        >>> import torch
        >>> from fused_mtl.compat import MultiNoiseLoss
        >>> multi_loss = MultiNoiseLoss(n_losses=2)
        >>> total = multi_loss([torch.tensor(1.0), torch.tensor(2.0)])
        >>> total.shape
        torch.Size([])
    """

    noise_params: nn.Parameter
    _parametrization = Parametrization.DYNAMIC_NOISE

    def __init__(
        self,
        n_losses: int,
        *,
        backend: Backend = "auto",
        sync: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(n_losses, None, None, False, backend, sync, process_group)
        self.noise_params = nn.Parameter(torch.rand(n_losses))

    def _task_parameter(self) -> Tensor:
        return self.noise_params
