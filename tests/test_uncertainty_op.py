"""The uncertainty-weighting op, both backends, against the float64 formulas.

The Triton backend runs the real kernels: compiled on CUDA, in the Triton interpreter on CPU.
"""

import contextlib
from unittest import mock

import pytest
import torch
from checks import LaunchCounter, assert_close_to
from formulas import Expected, dynamic_noise, liebel_koerner, log_variance

from fused_mtl.ops.uncertainty import uncertainty_weighting
from fused_mtl.reference import Parametrization
from fused_mtl.reference import uncertainty as reference

# Error of one computed value relative to the magnitude of what it adds up (see formulas.py).
# - float32: a few fp32 ulps (2^-24 = 6e-8) through exp / log and the products; on a GPU the
#   approximate exp2 adds about |s| ulps, and these inputs keep |s| <= 3.
# - float16 / bfloat16: one ulp of the stored result (2^-10, 2^-7); the fp32 arithmetic before the
#   final rounding is 2^13 times finer and does not show.
# - float64 (torch backend only): float64 arithmetic.
ELEMENT_RTOL = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
}
# The total sums K terms in the compute dtype (fp32 for every storage dtype but float64). Along
# any summation path there are at most log2(K) + K / 1024 + a few roundings: 64 of them bound
# every K <= 65,536 used here, for both the kernels' blocked sum and torch's pairwise sum.
SUM_RTOL = {torch.float64: 64 * 2.0**-53}
SUM_RTOL_FP32 = 64 * 2.0**-24

FORMULAS = {
    Parametrization.LOG_VARIANCE: log_variance,
    Parametrization.LIEBEL_KOERNER: liebel_koerner,
    Parametrization.DYNAMIC_NOISE: dynamic_noise,
}
NUM_TASKS = [1, 2, 3, 7, 64, 1000, 65536]
UPSTREAM_GRAD = 0.75  # exact in every dtype


def sample(parametrization, num_tasks, seed=0):
    """Float64 losses and parameters inside each parametrisation's domain.

    Losses are scaled so that the total stays well inside float16's range at every K.
    """
    gen = torch.Generator().manual_seed(seed + num_tasks)
    losses = torch.rand(num_tasks, generator=gen, dtype=torch.float64) * 5 * 64 / max(num_tasks, 64)
    losses[0] = 0.0  # a task whose loss is exactly zero
    uniform = torch.rand(num_tasks, generator=gen, dtype=torch.float64)
    if parametrization == Parametrization.LOG_VARIANCE:
        params = uniform * 6 - 3
    elif parametrization == Parametrization.LIEBEL_KOERNER:
        sign = torch.where(torch.rand(num_tasks, generator=gen) < 0.5, -1.0, 1.0).double()
        params = (uniform * 1.7 + 0.3) * sign  # sigma enters squared: either sign is valid
    else:
        params = uniform * 1.3 + 0.2  # log(eta) needs eta > 0
    return losses, params


def run_op(losses, params, parametrization, backend, loss_coefs=None, reg_coefs=None):
    """``backend="torch_node"``: the torch path's autograd node with the bound's rule written
    out, also where a CPU would take plain autograd over the formula (every parameter inside
    its range)."""
    losses = losses.detach().requires_grad_()
    params = params.detach().requires_grad_()
    node_only = mock.patch.object(reference, "_inside", lambda *args: False)
    with node_only if backend == "torch_node" else contextlib.nullcontext():
        op_backend = "torch" if backend == "torch_node" else backend
        total = uncertainty_weighting(
            losses, params, parametrization, loss_coefs, reg_coefs, op_backend
        )
        total.backward(torch.tensor(UPSTREAM_GRAD, dtype=total.dtype, device=total.device))
    return total, losses.grad, params.grad


def check_against(
    expected: Expected, total, grad_losses, grad_params, out_dtype, loss_dtype, param_dtype
):
    sum_rtol = SUM_RTOL.get(out_dtype, SUM_RTOL_FP32)
    total_bound_rtol = (
        ELEMENT_RTOL[out_dtype] * expected.total.abs() / expected.total_magnitude.clamp_min(1e-300)
        + sum_rtol
    )
    assert_close_to(total, expected.total, expected.total_magnitude, total_bound_rtol, "total")
    assert_close_to(
        grad_losses,
        UPSTREAM_GRAD * expected.grad_losses,
        UPSTREAM_GRAD * expected.grad_losses.abs(),
        ELEMENT_RTOL[loss_dtype],
        "d total / d losses",
    )
    assert_close_to(
        grad_params,
        UPSTREAM_GRAD * expected.grad_params,
        UPSTREAM_GRAD * expected.grad_params_magnitude,
        ELEMENT_RTOL[param_dtype],
        "d total / d params",
    )


CASES = [
    pytest.param(backend, dtype, id=f"{backend}-{str(dtype).removeprefix('torch.')}")
    for backend in ("triton", "torch", "torch_node")
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    if not (backend == "triton" and dtype == torch.float64)
]


@pytest.mark.parametrize("num_tasks", NUM_TASKS)
@pytest.mark.parametrize("parametrization", list(Parametrization), ids=lambda p: p.name.lower())
@pytest.mark.parametrize(("backend", "dtype"), CASES)
def test_matches_formulas(backend, dtype, parametrization, num_tasks, device):
    losses64, params64 = sample(parametrization, num_tasks)
    losses, params = losses64.to(dtype), params64.to(dtype)
    # The reference sees exactly the values the op sees: the inputs rounded to `dtype`.
    expected = FORMULAS[parametrization](losses.double(), params.double())
    total, grad_losses, grad_params = run_op(
        losses.to(device), params.to(device), parametrization, backend
    )
    assert total.shape == () and total.dtype == dtype and total.device.type == device.type
    assert grad_losses.dtype == dtype and grad_params.dtype == dtype
    check_against(expected, total, grad_losses, grad_params, dtype, dtype, dtype)


@pytest.mark.parametrize("num_tasks", [1, 5, 1000])
@pytest.mark.parametrize("backend", ["triton", "torch", "torch_node"])
def test_task_type_coefficients(backend, num_tasks, device):
    """Per-task (a_i, b_i): Kendall et al.'s regression and classification terms, mixed."""
    losses, s = sample(Parametrization.LOG_VARIANCE, num_tasks, seed=1)
    a = torch.tensor([(0.5, 1.0)[i % 2] for i in range(num_tasks)], dtype=torch.float64)
    b = torch.full((num_tasks,), 0.5, dtype=torch.float64)
    expected = log_variance(losses, s, a, b)
    f32 = dict(dtype=torch.float32, device=device)
    total, grad_losses, grad_params = run_op(
        losses.to(**f32),
        s.to(**f32),
        Parametrization.LOG_VARIANCE,
        backend,
        a.to(**f32),
        b.to(**f32),
    )
    check_against(expected, total, grad_losses, grad_params, *(torch.float32,) * 3)


@pytest.mark.parametrize("loss_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_mixed_dtypes_follow_promotion(backend, loss_dtype, device):
    """Half-precision losses (autocast) with float32 parameters: the total is float32."""
    losses64, s64 = sample(Parametrization.LOG_VARIANCE, 33)
    losses = losses64.to(loss_dtype)
    expected = log_variance(losses.double(), s64.float().double())
    total, grad_losses, grad_params = run_op(
        losses.to(device), s64.float().to(device), Parametrization.LOG_VARIANCE, backend
    )
    assert total.dtype == torch.float32
    assert grad_losses.dtype == loss_dtype and grad_params.dtype == torch.float32
    check_against(
        expected, total, grad_losses, grad_params, torch.float32, loss_dtype, torch.float32
    )


# Valid but numerically extreme inputs: every result must be finite and match the formulas.
# exp(80) = 5.5e34 stays inside float32; on a GPU the approximate exp2 of |s| = 80 is off by up to
# ~2 * 80 * log2(e) fp32 ulps, hence the wider float32 row for this test only.
EXTREME_RTOL = {torch.float32: 2 * 80 * 1.45 * 2.0**-24 + 2e-6}


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_extreme_log_variances(backend, device):
    """Log-variances far outside the range [-20, 20]: the formula at the clamped value, and the
    gradient dropped only where it pushes further out (s = -80 with L = 0: d/ds = 1, a step
    lowers s)."""
    s = torch.tensor([-80.0, 80.0, -80.0, 80.0, 0.0, -10.0, 10.0, -20.0], dtype=torch.float64)
    losses = torch.tensor([0.0, 0.0, 1.0, 1.0, 6.0e4, 1.0e-3, 6.0e4, 0.0], dtype=torch.float64)
    expected = log_variance(losses, s.clamp(-20.0, 20.0))
    outward = torch.tensor([True] + [False] * 7)
    expected.grad_params = torch.where(outward, 0.0, expected.grad_params)
    total, grad_losses, grad_params = run_op(
        losses.float().to(device), s.float().to(device), Parametrization.LOG_VARIANCE, backend
    )
    for value in (total, grad_losses, grad_params):
        assert bool(torch.isfinite(value).all())
    rtol = EXTREME_RTOL[torch.float32]
    assert_close_to(total, expected.total, expected.total_magnitude, rtol, "total")
    assert_close_to(
        grad_losses,
        UPSTREAM_GRAD * expected.grad_losses,
        UPSTREAM_GRAD * expected.grad_losses,
        rtol,
        "dL",
    )
    assert_close_to(
        grad_params,
        UPSTREAM_GRAD * expected.grad_params,
        UPSTREAM_GRAD * expected.grad_params_magnitude,
        rtol,
        "ds",
    )


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_float16_losses_near_their_maximum(backend, device):
    """Losses of 6e4 in float16 (max 65504) with float32 log-variances: no overflow, no NaN."""
    losses = torch.tensor([6.0e4, 6.5e4, 1.0], dtype=torch.float16)
    s = torch.tensor([0.0, 2.0, -1.0])
    expected = log_variance(losses.double(), s.double())
    total, grad_losses, grad_params = run_op(
        losses.to(device), s.to(device), Parametrization.LOG_VARIANCE, backend
    )
    assert bool(torch.isfinite(total)) and total.dtype == torch.float32
    check_against(
        expected, total, grad_losses, grad_params, torch.float32, torch.float16, torch.float32
    )


@pytest.mark.parametrize("num_tasks", [1, 3, 65536])
def test_one_launch_forward_one_launch_backward(num_tasks, device, monkeypatch):
    from fused_mtl.kernels import uncertainty as kernels

    forward = LaunchCounter(kernels._uncertainty_forward_kernel)
    backward = LaunchCounter(kernels._uncertainty_backward_kernel)
    monkeypatch.setattr(kernels, "_uncertainty_forward_kernel", forward)
    monkeypatch.setattr(kernels, "_uncertainty_backward_kernel", backward)
    losses = torch.rand(num_tasks, device=device, requires_grad=True)
    s = torch.zeros(num_tasks, device=device, requires_grad=True)
    total = uncertainty_weighting(losses, s, backend="triton")
    assert (forward.launches, backward.launches) == (1, 0)
    total.backward()
    assert (forward.launches, backward.launches) == (1, 1)


def test_forward_is_bitwise_reproducible(device):
    losses, s = sample(Parametrization.LOG_VARIANCE, 65536, seed=3)
    losses, s = losses.float().to(device), s.float().to(device)
    first = uncertainty_weighting(losses, s, backend="triton")
    for _ in range(3):
        assert torch.equal(uncertainty_weighting(losses, s, backend="triton"), first)


def test_fallback_gradcheck():
    """The torch fallback's gradients (autograd through the reference) by finite differences."""
    gen = torch.Generator().manual_seed(5)
    losses = torch.rand(4, generator=gen, dtype=torch.float64, requires_grad=True)
    for parametrization in Parametrization:
        params = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
        a = torch.tensor([0.5, 1.0, 0.5, 1.0], dtype=torch.float64)
        b = torch.full((4,), 0.5, dtype=torch.float64)
        coefs = (a, b) if parametrization == Parametrization.LOG_VARIANCE else (None, None)
        assert torch.autograd.gradcheck(
            lambda L, q, p=parametrization, c=coefs: uncertainty_weighting(L, q, p, *c, "torch"),
            (losses, params),
        )
        assert torch.autograd.gradgradcheck(
            lambda L, q, p=parametrization, c=coefs: uncertainty_weighting(L, q, p, *c, "torch"),
            (losses, params),
        )


@pytest.mark.parametrize("parametrization", list(Parametrization), ids=lambda p: p.name.lower())
def test_second_derivatives_match_the_torch_backend(parametrization, device):
    """create_graph=True on the Triton path (a gradient penalty) gives true second derivatives."""
    losses64, params64 = sample(parametrization, 5, seed=7)
    results = {}
    for backend in ("triton", "torch"):
        losses = losses64.float().to(device).requires_grad_()
        params = params64.float().to(device).requires_grad_()
        total = uncertainty_weighting(losses, params, parametrization, backend=backend)
        grad_losses, grad_params = torch.autograd.grad(total, (losses, params), create_graph=True)
        penalty = (grad_losses**2).sum() + (grad_params**2).sum()
        results[backend] = torch.autograd.grad(penalty, (losses, params))
    for got, expected in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert results["triton"][1].abs().sum() > 0  # the penalty does depend on the parameters
