"""Every Gram method at loss scales from 1e-30 to 1e30, on both backends.

Scaling every loss by ``c`` scales the per-task gradients by ``c`` and their Gram by ``c^2``. A
Gram of float32 products underflows to 0 below gradients of about 1e-19 and overflows above
1.8e19; the Gram is float64 (``task_gram``) and the solvers run on it divided by a power of two,
so each method's weights follow its own law at every scale in float32's range:

- the same weights at every scale: MGDA (every normalisation), UPGrad, DualProj, PCGrad,
  GradVac, CAGrad, IMTL-G, Aligned-MTL, ConFIG, SDMGrad (whose Gram is divided by the squared
  mean norm);
- ``c^{-2 alpha / (1 + alpha)}`` times: Nash-MTL (``alpha = 1``: ``1 / c``) and FairGrad;
- MoCo and MoDo take a gradient step of a fixed rate on the weights with the Gram itself, so
  their weights at scale ``c`` are that step with ``c^2`` times the Gram at scale 1 (the float64
  formula of ``reference.stochastic``).
"""

import pytest
import torch
from torch import nn

import fused_mtl
from fused_mtl import functional
from fused_mtl.reference import stochastic

SCALES = [1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e20, 1e30]
NUM_TASKS = 3

#: Constructor options and the power p of the law ``w(c) = c^p w(1)``.
INVARIANT = {
    "MGDA": {},
    "UPGrad": {},
    "DualProj": {},
    "PCGrad": {},
    "GradVac": {},
    "CAGrad": {},
    "IMTLG": {},
    "AlignedMTL": {},
    "ConFIG": {},
    "SDMGrad": {},
}
POWER_LAW = {
    "NashMTL": ({}, -1.0),
    "FairGrad": ({"alpha": 0.5}, -2 * 0.5 / 1.5),
}
# Relative to the largest weight. The gradients at scale c are float32 numbers rounded apart
# from c times those at scale 1 (6e-8 relative each); the solvers' outputs move by a small
# multiple of that (2e-7 seen), Nash-MTL / FairGrad's Newton stop at 1e-9 of the residual.
RTOL = 1e-5


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(NUM_TASKS))

    def losses(self, inputs, targets, scale):
        """Tasks 0 and 1 pull the first head's output towards targets of opposite signs: their
        gradients conflict, so that PCGrad and GradVac act."""
        features = self.trunk(inputs)
        outputs = [self.heads[0](features), self.heads[0](features), self.heads[2](features)]
        return [
            scale * (output[:, 0] - target).square().mean()
            for output, target in zip(outputs, targets.T, strict=True)
        ]


def step(name, options, backend, scale, normalization=None):
    """The weights (float64) and the trunk's update after one call at loss scale ``scale``."""
    torch.manual_seed(0)
    net = Net()
    inputs, targets = torch.randn(16, 5), torch.randn(16, NUM_TASKS)
    targets[:, 1] = -2 * targets[:, 0]
    if normalization is not None:
        options = {**options, "normalization": normalization}
    method = getattr(fused_mtl, name)(net.trunk.parameters(), NUM_TASKS, backend=backend, **options)
    torch.manual_seed(1)  # the randomised methods' draws
    method.backward(net.losses(inputs, targets, scale))
    update = torch.cat([p.grad.reshape(-1) for p in net.trunk.parameters()])
    return method, method.weights.double(), update.double()


def assert_law(got, expected, what):
    assert torch.isfinite(got).all(), f"{what}: {got}"
    tolerance = RTOL * float(expected.abs().max())
    assert (got - expected).abs().max() <= tolerance, f"{what}: {got} vs {expected}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", [*INVARIANT, *POWER_LAW])
def test_weights_follow_the_methods_scaling_law(name, backend):
    options, power = POWER_LAW.get(name, (INVARIANT.get(name), 0.0))
    _, reference, _ = step(name, options, backend, 1.0)
    assert (reference - reference[0]).abs().max() > 1e-3  # not a trivial (uniform) answer
    for scale in SCALES:
        _, weights, update = step(name, options, backend, scale)
        assert_law(weights, reference * scale**power, f"{name} at {scale:g}")
        assert torch.isfinite(update).all() and update.abs().max() > 0, f"{name} at {scale:g}"


@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
def test_mgda_normalisations_are_scale_free(normalization):
    _, reference, _ = step("MGDA", {}, "torch", 1.0, normalization)
    for scale in SCALES:
        _, weights, _ = step("MGDA", {}, "torch", scale, normalization)
        assert_law(weights, reference, f"MGDA {normalization} at {scale:g}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["MoCo", "MoDo"])
def test_moco_and_modo_take_their_step_with_the_scaled_gram(name, backend):
    """One step from the uniform weights: ``Proj(lambda - rate (c^2 M lambda + rho lambda))``."""
    method, _, _ = step(name, {}, backend, 1.0)
    gram = method.gram if name == "MoDo" else None
    if name == "MoCo":
        tracked = method.tracked_gradients.double()
        gram = tracked @ tracked.T
    uniform = torch.full((NUM_TASKS,), 1 / NUM_TASKS, dtype=torch.float64)
    for scale in SCALES:
        method, weights, update = step(name, {}, backend, scale)
        scaled = gram.double() * scale**2
        if name == "MoCo":
            expected = stochastic.moco_lambdas(uniform, scaled, method.gamma, method.rho)
        else:
            expected = stochastic.modo_lambdas(uniform, scaled, method.gamma, method.rho)
        assert_law(weights, expected, f"{name} at {scale:g}")
        assert torch.isfinite(update).all(), f"{name} at {scale:g}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("scale", SCALES)
def test_the_gram_is_float64_and_exact_at_every_scale(backend, scale):
    """The Gram of float32 gradients times ``scale``: float64, within float32 summation's
    rounding (``P 2^-24 n_i n_k``, the bound of the CPU's float32 product when it is in range)
    of the exact Gram of those float32 numbers, whatever the scale."""
    torch.manual_seed(0)
    grads = [torch.randn(4, 300) * scale, torch.randn(4, 7, 11) * scale]
    gram = functional.task_gram(grads, backend=backend)
    wide = torch.cat([g.double().reshape(4, -1) for g in grads], dim=1)
    exact = wide @ wide.T
    norms = exact.diagonal().sqrt()
    assert gram.dtype == torch.float64
    assert ((gram - exact).abs() <= wide.shape[1] * 2.0**-24 * torch.outer(norms, norms)).all()
