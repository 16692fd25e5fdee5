"""The experiment behind ``fused-mtl demo``: one network trained with each balancing method on two
synthetic problems, with what every method does recorded along the way.

The problems (both in :mod:`fused_mtl.synthetic`):

- ``gradnorm_toy``: the GradNorm paper's regression, 4 tasks alike except for their scale
  (``sigma = 1, 4.6, 21.5, 100``): with equal weights the large tasks dominate the shared trunk.
- ``known_noise``: 3 regression tasks whose targets carry Gaussian noise of variance 0.01, 0.1 and
  1. A task's test loss cannot go below its noise variance, and uncertainty weighting's learned
  ``sigma_i^2`` should approach it.

Every method starts from the same initial network and sees the same batches. Choices the methods
leave to the user, made here: DWA's period is one pass over the training set; DTP's KPI of a task
is the fraction of its initial validation loss that training has removed,
``clamp(1 - L_val(t)/L_val(0), 0, 1)``, reported after each period; MGDA uses the ``"l2"``
normalisation over the whole trunk; GradNorm (alpha = 1.5) balances the last shared layer.

This module is torch only; the command line (:mod:`fused_mtl.app.cli`) draws the tables and plots.

Example:
    >>> problem = make_problem("known_noise", seed=0)
    >>> run = train(problem, "uw", steps=3, seed=0)
    >>> run.weights.shape  # one row per step, one column per task
    torch.Size([3, 3])
    >>> run.evaluation_steps  # the start, then every step up to 40 evaluations
    [0, 1, 2, 3]
    >>> run.loss_ratios[0]  # L_i(0) / L_i(0)
    tensor([1., 1., 1.])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import fused_mtl
from fused_mtl import DTP, DWA, MGDA, Balancer, EqualWeighting, GradNorm, UncertaintyWeighting
from fused_mtl.synthetic import MultiTaskMLP, ToyRegression, gradnorm_toy, noisy_regression

__all__ = [
    "DEFAULT_METHODS",
    "LOSS_METHODS",
    "METHODS",
    "PROBLEMS",
    "MethodRun",
    "Problem",
    "make_problem",
    "resolve_methods",
    "train",
]

METHODS: dict[str, str] = {
    "equal": "equal weighting",
    "uw": "uncertainty weighting",
    "dwa": "DWA (T = 2)",
    "dtp": "DTP (gamma = 1)",
    "gradnorm": "GradNorm (alpha = 1.5)",
    "mgda": 'MGDA ("l2")',
    "pcgrad": "PCGrad",
    "gradvac": "GradVac (beta = 0.01)",
    "cagrad": "CAGrad (c = 0.4)",
    "imtl_g": "IMTL-G",
    "aligned_mtl": "Aligned-MTL",
    "upgrad": "UPGrad",
    "dualproj": "DualProj",
    "config": "ConFIG",
    "nash_mtl": "Nash-MTL",
    "fairgrad": "FairGrad (alpha = 1)",
    "graddrop": "GradDrop",
    "famo": "FAMO",
    "rlw": "RLW (random weights)",
    "gls": "GLS (geometric mean)",
    "imtl_l": "IMTL-L",
    "stch": "STCH (mu = 1)",
    "moco": "MoCo",
    "sdmgrad": "SDMGrad (lambda = 0.3)",
    "modo": "MoDo (gamma = 0.001)",
    "excess_mtl": "ExcessMTL",
    "db_mtl": "DB-MTL",
    "cr_mogm": "CR-MOGM (MGDA, alpha = 0.9)",
    "krum": "Krum",
    "trimmed_mean": "trimmed mean (b = 1)",
    "pbi": "PBI (theta = 5)",
    "cosmos": "COSMOS (mu = 1)",
    "uw_so": "UW-SO (T = 1)",
    "go4align": "GO4Align (2 groups)",
    "ntkmtl": "NTKMTL",
    "auto_lambda": "Auto-Lambda (first order)",
}
#: The public class of each loss-level method (built from the number of tasks alone).
LOSS_METHODS = {
    "famo": "FAMO",
    "rlw": "RandomWeighting",
    "gls": "GeometricMean",
    "imtl_l": "IMTLL",
    "stch": "STCH",
    "pbi": "PBI",
    "cosmos": "COSMOS",
    "uw_so": "UWSO",
    "go4align": "GO4Align",
}
#: The public class of each method built on the trunk's parameters: the Gram family, GradDrop
#: and the stochastic gradient methods.
TRUNK_METHODS = {
    "pcgrad": "PCGrad",
    "gradvac": "GradVac",
    "cagrad": "CAGrad",
    "imtl_g": "IMTLG",
    "aligned_mtl": "AlignedMTL",
    "upgrad": "UPGrad",
    "dualproj": "DualProj",
    "config": "ConFIG",
    "nash_mtl": "NashMTL",
    "fairgrad": "FairGrad",
    "graddrop": "GradDrop",
    "moco": "MoCo",
    "sdmgrad": "SDMGrad",
    "modo": "MoDo",
    "excess_mtl": "ExcessMTL",
    "db_mtl": "DBMTL",
    "cr_mogm": "CRMOGM",
    "krum": "Krum",
    "trimmed_mean": "TrimmedMean",
    "ntkmtl": "NTKMTL",
    "auto_lambda": "AutoLambda",
}
#: The public class of each method: the names ``--method`` accepts besides the keys.
METHOD_CLASSES = {
    "equal": "EqualWeighting",
    "uw": "UncertaintyWeighting",
    "dwa": "DWA",
    "dtp": "DTP",
    "gradnorm": "GradNorm",
    "mgda": "MGDA",
    **LOSS_METHODS,
    **TRUNK_METHODS,
}
#: What ``fused-mtl demo`` runs by default: the baseline and one method of each family (loss
#: weighting, gradient-norm balancing, the Gram family, loss-level objectives, stochastic
#: gradient methods), in about a minute on a 2-core CPU.
DEFAULT_METHODS = ("equal", "uw", "gradnorm", "mgda", "famo", "moco")
PROBLEMS = ("gradnorm_toy", "known_noise")
BATCH = 128
# The balancers' own parameters (UW's log-variances, GradNorm's weights) learn faster than the
# network: UW's s for a noise variance of 0.01 has to travel to log(0.01) = -4.6.
BALANCER_LR = 2.5e-2
EVALUATIONS = 40  # points on the loss-ratio curves
# The summary keeps each method's weights and batch losses over its first steps as well: another
# CPU (other vector kernels, another BLAS path) reproduces them to 2e-5 (SDMGrad to 2e-3), where
# after 1000 steps the rounding it changes has grown into other end points (DualProj's test
# losses 40% apart).
FIRST_STEPS = 4


@dataclass(frozen=True)
class Problem:
    """A data set split three ways, and the network and learning rate it is trained with."""

    name: str
    description: str
    train: ToyRegression
    validation: ToyRegression
    test: ToyRegression
    hidden: int
    depth: int
    lr: float

    @property
    def num_tasks(self) -> int:
        return self.train.targets.shape[0]

    def network(self) -> MultiTaskMLP:
        return MultiTaskMLP(
            self.num_tasks,
            input_dim=self.train.inputs.shape[1],
            output_dim=self.train.targets.shape[2],
            hidden=self.hidden,
            depth=self.depth,
        )


@dataclass(frozen=True)
class MethodRun:
    """What one method did on one problem."""

    method: str
    problem: str
    weights: Tensor  # (steps, K): the weights each step used, as the method reports them
    batch_losses: Tensor  # (steps, K): each step's task losses on its batch, before its update
    evaluation_steps: list[int]  # the steps at which the test losses were measured
    loss_ratios: Tensor  # (evaluations, K): test L_i(t) / L_i(0)
    test_losses: Tensor  # (K,) at the end
    seconds_per_step: float  # wall time of a training step (evaluations excluded)
    learned_variances: Tensor | None  # uncertainty weighting's sigma_i^2 = exp(s_i)

    @property
    def rate_spread(self) -> float:
        """Standard deviation across tasks of the final ``L_i(t)/L_i(0)`` (GradNorm's measure of
        tasks training at different rates; 0 when all train alike)."""
        return float(self.loss_ratios[-1].std()) if self.loss_ratios.shape[1] > 1 else 0.0


def make_problem(name: str, seed: int = 0, device: torch.device | str = "cpu") -> Problem:
    """The problem ``name`` (one of :data:`PROBLEMS`), drawn from ``seed``."""
    if name == "gradnorm_toy":
        data = gradnorm_toy(num_tasks=4, num_samples=6144, seed=seed, device=device)
        description = "GradNorm paper's toy: 4 tasks, scales 1 to 100"
        hidden, depth, lr = 100, 4, 1e-3
    elif name == "known_noise":
        data = noisy_regression((0.01, 0.1, 1.0), num_samples=6144, seed=seed, device=device)
        description = "known noise: 3 tasks, label noise variance 0.01, 0.1, 1"
        hidden, depth, lr = 64, 2, 3e-3
    else:
        raise ValueError(f"unknown problem {name!r}; expected one of {', '.join(PROBLEMS)}")
    train_set, rest = data.split(4096)
    validation, test = rest.split(1024)
    return Problem(name, description, train_set, validation, test, hidden, depth, lr)


def _spellings() -> dict[str, str]:
    """Every accepted spelling of a method, lower case, to its key: the key (``imtl_g``, or
    ``imtl-g``), its class name (``IMTLG``) and the name in :data:`METHODS` up to its first
    space or parenthesis (``Nash-MTL``)."""
    spellings: dict[str, str] = {}
    for key, label in METHODS.items():
        for name in (key, METHOD_CLASSES[key], label.split(" (")[0].split(" ")[0]):
            spellings[name.lower()] = key
            spellings[name.lower().replace("-", "_")] = key
            spellings[name.lower().replace("-", "").replace("_", "")] = key
    return spellings


def resolve_methods(text: str) -> list[str]:
    """The method keys named by ``text``: ``all``, ``default``, or comma-separated names, each a
    key of :data:`METHODS` or its class name, in any case. Raises ``ValueError`` naming an
    unknown or repeated name.

    Example:
        >>> resolve_methods("MGDA, uw,Nash-MTL")
        ['mgda', 'uw', 'nash_mtl']
        >>> resolve_methods("all") == list(METHODS)
        True
    """
    names = [name.strip() for name in text.split(",")]
    if names == ["all"]:
        return list(METHODS)
    if names == ["default"]:
        return list(DEFAULT_METHODS)
    spellings, keys = _spellings(), []
    for name in names:
        key = spellings.get(name.lower())
        if key is None:
            raise ValueError(
                f"unknown method {name!r}; expected all, default, or comma-separated names "
                f"among {', '.join(METHODS)} (or their class names)"
            )
        if key in keys:
            raise ValueError(f"method {name!r} is named twice")
        keys.append(key)
    return keys


def make_balancer(method: str, model: MultiTaskMLP, num_tasks: int, period_steps: int) -> Balancer:
    """The balancer ``method`` (a key of :data:`METHODS`) for the demo's ``model``: the trunk's
    parameters for the methods built on them (the per-task gradients), GradNorm on the last
    shared layer."""
    return build_balancer(
        method,
        model.trunk.parameters(),
        model.last_shared_layer.parameters(),
        num_tasks,
        period_steps,
    )


def build_balancer(
    method: str,
    shared: nn.Module | Iterable[Tensor],
    last_shared: Iterable[Tensor],
    num_tasks: int,
    period_steps: int,
) -> Balancer:
    """The balancer ``method`` (a key of :data:`METHODS`) with the demo's settings: the methods
    built on the trunk take ``shared`` (its parameters, or the module itself for the per-task
    Gram layer by layer), GradNorm ``last_shared``'s parameters, DWA a period of
    ``period_steps``."""
    if method == "equal":
        return EqualWeighting(num_tasks)
    if method == "uw":
        return UncertaintyWeighting(num_tasks)
    if method == "dwa":
        return DWA(num_tasks, period_steps=period_steps)
    if method == "dtp":
        return DTP(num_tasks)
    if method == "gradnorm":
        return GradNorm(last_shared, num_tasks)
    if method == "mgda":
        return MGDA(shared, num_tasks, normalization="l2")
    if method in LOSS_METHODS:
        return getattr(fused_mtl, LOSS_METHODS[method])(num_tasks)
    if method in TRUNK_METHODS:
        return getattr(fused_mtl, TRUNK_METHODS[method])(shared, num_tasks)
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


def task_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Each task's mean squared error, shape ``(K,)``, from ``(K, N, O)`` outputs and targets."""
    return (outputs - targets).square().mean(dim=(1, 2))


def task_losses(model: MultiTaskMLP, data: ToyRegression, rows: Tensor | None = None) -> Tensor:
    """:func:`task_mse` of ``model`` over ``rows`` of ``data`` (all of it if None)."""
    if rows is None:
        return task_mse(model(data.inputs), data.targets)
    return task_mse(model(data.inputs[rows]), data.targets[:, rows])


def train(
    problem: Problem,
    method: str,
    steps: int,
    seed: int = 0,
    on_step: Callable[[], None] | None = None,
) -> MethodRun:
    """Train ``problem``'s network for ``steps`` Adam steps with ``method``; deterministic for a
    seed on a given device. ``on_step`` is called after every step (a progress bar)."""
    device = problem.train.inputs.device
    num_tasks, num_train = problem.num_tasks, problem.train.inputs.shape[0]
    period_steps = num_train // BATCH
    torch.manual_seed(seed)  # the same initial network for every method
    model = problem.network().to(device)
    balancer = make_balancer(method, model, num_tasks, period_steps).to(device)
    optimizer = torch.optim.Adam(
        [
            {"params": model.parameters()},
            {"params": balancer.parameters(), "lr": BALANCER_LR},
        ],
        lr=problem.lr,
    )
    batches = torch.Generator().manual_seed(seed)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def evaluate(data: ToyRegression) -> Tensor:
        with torch.no_grad():
            return task_losses(model, data)

    initial_test, initial_validation = evaluate(problem.test), evaluate(problem.validation)
    evaluation_steps, ratios, weights, batch_losses = [0], [torch.ones_like(initial_test)], [], []
    every = max(1, steps // EVALUATIONS)
    training_seconds = 0.0
    for step in range(1, steps + 1):
        started = time.perf_counter()
        rows = torch.randint(0, num_train, (BATCH,), generator=batches).to(device)
        optimizer.zero_grad(set_to_none=True)
        losses = task_losses(model, problem.train, rows)
        balancer.backward(losses)
        weights.append(balancer.weights.detach().clone())
        optimizer.step()
        synchronize()
        training_seconds += time.perf_counter() - started
        batch_losses.append(losses.detach())
        if isinstance(balancer, DTP) and step % period_steps == 0:
            kpis = 1 - evaluate(problem.validation) / initial_validation
            balancer.update_kpis(kpis.clamp(0, 1))
        if step % every == 0 or step == steps:
            evaluation_steps.append(step)
            ratios.append(evaluate(problem.test) / initial_test)
        if on_step is not None:
            on_step()
    learned = None
    if isinstance(balancer, UncertaintyWeighting):
        learned = (balancer.sigmas.detach() ** 2).cpu()
    return MethodRun(
        method=method,
        problem=problem.name,
        weights=torch.stack(weights).cpu(),
        batch_losses=torch.stack(batch_losses).cpu(),
        evaluation_steps=evaluation_steps,
        loss_ratios=torch.stack(ratios).cpu(),
        test_losses=evaluate(problem.test).cpu(),
        seconds_per_step=training_seconds / steps,
        learned_variances=learned,
    )
