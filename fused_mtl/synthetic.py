"""The GradNorm paper's synthetic multi-task regression, and the network it is trained with.

Chen et al. (ICML 2018, section 5.1) define T regression tasks on the same inputs,

.. math:: f_i(x) = \\sigma_i \\tanh((B + \\epsilon_i) x),

with inputs of dimension 250, outputs of dimension 100, ``B`` a constant matrix shared by all
tasks (entries drawn with standard deviation 10) and ``epsilon_i`` a constant matrix per task
(standard deviation 3.5). The tasks are alike except for their scale ``sigma_i``: with a mean
squared error, task i's loss is proportional to ``sigma_i^2``, so with equal weights the
large-scale tasks dominate the shared layers. The network is a trunk of four 100-unit ReLU
layers and one linear head per task.

Choices the paper leaves open, made here: the inputs are standard normal; by default the scales
are spread evenly in log space over two orders of magnitude, ``sigma = logspace(0, 2, T)``.

``noisy_regression`` is a second problem whose answer is known in advance: regression tasks on
the same inputs whose targets carry Gaussian noise of given variances. With a mean squared error,
the best a model can reach on task i is its noise variance, which is what uncertainty weighting's
``sigma_i^2`` should learn.

Example:
    >>> from fused_mtl.synthetic import MultiTaskMLP, gradnorm_toy
    >>> data = gradnorm_toy(num_tasks=3, num_samples=8)
    >>> data.inputs.shape, data.targets.shape, data.sigmas.tolist()
    (torch.Size([8, 250]), torch.Size([3, 8, 100]), [1.0, 10.0, 100.0])
    >>> MultiTaskMLP(num_tasks=3)(data.inputs).shape
    torch.Size([3, 8, 100])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from fused_mtl._losses import as_integer

__all__ = ["MultiTaskMLP", "ToyRegression", "gradnorm_toy", "noisy_regression"]

INPUT_DIM = 250
OUTPUT_DIM = 100
BASIS_STD = 10.0
TASK_STD = 3.5


@dataclass(frozen=True)
class ToyRegression:
    """Samples of the toy: ``targets[i]`` holds task i's outputs for every input."""

    inputs: Tensor  # (N, 250)
    targets: Tensor  # (T, N, 100)
    sigmas: Tensor  # (T,) task scales
    noise_variances: Tensor | None = None  # (T,) variance of the label noise, where known

    def split(self, num_train: int) -> tuple[ToyRegression, ToyRegression]:
        """The first ``num_train`` samples and the rest, as two data sets."""
        head = replace(self, inputs=self.inputs[:num_train], targets=self.targets[:, :num_train])
        tail = replace(self, inputs=self.inputs[num_train:], targets=self.targets[:, num_train:])
        return head, tail


def gradnorm_toy(
    num_tasks: int = 10,
    num_samples: int = 10_000,
    *,
    sigmas: Sequence[float] | Tensor | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> ToyRegression:
    """Draw the toy's task matrices and ``num_samples`` samples; deterministic for a seed."""
    _check_positive_int("num_tasks", num_tasks)
    _check_positive_int("num_samples", num_samples)
    if sigmas is None:
        scales = torch.logspace(0, 2, num_tasks, dtype=torch.float64)
    else:
        scales = torch.as_tensor(sigmas, dtype=torch.float64)
        if scales.shape != (num_tasks,):
            raise ValueError(f"sigmas must have {num_tasks} entries, got {tuple(scales.shape)}")
    gen = torch.Generator().manual_seed(seed)
    # Drawn in float64 on the CPU, so the data is the same on every device and in every dtype.
    basis = torch.randn(OUTPUT_DIM, INPUT_DIM, generator=gen, dtype=torch.float64) * BASIS_STD
    task_parts = torch.randn(num_tasks, OUTPUT_DIM, INPUT_DIM, generator=gen, dtype=torch.float64)
    inputs = torch.randn(num_samples, INPUT_DIM, generator=gen, dtype=torch.float64)
    # targets[i, n] = sigma_i * tanh((B + eps_i) x_n)
    pre_activations = torch.einsum("top,np->tno", basis + TASK_STD * task_parts, inputs)
    targets = scales[:, None, None] * torch.tanh(pre_activations)
    return ToyRegression(
        inputs=inputs.to(device=device, dtype=dtype),
        targets=targets.to(device=device, dtype=dtype),
        sigmas=scales.to(device=device, dtype=dtype),
    )


def noisy_regression(
    noise_variances: Sequence[float] = (0.01, 0.1, 1.0),
    num_samples: int = 4096,
    *,
    input_dim: int = 8,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> ToyRegression:
    """Regression tasks ``y_i = tanh(w_i · x) + sqrt(v_i)·noise`` with known noise variances.

    ``x`` and the weights ``w_i`` are standard normal (``w_i`` scaled by ``1/sqrt(input_dim)``, so
    the clean targets spread over tanh's range instead of saturating); each target has one output.
    ``noise_variances`` are the ``v_i``; the returned set carries them.

    Example:
        >>> data = noisy_regression((0.01, 1.0), num_samples=5)
        >>> data.targets.shape, data.noise_variances
        (torch.Size([2, 5, 1]), tensor([0.0100, 1.0000]))
    """
    variances = torch.as_tensor(noise_variances, dtype=torch.float64)
    if variances.dim() != 1 or variances.numel() == 0:
        raise ValueError(f"noise_variances must be a non-empty sequence, got {noise_variances!r}")
    for task, variance in enumerate(variances.tolist()):
        if not variance >= 0 or variance == float("inf"):
            raise ValueError(f"task {task}: noise variance must be finite and >= 0, got {variance}")
    _check_positive_int("num_samples", num_samples)
    _check_positive_int("input_dim", input_dim)
    gen = torch.Generator().manual_seed(seed)
    num_tasks = variances.numel()
    task_weights = torch.randn(num_tasks, input_dim, generator=gen, dtype=torch.float64)
    inputs = torch.randn(num_samples, input_dim, generator=gen, dtype=torch.float64)
    clean = torch.tanh(task_weights @ inputs.T / input_dim**0.5)  # (T, N)
    noise = torch.randn(num_tasks, num_samples, generator=gen, dtype=torch.float64)
    targets = (clean + variances.sqrt()[:, None] * noise)[..., None]
    return ToyRegression(
        inputs=inputs.to(device=device, dtype=dtype),
        targets=targets.to(device=device, dtype=dtype),
        sigmas=torch.ones(num_tasks, device=device, dtype=dtype),
        noise_variances=variances.to(device=device, dtype=dtype),
    )


def _check_positive_int(name: str, value: object) -> None:
    as_integer(name, value)


class MultiTaskMLP(nn.Module):
    """A trunk of ReLU layers shared by all tasks and one linear head per task.

    ``forward`` returns the task outputs stacked, shape ``(T, N, output_dim)``. ``trunk[-2]`` is
    the last shared linear layer, the one the GradNorm paper balances.
    """

    def __init__(
        self,
        num_tasks: int,
        input_dim: int = INPUT_DIM,
        output_dim: int = OUTPUT_DIM,
        hidden: int = 100,
        depth: int = 4,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(hidden, output_dim) for _ in range(num_tasks))

    @property
    def last_shared_layer(self) -> nn.Linear:
        return self.trunk[-2]  # type: ignore[return-value]

    def forward(self, inputs: Tensor) -> Tensor:
        features = self.trunk(inputs)
        return torch.stack([head(features) for head in self.heads])
