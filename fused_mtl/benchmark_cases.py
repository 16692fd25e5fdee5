"""Benchmark cases: each fused op or method next to what users run today, as timed callables.

One source for both runners, ``pytest benchmarks/`` (pytest-benchmark) and ``fused-mtl bench``
(``torch.utils.benchmark``). A case's ``step`` does one unit of work that a training step pays;
on CUDA it synchronises, so its wall time includes the kernel launches. The factories warm a case
up (kernel compilation, ``torch.compile``, the allocator, GradNorm's and MGDA's first-call
checks) before they return it, so the runners time the steady state only.

Groups (``Case.group``), each with the implementation it is compared against (``Case.baseline``):

- ``uncertainty K=..``: one uncertainty-weighting forward + backward over K scalar losses, against
  the per-task Python loop users copy (``sum(exp(-s[i]) * L[i] + s[i])``); also a vectorised
  eager expression, ``torch.compile`` of the loop, and on CUDA a CUDA-graph replay.
- ``norms K=.. P=..`` / ``gram K=.. P=..``: the per-task gradient norms / Gram matrix of a
  ``(K, P)`` gradient matrix, against ``torch.linalg.vector_norm`` per task / ``G @ G.T``.
- ``gradnorm step K=..`` / ``mgda step K=..``: a training step on the GradNorm toy's network
  against the per-task loop of common implementations (K backward passes, then norms or a Gram).
- ``method step K=..``: one training step with each balancing method, against the plain sum: the
  price of balancing.

Example:
    >>> case = uncertainty_case("vectorized_eager", num_tasks=4, device="cpu")
    >>> case.group, case.baseline
    ('uncertainty K=4', 'per_task_loop')
    >>> case.step()  # one forward + backward
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fused_mtl import __version__, reference
from fused_mtl.demo import make_balancer, task_losses, task_mse
from fused_mtl.dtp import DTP
from fused_mtl.functional import task_grad_norms, task_gram
from fused_mtl.gradnorm import GradNorm
from fused_mtl.mgda import MGDA, SOLVER_ITERATIONS
from fused_mtl.synthetic import MultiTaskMLP, ToyRegression, gradnorm_toy
from fused_mtl.uncertainty import UncertaintyWeighting

__all__ = [
    "Case",
    "Unavailable",
    "default_device",
    "environment",
    "gradient_step_case",
    "gram_case",
    "method_step_case",
    "suite",
    "uncertainty_case",
]

UNCERTAINTY_TASK_COUNTS = (2, 8, 64, 512, 4096)
UNCERTAINTY_IMPLEMENTATIONS = (
    "fused_auto",
    "torch_fallback",
    "per_task_loop",
    "vectorized_eager",
    "compiled_loop",
    "cuda_graph",
)
# torch.compile traces the loop term by term: on 2 CPU cores, with a cold compile cache, compiling
# it took 4 s at K = 2, 7 s at K = 64 and 65 s at K = 512, growing faster than K, so K = 4096 is
# left out.
COMPILED_LOOP_MAX_TASKS = 512
GRAM_TASK_COUNTS = (2, 8, 16)
GRAM_BASELINES = {"norms": "per_task", "gram": "matmul"}
# P per task: on a GPU up to 64 M gradient elements; on a CPU smaller, to keep the pytest suite to
# a few minutes on 2 cores.
GRAM_WIDTHS = {"cuda": (1 << 20, 1 << 24, 1 << 26), "cpu": (1 << 16, 1 << 20)}
GRADIENT_STEP_IMPLEMENTATIONS = {
    "gradnorm": ("fused_auto", "fused_loop", "torch_fallback", "per_task_loop"),
    "mgda": ("fused_auto", "fused_loop", "torch_fallback", "features_ub", "per_task_loop"),
}
STEP_METHODS = ("equal", "uw", "dwa", "dtp", "gradnorm", "mgda")
STEP_TASKS = 8
BATCH = 256


class Unavailable(Exception):
    """The case cannot run on this machine; the message says why."""

    def __init__(self, group: str, implementation: str, reason: str) -> None:
        super().__init__(reason)
        self.group, self.implementation, self.reason = group, implementation, reason


@dataclass(frozen=True)
class Case:
    """A warmed-up timed callable and what it is compared with."""

    group: str
    implementation: str
    step: Callable[[], None]
    baseline: str  # the implementation of the same group that users run today
    bytes_read: int | None = None  # bytes the step must read, for the achieved GB/s
    compile_seconds: float | None = None  # torch.compile's first call, excluded from the timing
    # Entered around the timed calls: a compiled case fails on a recompile instead of timing it.
    timing_guard: Callable[[], AbstractContextManager[object]] = nullcontext


def _synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def _warmed(case: Case, calls: int = 3) -> Case:
    for _ in range(calls):
        case.step()
    return case


def default_device() -> str:
    """``FUSED_MTL_BENCH_DEVICE`` if set, else CUDA when available, else CPU."""
    return os.environ.get("FUSED_MTL_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: str, group: str, implementation: str) -> None:
    """Raise :class:`Unavailable` unless ``device`` can run the case."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        reason = f"device {device!r}: CUDA is not available on this machine"
        raise Unavailable(group, implementation, reason)


# --- uncertainty weighting -------------------------------------------------------------------


def per_task_loop(losses: list[Tensor], log_vars: Tensor) -> Tensor:
    """The loop users copy: one small expression per task, summed in Python."""
    total = 0
    for i, loss in enumerate(losses):
        total = total + torch.exp(-log_vars[i]) * loss + log_vars[i]
    return total


def vectorized_eager(losses: list[Tensor], log_vars: Tensor) -> Tensor:
    """The same sum as one eager expression over the stacked losses."""
    return (torch.exp(-log_vars) * torch.stack(losses) + log_vars).sum()


def uncertainty_case(implementation: str, num_tasks: int, device: str) -> Case:
    """One forward + backward of the balanced total over ``num_tasks`` scalar losses."""
    group, baseline = f"uncertainty K={num_tasks}", "per_task_loop"
    check_device(device, group, implementation)
    if implementation == "cuda_graph" and torch.device(device).type != "cuda":
        raise Unavailable(group, implementation, "CUDA-graph replay needs a CUDA device")
    if implementation == "compiled_loop" and num_tasks > COMPILED_LOOP_MAX_TASKS:
        reason = (
            f"torch.compile of a {num_tasks}-term loop is left out: compiling it takes minutes "
            f"(65 s at K = 512 on 2 CPU cores, cold cache); cases go up to "
            f"K = {COMPILED_LOOP_MAX_TASKS}"
        )
        raise Unavailable(group, implementation, reason)
    gen = torch.Generator().manual_seed(num_tasks)
    losses = [torch.rand((), generator=gen).to(device).requires_grad_() for _ in range(num_tasks)]
    synchronize = _synchronizer(device)
    if implementation in ("fused_auto", "torch_fallback", "cuda_graph"):
        backend = "torch" if implementation == "torch_fallback" else "auto"
        module = UncertaintyWeighting(num_tasks, backend=backend).to(device)

        def total() -> Tensor:
            return module(losses)

        if implementation == "cuda_graph":
            return _warmed(Case(group, implementation, _graphed(total, device), baseline))
    elif implementation in ("per_task_loop", "vectorized_eager", "compiled_loop"):
        log_vars = torch.zeros(num_tasks, device=device, requires_grad=True)
        if implementation == "compiled_loop":
            return _compiled_loop_case(losses, log_vars, group, baseline, synchronize)
        expression = per_task_loop if implementation == "per_task_loop" else vectorized_eager

        def total() -> Tensor:
            return expression(losses, log_vars)
    else:
        raise ValueError(f"unknown implementation {implementation!r}")

    def step() -> None:
        total().backward()
        synchronize()

    return _warmed(Case(group, implementation, step, baseline))


def _compiled_loop_case(
    losses: list[Tensor],
    log_vars: Tensor,
    group: str,
    baseline: str,
    synchronize: Callable[[], None],
) -> Case:
    torch.compiler.reset()  # each K compiles afresh instead of counting as a recompile
    compiled = torch.compile(per_task_loop)

    def step() -> None:
        compiled(losses, log_vars).backward()
        synchronize()

    started = time.perf_counter()
    step()  # compiles the forward, then the backward
    compile_seconds = time.perf_counter() - started
    case = Case(
        group,
        "compiled_loop",
        step,
        baseline,
        compile_seconds=compile_seconds,
        timing_guard=lambda: torch.compiler.set_stance("fail_on_recompile"),
    )
    return _warmed(case)


def _graphed(total: Callable[[], Tensor], device: str) -> Callable[[], None]:
    """``total().backward()`` captured once in a CUDA graph; the step replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: kernels compiled, grads allocated
        for _ in range(3):
            total().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total().backward()

    def step() -> None:
        graph.replay()
        torch.cuda.synchronize()

    return step


# --- per-task gradient norms and Gram --------------------------------------------------------


def gram_case(op: str, implementation: str, num_tasks: int, width: int, device: str) -> Case:
    """``op`` ("norms" or "gram") of a ``(K, P)`` fp32 gradient matrix: ``fused_auto`` or the
    baseline (``per_task`` vector norms, or ``matmul``)."""
    group = f"{op} K={num_tasks} P={width}"
    check_device(device, group, implementation)
    gen = torch.Generator(device=device).manual_seed(num_tasks)
    grads = torch.randn(num_tasks, width, generator=gen, device=device)
    synchronize = _synchronizer(device)
    baseline = GRAM_BASELINES[op]
    if implementation == "fused_auto":
        fused = task_grad_norms if op == "norms" else task_gram

        def compute() -> Tensor:
            return fused(grads)
    elif implementation == "per_task" == baseline:

        def compute() -> Tensor:
            return torch.stack([torch.linalg.vector_norm(grads[i]) for i in range(num_tasks)])
    elif implementation == "matmul" == baseline:

        def compute() -> Tensor:
            return grads @ grads.T
    else:
        raise ValueError(f"unknown case {op!r} / {implementation!r}")

    def step() -> None:
        compute()
        synchronize()

    bytes_read = grads.numel() * grads.element_size()
    return _warmed(Case(group, implementation, step, baseline, bytes_read=bytes_read))


# --- training steps on the toy's network -----------------------------------------------------


def _toy(num_tasks: int, device: str) -> tuple[MultiTaskMLP, ToyRegression]:
    """The toy's network and one batch of its data."""
    data = gradnorm_toy(num_tasks=num_tasks, num_samples=BATCH, device=device)
    torch.manual_seed(0)
    return MultiTaskMLP(num_tasks).to(device), data


def _training_step(
    group: str, implementation: str, baseline: str, model: MultiTaskMLP, run: Callable[[], None]
) -> Case:
    synchronize = _synchronizer(next(model.parameters()).device.type)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        run()
        synchronize()

    return _warmed(Case(group, implementation, step, baseline), calls=5)


def _shared_gradients(losses: Tensor, shared: list[Tensor]) -> list[Tensor]:
    """K backward passes, one flat gradient per task: how common implementations do it."""
    return [
        torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
        for loss in losses
    ]


# The module options behind the fused implementations of a gradient-method step.
MODULE_OPTIONS: dict[str, dict[str, str]] = {
    "fused_auto": {},
    "fused_loop": {"per_task_gradients": "loop"},
    "torch_fallback": {"backend": "torch"},
}


def gradient_step_case(method: str, implementation: str, num_tasks: int, device: str) -> Case:
    """A GradNorm or MGDA training step (no optimiser update) on the toy's network.

    ``fused_auto`` is the module's default (one batched backward for the per-task gradients,
    fused norms / Gram), ``fused_loop`` its per-task backward loop, ``torch_fallback`` the default
    on the torch reference, ``features_ub`` MGDA-UB on the trunk's output, and ``per_task_loop``
    the method as common implementations write it.
    """
    if implementation not in GRADIENT_STEP_IMPLEMENTATIONS.get(method, ()):
        raise ValueError(f"unknown case {method!r} / {implementation!r}")
    group = f"{method} step K={num_tasks}"
    check_device(device, group, implementation)
    model, data = _toy(num_tasks, device)
    shared = list((model.last_shared_layer if method == "gradnorm" else model.trunk).parameters())
    options = MODULE_OPTIONS.get(implementation, {})
    if method == "gradnorm" and implementation != "per_task_loop":
        gradnorm = GradNorm(shared, num_tasks, **options)

        def run() -> None:
            gradnorm.backward(task_losses(model, data))
    elif method == "gradnorm":
        weights = torch.ones(num_tasks, device=device, requires_grad=True)
        with torch.no_grad():
            initial = task_losses(model, data)

        def run() -> None:
            losses = task_losses(model, data)
            norms = [torch.linalg.vector_norm(g) for g in _shared_gradients(losses, shared)]
            weights.grad = reference.gradnorm_weight_grad(
                weights.detach(), torch.stack(norms), losses.detach(), initial, 1.5
            )
            (weights.detach() * losses).sum().backward()
    elif implementation == "features_ub":
        mgda = MGDA(shared, num_tasks)

        def run() -> None:
            features = model.trunk(data.inputs)
            outputs = torch.stack([head(features) for head in model.heads])
            mgda.backward(task_mse(outputs, data.targets), features=features)
    elif implementation != "per_task_loop":
        mgda = MGDA(shared, num_tasks, **options)

        def run() -> None:
            mgda.backward(task_losses(model, data))
    else:

        def run() -> None:
            losses = task_losses(model, data)
            grads = torch.stack(_shared_gradients(losses, shared))
            alpha = reference.min_norm_weights(grads @ grads.T, SOLVER_ITERATIONS)
            (alpha * losses).sum().backward()

    return _training_step(group, implementation, "per_task_loop", model, run)


def method_step_case(method: str, num_tasks: int, device: str) -> Case:
    """One training step (no optimiser update) with ``method``'s balancer, as ``fused-mtl demo``
    builds it, on the toy's network; the baseline is the plain sum."""
    group = f"method step K={num_tasks}"
    check_device(device, group, method)
    model, data = _toy(num_tasks, device)
    balancer = make_balancer(method, model, num_tasks, period_steps=10).to(device)
    if isinstance(balancer, DTP):
        balancer.update_kpis(torch.linspace(0.1, 0.9, num_tasks))

    def run() -> None:
        balancer.backward(task_losses(model, data))

    return _training_step(group, method, "equal", model, run)


# --- the suite -------------------------------------------------------------------------------


def suite(device: str, quick: bool = False) -> Iterator[Callable[[], Case]]:
    """Every case for ``device``, as factories in the order they are reported; ``quick`` keeps
    a small K and P of each group (a smoke run, not for quoting)."""
    task_counts = (2, 8) if quick else UNCERTAINTY_TASK_COUNTS
    for num_tasks in task_counts:
        for implementation in UNCERTAINTY_IMPLEMENTATIONS:
            yield lambda k=num_tasks, i=implementation: uncertainty_case(i, k, device)
    widths = GRAM_WIDTHS[torch.device(device).type]
    for op in ("norms", "gram"):
        for num_tasks in (2, 8) if quick else GRAM_TASK_COUNTS:
            for width in widths[:1] if quick else widths:
                for implementation in ("fused_auto", GRAM_BASELINES[op]):
                    yield lambda o=op, i=implementation, k=num_tasks, w=width: gram_case(
                        o, i, k, w, device
                    )
    for method, implementations in GRADIENT_STEP_IMPLEMENTATIONS.items():
        for implementation in implementations:
            yield lambda m=method, i=implementation: gradient_step_case(m, i, STEP_TASKS, device)
    for method in STEP_METHODS:
        yield lambda m=method: method_step_case(m, STEP_TASKS, device)


# --- where a result was measured -------------------------------------------------------------


def _git_revision() -> str:
    """The checkout's short revision when the package runs from one, else "unknown"."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "absent"
    return triton.__version__


def environment(device: str) -> dict[str, object]:
    """Device name, versions and revision, recorded next to every result."""
    on_cuda = torch.device(device).type == "cuda"
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "fused_mtl": __version__,
        "git_revision": _git_revision(),
        "backend_override": os.environ.get("FUSED_MTL_BACKEND", ""),
    }
