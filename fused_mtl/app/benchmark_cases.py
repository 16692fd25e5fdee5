"""Benchmark cases: each fused op or method next to what users run today, as timed callables.

One source for both runners, ``pytest benchmarks/`` (pytest-benchmark) and ``fused-mtl bench``
(``torch.utils.benchmark``). A case's ``step`` does one unit of work that a training step pays;
on CUDA it synchronises, so its wall time includes the kernel launches. The factories warm a case
up (kernel compilation, ``torch.compile``, the allocator, GradNorm's and MGDA's first-call
checks) before they return it, so the runners time the steady state only.

Groups (``Case.group``), each with the implementation it is compared against (``Case.baseline``):

- ``launch floor`` (CUDA): one launch of an empty Triton kernel, eager and replayed from a CUDA
  graph: the floor under the fused ops' wall time.
- ``uncertainty K=..``: one uncertainty-weighting forward + backward over K scalar losses, against
  the per-task Python loop users copy (``sum(exp(-s[i]) * L[i] + s[i])``); also a vectorised
  eager expression, ``torch.compile`` of the loop, and on CUDA a CUDA-graph replay.
  ``uncertainty K=.., (K,) tensor``: the same with the K losses in one tensor.
- ``copy K=.. P=..``: a copy of a ``(K, P)`` fp32 matrix, the memory bandwidth to compare with.
- ``norms K=.. P=..`` / ``gram K=.. P=..``: the per-task gradient norms / Gram matrix of a
  ``(K, P)`` gradient matrix, against ``torch.linalg.vector_norm`` per task / ``G @ G.T``.
- ``gradnorm step K=..`` / ``mgda step K=..``: a training step on the GradNorm toy's network
  against the per-task loop of common implementations (K backward passes, then norms or a Gram).
- ``method step K=..``: one training step with each balancing method, against the plain sum: the
  price of balancing.
- ``mgda step K=.., per-head losses`` (the toy's network) and ``mgda trunk step K=.., <trunk>`` /
  ``upgrad trunk step K=.., <trunk>`` (a 4 x 1024 MLP, a ResNet-style CNN, a transformer
  encoder: ``trunk_network``): the method over the whole trunk with each task's loss computed
  from its own head, against the plain sum; the default (the Gram one layer at a time), the
  per-task gradients of every parameter (batched, or a loop of K backward passes as LibMTL
  runs them), and TorchJD's autojac and autogram where ``torchjd`` is installed
  (``pip install fused-mtl[peers]``).

Training steps also record their peak extra memory (``Case.peak_bytes``): what one step holds
above what was allocated before it, from the CUDA allocator's peak, or on a CPU by counting the
tensors that the step's operations create and free (``live_bytes_peak``).

Example:
    >>> case = uncertainty_case("vectorized_eager", num_tasks=4, device="cpu")
    >>> case.group, case.baseline
    ('uncertainty K=4', 'per_task_loop')
    >>> case.step()  # one forward + backward
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fused_mtl import (
    DTP,
    MGDA,
    NTKMTL,
    GradNorm,
    UncertaintyWeighting,
    UPGrad,
    __version__,
    reference,
)
from fused_mtl.app.demo import make_balancer, task_losses, task_mse
from fused_mtl.functional import task_grad_norms, task_gram
from fused_mtl.synthetic import MultiTaskMLP, ToyRegression, gradnorm_toy

__all__ = [
    "Case",
    "Unavailable",
    "copy_case",
    "copy_group",
    "default_device",
    "environment",
    "gradient_step_case",
    "gram_case",
    "launch_floor_case",
    "live_bytes_peak",
    "method_step_case",
    "suite",
    "trunk_step_case",
    "uncertainty_case",
    "uncertainty_group",
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
# K scalar tensors (one loss per head) or one (K,) tensor (losses computed together).
UNCERTAINTY_INPUTS = ("scalars", "vector")
LAUNCH_FLOOR = "launch floor"
LAUNCH_FLOOR_IMPLEMENTATIONS = ("empty_triton_kernel", "empty_triton_kernel_graph")
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
STEP_METHODS = (
    "equal",
    "uw",
    "dwa",
    "dtp",
    "gradnorm",
    "mgda",
    "pcgrad",
    "gradvac",
    "cagrad",
    "imtl_g",
    "aligned_mtl",
    "upgrad",
    "dualproj",
    "config",
    "nash_mtl",
    "fairgrad",
    "graddrop",
    "famo",
    "rlw",
    "gls",
    "imtl_l",
    "stch",
    "moco",
    "sdmgrad",
    "modo",
    "excess_mtl",
    "db_mtl",
    "cr_mogm",
    "krum",
    "trimmed_mean",
    "pbi",
    "cosmos",
    "uw_so",
    "go4align",
    "ntkmtl",
    "ntkmtl_sr",
    "auto_lambda",
)
COMPILED_STEP_METHODS = ("equal", "uw", "dwa", "dtp", "gradnorm", "mgda")
COMPILED_STEP_IMPLEMENTATIONS = ("eager", "compiled")
STEP_TASKS = 8
BATCH = 256
# The whole-trunk MGDA / UPGrad step against the plain sum, the per-task gradients of every
# parameter and TorchJD: on the toy's network and on three benchmark trunks (trunk_network).
TRUNK_STEP_IMPLEMENTATIONS = (
    "plain_sum",
    "fused_layers",
    "fused_batched",
    "fused_loop",
    "torchjd_autojac",
    "torchjd_autogram",
)
TRUNK_NETWORKS = ("toy", "mlp", "cnn", "transformer")
TRUNK_LABELS = {"mlp": "4x1024 MLP", "cnn": "ResNet-style CNN", "transformer": "transformer"}
TRUNK_METHODS = ("mgda", "upgrad")
#: The task counts of the benchmark trunks; UPGrad runs at the middle one.
TRUNK_TASK_COUNTS = (2, 8, 32)
TRUNK_OUTPUTS = 16
WIDE_TRUNK = {"input_dim": 1024, "output_dim": 16, "hidden": 1024, "depth": 4, "batch": 128}


def trunk_cases() -> list[tuple[str, str, int]]:
    """``(network, method, K)`` of the whole-trunk steps: the toy's network at K = 8 (MGDA),
    each benchmark trunk with MGDA at every K of ``TRUNK_TASK_COUNTS`` and UPGrad at K = 8."""
    cases = [("toy", "mgda", STEP_TASKS)]
    for network in TRUNK_NETWORKS[1:]:
        cases += [(network, "mgda", k) for k in TRUNK_TASK_COUNTS]
        cases.append((network, "upgrad", STEP_TASKS))
    return cases


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
    # The fewest bytes the step must move (each input read once, each output written once), for
    # the achieved GB/s.
    bytes_moved: int | None = None
    compile_seconds: float | None = None  # torch.compile's first call, excluded from the timing
    # Entered around the timed calls: a compiled case fails on a recompile instead of timing it.
    timing_guard: Callable[[], AbstractContextManager[object]] = nullcontext
    # Peak memory of one step above what was allocated before it (training steps only).
    peak_bytes: int | None = None


def _synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def _warmed(case: Case, calls: int = 3) -> Case:
    for _ in range(calls):
        case.step()
    return case


class _LiveBytes(TorchDispatchMode):
    """The bytes of the storages that operations create while the mode is on, live and at
    their peak: each new storage counts once (views and in-place results share one) until it
    is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        result = func(*args, **(kwargs or {}))
        # A view or an in-place result shares an input's storage: nothing new (a parameter's
        # transpose in nn.Linear would otherwise count the parameter).
        inputs = {
            id(arg.untyped_storage())
            for arg in tree_leaves((args, kwargs))
            if isinstance(arg, Tensor)
        }
        for tensor in tree_leaves(result):
            if isinstance(tensor, Tensor) and id(tensor.untyped_storage()) not in inputs:
                self._count(tensor.untyped_storage())
        return result

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, size = id(storage), storage.nbytes()
        if key in self._counted or size == 0:
            return
        self._counted.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        self._counted.discard(key)
        self.live -= size


def live_bytes_peak(step: Callable[[], None], device: str) -> int:
    """The peak memory that one call of ``step`` allocates above what was there before: the
    CUDA allocator's peak, or on a CPU (whose allocator keeps no statistics) the peak of the
    storages that its operations create, autograd's included."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device) - before
    tracker = _LiveBytes()
    with tracker:
        step()
    return tracker.peak


def default_device() -> str:
    """``FUSED_MTL_BENCH_DEVICE`` if set, else CUDA when available, else CPU."""
    return os.environ.get("FUSED_MTL_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: str, group: str, implementation: str) -> None:
    """Raise :class:`Unavailable` unless ``device`` can run the case."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        reason = f"device {device!r}: CUDA is not available on this machine"
        raise Unavailable(group, implementation, reason)


# --- uncertainty weighting -------------------------------------------------------------------


def per_task_loop(losses: Sequence[Tensor] | Tensor, log_vars: Tensor) -> Tensor:
    """The loop users copy: one small expression per task, summed in Python."""
    total = 0
    for i, loss in enumerate(losses):
        total = total + torch.exp(-log_vars[i]) * loss + log_vars[i]
    return total


def vectorized_eager(losses: Sequence[Tensor] | Tensor, log_vars: Tensor) -> Tensor:
    """The same sum as one eager expression over the stacked losses."""
    stacked = losses if isinstance(losses, Tensor) else torch.stack(list(losses))
    return (torch.exp(-log_vars) * stacked + log_vars).sum()


def uncertainty_group(num_tasks: int, losses_as: str) -> str:
    """The group of an uncertainty-weighting case: K and the form the losses come in."""
    if losses_as not in UNCERTAINTY_INPUTS:
        raise ValueError(f"losses_as must be one of {UNCERTAINTY_INPUTS}, got {losses_as!r}")
    return f"uncertainty K={num_tasks}" + ("" if losses_as == "scalars" else ", (K,) tensor")


def _uncertainty_losses(num_tasks: int, losses_as: str, device: str) -> list[Tensor] | Tensor:
    """K scalar leaves (one per head, as a multi-head model produces them) or one (K,) leaf."""
    values = torch.rand(num_tasks, generator=torch.Generator().manual_seed(num_tasks)).to(device)
    if losses_as == "vector":
        return values.requires_grad_()
    return [value.clone().requires_grad_() for value in values]


def _clear_grads(leaves: Sequence[Tensor]) -> None:
    # What zero_grad(set_to_none=True), torch's default, leaves before each training step.
    for leaf in leaves:
        leaf.grad = None


def uncertainty_case(
    implementation: str, num_tasks: int, device: str, losses_as: str = "scalars"
) -> Case:
    """One forward + backward of the balanced total over ``num_tasks`` losses, given as K scalar
    tensors (``losses_as="scalars"``) or as one ``(K,)`` tensor (``"vector"``).

    Every step starts with the gradients set to None, as after ``zero_grad()``, so no
    implementation pays for accumulating into the previous step's gradients.
    """
    group, baseline = uncertainty_group(num_tasks, losses_as), "per_task_loop"
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
    losses = _uncertainty_losses(num_tasks, losses_as, device)
    leaves = list(losses) if isinstance(losses, list) else [losses]
    if implementation in ("fused_auto", "torch_fallback", "cuda_graph"):
        backend = "torch" if implementation == "torch_fallback" else "auto"
        module = UncertaintyWeighting(num_tasks, backend=backend).to(device)
        leaves += module.parameters()

        def total() -> Tensor:
            return module(losses)
    elif implementation in ("per_task_loop", "vectorized_eager", "compiled_loop"):
        log_vars = torch.zeros(num_tasks, device=device, requires_grad=True)
        leaves.append(log_vars)
        if implementation == "compiled_loop":
            torch.compiler.reset()  # each case compiles afresh instead of counting as a recompile
            expression = torch.compile(per_task_loop)
        else:
            expression = per_task_loop if implementation == "per_task_loop" else vectorized_eager

        def total() -> Tensor:
            return expression(losses, log_vars)
    else:
        raise ValueError(f"unknown implementation {implementation!r}")

    def forward_backward() -> None:
        _clear_grads(leaves)
        total().backward()

    if implementation == "cuda_graph":
        return _warmed(Case(group, implementation, _graphed(forward_backward), baseline))
    synchronize = _synchronizer(device)

    def step() -> None:
        forward_backward()
        synchronize()

    if implementation != "compiled_loop":
        return _warmed(Case(group, implementation, step, baseline))
    started = time.perf_counter()
    step()  # compiles the forward, then the backward
    case = Case(
        group,
        implementation,
        step,
        baseline,
        compile_seconds=time.perf_counter() - started,
        timing_guard=lambda: torch.compiler.set_stance("fail_on_recompile"),
    )
    return _warmed(case)


def _graphed(work: Callable[[], None]) -> Callable[[], None]:
    """``work`` captured once in a CUDA graph; the returned step replays it and synchronises.

    A ``work`` that sets gradients to None before its backward (the whole-step capture recipe of
    torch's CUDA-graph notes) captures a backward that writes fresh gradient buffers, owned by
    the graph and rewritten by every replay, instead of adding to old ones.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: kernels compiled, caches built
        for _ in range(3):
            work()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()

    def step() -> None:
        graph.replay()
        torch.cuda.synchronize()

    return step


def launch_floor_case(implementation: str, device: str) -> Case:
    """One launch of an empty Triton kernel, eager (``empty_triton_kernel``) or replayed from a
    CUDA graph (``empty_triton_kernel_graph``): the floor under any one-launch op."""
    group = LAUNCH_FLOOR
    check_device(device, group, implementation)
    if implementation not in LAUNCH_FLOOR_IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}")
    if torch.device(device).type != "cuda":
        reason = "the launch floor is measured on CUDA (on a CPU Triton runs in its interpreter)"
        raise Unavailable(group, implementation, reason)
    from fused_mtl.kernels.launch_floor import launch_empty_kernel

    anchor = torch.empty(1, device=device)

    def launch() -> None:
        launch_empty_kernel(anchor)

    if implementation == "empty_triton_kernel_graph":
        step = _graphed(launch)
    else:

        def step() -> None:
            launch()
            torch.cuda.synchronize()

    return _warmed(Case(group, implementation, step, LAUNCH_FLOOR_IMPLEMENTATIONS[0]))


# --- per-task gradient norms and Gram --------------------------------------------------------


def _gradient_matrix(num_tasks: int, width: int, device: str) -> Tensor:
    gen = torch.Generator(device=device).manual_seed(num_tasks)
    return torch.randn(num_tasks, width, generator=gen, device=device)


def gram_case(op: str, implementation: str, num_tasks: int, width: int, device: str) -> Case:
    """``op`` ("norms" or "gram") of a ``(K, P)`` fp32 gradient matrix: ``fused_auto`` or the
    baseline (``per_task`` vector norms, or ``matmul``)."""
    group = f"{op} K={num_tasks} P={width}"
    check_device(device, group, implementation)
    grads = _gradient_matrix(num_tasks, width, device)
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

    outputs = num_tasks if op == "norms" else num_tasks * num_tasks
    bytes_moved = grads.numel() * grads.element_size() + outputs * 4
    return _warmed(Case(group, implementation, step, baseline, bytes_moved=bytes_moved))


def copy_group(num_tasks: int, width: int) -> str:
    """The group of the copy that the norms / Gram of a ``(K, P)`` matrix are compared with."""
    return f"copy K={num_tasks} P={width}"


def copy_case(num_tasks: int, width: int, device: str) -> Case:
    """A copy of the same ``(K, P)`` matrix into another buffer: the bandwidth that a kernel
    which reads every element once can hope for (bytes read plus bytes written)."""
    group = copy_group(num_tasks, width)
    check_device(device, group, "copy")
    source = _gradient_matrix(num_tasks, width, device)
    target = torch.empty_like(source)
    synchronize = _synchronizer(device)

    def step() -> None:
        target.copy_(source)
        synchronize()

    bytes_moved = 2 * source.numel() * source.element_size()
    return _warmed(Case(group, "copy", step, "copy", bytes_moved=bytes_moved))


# --- training steps on the toy's network -----------------------------------------------------


def _toy(num_tasks: int, device: str) -> tuple[MultiTaskMLP, ToyRegression]:
    """The toy's network and one batch of its data."""
    data = gradnorm_toy(num_tasks=num_tasks, num_samples=BATCH, device=device)
    torch.manual_seed(0)
    return MultiTaskMLP(num_tasks).to(device), data


# Warm-up calls of a training step: past the first end of a DWA period (``period_steps=10`` in
# these cases), where a compiled step compiles the period's end once more; timed under
# fail_on_recompile, that compile would end the run.
TRAINING_WARMUP_CALLS = 12


def _training_step(
    group: str,
    implementation: str,
    baseline: str,
    model: nn.Module,
    run: Callable[[], None],
    calls: int = TRAINING_WARMUP_CALLS,
) -> Case:
    device = str(next(model.parameters()).device)
    synchronize = _synchronizer(device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        run()
        synchronize()

    case = _warmed(Case(group, implementation, step, baseline), calls=calls)
    return replace(case, peak_bytes=live_bytes_peak(step, device))


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
            alpha = reference.min_norm_weights(grads @ grads.T, reference.INTERIOR_POINT_ITERATIONS)
            (alpha * losses).sum().backward()

    return _training_step(group, implementation, "per_task_loop", model, run)


def method_step_case(method: str, num_tasks: int, device: str) -> Case:
    """One training step (no optimiser update) with ``method``'s balancer, as ``fused-mtl demo``
    builds it, on the toy's network; the baseline is the plain sum."""
    group = f"method step K={num_tasks}"
    check_device(device, group, method)
    model, data = _toy(num_tasks, device)
    if method == "ntkmtl_sr":  # NTKMTL on the trunk's output, the representation
        ntkmtl = NTKMTL(model.trunk.parameters(), num_tasks)

        def run() -> None:
            features = model.trunk(data.inputs)
            outputs = torch.stack([head(features) for head in model.heads])
            ntkmtl.backward(task_mse(outputs, data.targets), features=features)

        return _training_step(group, method, "equal", model, run)
    balancer = make_balancer(method, model, num_tasks, period_steps=10).to(device)
    if isinstance(balancer, DTP):
        balancer.update_kpis(torch.linspace(0.1, 0.9, num_tasks))

    def run() -> None:
        balancer.backward(task_losses(model, data))

    return _training_step(group, method, "equal", model, run)


def trunk_step_group(network: str, num_tasks: int, method: str = "mgda") -> str:
    if network == "toy":
        return f"{method} step K={num_tasks}, per-head losses"
    return f"{method} trunk step K={num_tasks}, {TRUNK_LABELS[network]}"


class _Residual(nn.Module):
    """Two 3 x 3 convolutions with BatchNorm, and the skip connection around them."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels)

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = torch.relu(self.norm1(self.conv1(inputs)))
        return torch.relu(inputs + self.norm2(self.conv2(hidden)))


class _MeanOverSequence(nn.Module):
    """A transformer encoder whose output, averaged over the sequence, is the shared
    representation."""

    def __init__(self, width: int, heads: int, layers: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.encoder(inputs).mean(1)


class TrunkNet(nn.Module):
    """A benchmark trunk and K small heads (``width -> 16`` each)."""

    def __init__(self, trunk: nn.Module, width: int, num_tasks: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(width, TRUNK_OUTPUTS) for _ in range(num_tasks))


def trunk_network(network: str, num_tasks: int, device: str) -> tuple[nn.Module, Tensor, Tensor]:
    """The model (``.trunk``, ``.heads``), one batch of inputs and the targets ``(K, N, 16)``
    of a benchmark trunk: ``mlp`` (4 x 1024, batch 128), ``cnn`` (a ResNet-style stem and 4
    residual blocks of 32 channels with BatchNorm, 32 x 32 inputs, batch 64) or ``transformer``
    (4 encoder layers, width 256, 4 heads, sequence 64, batch 32)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if network == "mlp":
        sizes = {k: v for k, v in WIDE_TRUNK.items() if k != "batch"}
        model: nn.Module = MultiTaskMLP(num_tasks, **sizes)
        inputs = torch.randn(WIDE_TRUNK["batch"], sizes["input_dim"], generator=gen)
    elif network == "cnn":
        channels = 32
        trunk = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            *[_Residual(channels) for _ in range(4)],
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        model = TrunkNet(trunk, channels, num_tasks)
        inputs = torch.randn(64, 3, 32, 32, generator=gen)
    elif network == "transformer":
        model = TrunkNet(_MeanOverSequence(256, 4, 4), 256, num_tasks)
        inputs = torch.randn(32, 64, 256, generator=gen)
    else:
        raise ValueError(f"unknown trunk {network!r}")
    targets = torch.randn((num_tasks, inputs.shape[0], TRUNK_OUTPUTS), generator=gen)
    return model.to(device), inputs.to(device), targets.to(device)


def head_losses(model: nn.Module, inputs: Tensor, targets: Tensor) -> list[Tensor]:
    """Each task's mean squared error from its own head: one graph per task above the trunk."""
    return losses_of_features(model, model.trunk(inputs), targets)


def losses_of_features(model: nn.Module, features: Tensor, targets: Tensor) -> list[Tensor]:
    return [
        (head(features) - target).square().mean()
        for head, target in zip(model.heads, targets, strict=True)  # type: ignore[arg-type]
    ]


def trunk_step_case(
    network: str, implementation: str, num_tasks: int, device: str, method: str = "mgda"
) -> Case:
    """A training step (no optimiser update) of ``method`` (MGDA or UPGrad) over the whole
    trunk, every task's loss from its own head, on the toy's network or a benchmark trunk
    (``trunk_network``). Implementations: the plain sum; ``fused_layers``, the default (the
    trunk as a module: its Gram one layer at a time); ``fused_batched`` and ``fused_loop``
    (the trunk's parameters: the per-task gradients of every parameter, in one batched
    backward or K of them, as LibMTL does); TorchJD's ``mtl_backward`` + ``jac_to_grad``
    (autojac) and ``autogram.Engine`` (autogram) with its weighting of the same method."""
    if network not in TRUNK_NETWORKS or implementation not in TRUNK_STEP_IMPLEMENTATIONS:
        raise ValueError(f"unknown case {network!r} / {implementation!r}")
    if method not in TRUNK_METHODS:
        raise ValueError(f"unknown method {method!r}; one of {TRUNK_METHODS}")
    group = trunk_step_group(network, num_tasks, method)
    check_device(device, group, implementation)
    if implementation.startswith("torchjd") and importlib.util.find_spec("torchjd") is None:
        reason = "TorchJD is not installed (pip install fused-mtl[peers])"
        raise Unavailable(group, implementation, reason)
    needs = ("qpsolvers", "quadprog") if method == "upgrad" else ()
    if implementation.startswith("torchjd") and any(
        importlib.util.find_spec(name) is None for name in needs
    ):
        reason = "TorchJD's UPGrad needs its quadprog extra (pip install fused-mtl[peers])"
        raise Unavailable(group, implementation, reason)
    if network == "toy":
        model, data = _toy(num_tasks, device)
        inputs, targets = data.inputs, data.targets
    else:
        model, inputs, targets = trunk_network(network, num_tasks, device)
    run = _trunk_step(implementation, method, model, inputs, targets)
    # The heavy trunks take seconds a step on a CPU: past the first call (its checks), the
    # steady state is reached at once.
    calls = TRAINING_WARMUP_CALLS if network == "toy" else 2
    return _training_step(group, implementation, "plain_sum", model, run, calls)


def _trunk_step(
    implementation: str, method: str, model: nn.Module, inputs: Tensor, targets: Tensor
) -> Callable[[], None]:
    num_tasks = len(model.heads)  # type: ignore[arg-type]
    trunk: nn.Module = model.trunk  # type: ignore[assignment]
    shared = list(trunk.parameters())
    if implementation == "plain_sum":
        return lambda: sum(head_losses(model, inputs, targets)).backward()  # type: ignore[union-attr]
    ours = MGDA if method == "mgda" else UPGrad
    if implementation.startswith("fused"):
        mode = implementation.removeprefix("fused_")
        balancer = ours(trunk if mode == "layers" else shared, num_tasks, per_task_gradients=mode)
        return lambda: balancer.backward(head_losses(model, inputs, targets))
    from torchjd import aggregation

    if implementation == "torchjd_autojac":
        from torchjd.autojac import jac_to_grad, mtl_backward

        aggregator = aggregation.MGDA() if method == "mgda" else aggregation.UPGrad()

        def autojac() -> None:
            features = trunk(inputs)
            mtl_backward(losses_of_features(model, features, targets), features)
            jac_to_grad(shared, aggregator)

        return autojac
    from torchjd.autogram import Engine

    engine = Engine(trunk, batch_dim=None)
    weighting = aggregation.MGDAWeighting() if method == "mgda" else aggregation.UPGradWeighting()

    def autogram() -> None:
        losses = torch.stack(head_losses(model, inputs, targets))
        losses.backward(weighting(engine.compute_gramian(losses)))

    return autogram


def compiled_step_case(method: str, implementation: str, num_tasks: int, device: str) -> Case:
    """One training step (forward, ``balancer(losses)``, backward) with ``method``'s balancer
    on the toy's network, eager or compiled whole with ``torch.compile`` (inductor). For
    GradNorm and MGDA the per-task backward passes run between compiled graphs."""
    group = f"compiled step {method} K={num_tasks}"
    check_device(device, group, implementation)
    if implementation not in COMPILED_STEP_IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}")
    model, data = _toy(num_tasks, device)
    balancer = make_balancer(method, model, num_tasks, period_steps=10).to(device)
    if isinstance(balancer, DTP):
        balancer.update_kpis(torch.linspace(0.1, 0.9, num_tasks))

    def run() -> None:
        balancer(task_losses(model, data)).backward()

    if implementation == "eager":
        return _training_step(group, implementation, "eager", model, run)
    torch.compiler.reset()  # each case compiles afresh instead of counting as a recompile
    compiled = torch.compile(run)
    started = time.perf_counter()
    compiled()
    compile_seconds = time.perf_counter() - started
    case = _training_step(group, implementation, "eager", model, compiled)
    return replace(
        case,
        compile_seconds=compile_seconds,
        timing_guard=lambda: torch.compiler.set_stance("fail_on_recompile"),
    )


# --- the suite -------------------------------------------------------------------------------


def suite(device: str, quick: bool = False) -> Iterator[Callable[[], Case]]:
    """Every case for ``device``, as factories in the order they are reported; ``quick`` keeps
    a small K and P of each group (a smoke run, not for quoting)."""
    for implementation in LAUNCH_FLOOR_IMPLEMENTATIONS:
        yield lambda i=implementation: launch_floor_case(i, device)
    for num_tasks in (2, 8) if quick else UNCERTAINTY_TASK_COUNTS:
        for losses_as in UNCERTAINTY_INPUTS:
            for implementation in UNCERTAINTY_IMPLEMENTATIONS:
                yield lambda k=num_tasks, f=losses_as, i=implementation: uncertainty_case(
                    i, k, device, f
                )
    widths = GRAM_WIDTHS[torch.device(device).type]
    if quick:
        widths = widths[:1]
    sizes = [(k, w) for k in ((2, 8) if quick else GRAM_TASK_COUNTS) for w in widths]
    for num_tasks, width in sizes:
        yield lambda k=num_tasks, w=width: copy_case(k, w, device)
    for op in ("norms", "gram"):
        for num_tasks, width in sizes:
            for implementation in ("fused_auto", GRAM_BASELINES[op]):
                yield lambda o=op, i=implementation, k=num_tasks, w=width: gram_case(
                    o, i, k, w, device
                )
    for method, implementations in GRADIENT_STEP_IMPLEMENTATIONS.items():
        for implementation in implementations:
            yield lambda m=method, i=implementation: gradient_step_case(m, i, STEP_TASKS, device)
    for method in STEP_METHODS:
        yield lambda m=method: method_step_case(m, STEP_TASKS, device)
    for network, method, num_tasks in trunk_cases()[:1] if quick else trunk_cases():
        for implementation in TRUNK_STEP_IMPLEMENTATIONS:
            yield lambda n=network, i=implementation, m=method, k=num_tasks: trunk_step_case(
                n, i, k, device, m
            )
    if quick:  # compiling the steps with inductor takes minutes on a CPU
        return
    for method in COMPILED_STEP_METHODS:
        for implementation in COMPILED_STEP_IMPLEMENTATIONS:
            yield lambda m=method, i=implementation: compiled_step_case(m, i, STEP_TASKS, device)


# --- where a result was measured -------------------------------------------------------------


def _command_output(command: list[str]) -> str | None:
    """A command's stripped stdout, or None when it is missing or fails."""
    try:
        return subprocess.run(
            command,
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _git_revision() -> str:
    """``FUSED_MTL_GIT_REVISION`` when set (for a copy of the tree without its ``.git``), else
    the checkout's short revision when the package runs from one, else "unknown"."""
    given = os.environ.get("FUSED_MTL_GIT_REVISION")
    return given or _command_output(["git", "rev-parse", "--short", "HEAD"]) or "unknown"


def _cuda_driver() -> str:
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    output = _command_output(query)
    return output.splitlines()[0] if output else "unknown"


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
        "driver": _cuda_driver() if on_cuda else "",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "fused_mtl": __version__,
        "git_revision": _git_revision(),
        "backend_override": os.environ.get("FUSED_MTL_BACKEND", ""),
    }
