"""Cross-checks against TorchJD, where it is installed (``pip install -e ".[peers]"``): its
aggregators and scalarisers on chosen gradients and losses, against ours. Where TorchJD departs
from the paper (Krum's score), the test shows the case where the two differ."""

import gram_formulas
import pytest
import torch

import fused_mtl
from fused_mtl.reference import gram_weights

aggregation = pytest.importorskip("torchjd.aggregation")
scalarization = pytest.importorskip("torchjd.scalarization")

F64 = torch.float64


def gradients(num_tasks, seed, columns=12):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(num_tasks, columns, generator=gen, dtype=F64)
    return J * torch.logspace(0, 1, num_tasks, dtype=F64)[:, None]


def test_trimmed_mean_is_torchjds():
    for num_tasks in (3, 5, 8):
        J = gradients(num_tasks, num_tasks)
        for trim in range((num_tasks - 1) // 2 + 1):
            theirs = aggregation.TrimmedMean(trim)(J)
            torch.testing.assert_close(gram_weights.trimmed_mean_update(J, trim), theirs)


def test_krum_is_torchjds_with_its_score_of_distances_not_squares():
    """TorchJD scores a row by the sum of its distances to its neighbours, the paper (and
    Krum here) by the sum of their squares: TorchJD's choice is the reference's with plain
    distances on every problem, ours with squares, and the two differ on some."""
    differ = 0
    for num_tasks in (4, 6, 9):
        for seed in range(5):
            J = gradients(num_tasks, 10 * num_tasks + seed)
            J[0] = 30 * J[0]  # an outlier
            gram = J @ J.T
            for byzantine in (0, 1):
                theirs = aggregation.KrumWeighting(byzantine, 2)(gram)
                ours = gram_weights.krum_weights(gram, byzantine, 2)
                torch.testing.assert_close(theirs, gram_formulas.krum(J, byzantine, 2, 1.0)[1])
                torch.testing.assert_close(ours, gram_formulas.krum(J, byzantine, 2)[1])
                differ += not torch.equal(ours, theirs)
    assert differ > 0


def test_cr_mogm_smooths_like_torchjds():
    theirs = aggregation.CRMOGMWeighting(aggregation.IMTLGWeighting(), alpha=0.7)
    ours = None
    for step in range(4):
        J = gradients(4, 100 + step)
        gram = J @ J.T
        current = gram_weights.imtl_g_weights(gram)
        ours = current if ours is None else gram_weights.smoothed_weights(ours, current, 0.7)
        torch.testing.assert_close(ours, theirs(gram), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_pbi_and_cosmos_are_torchjds(seed):
    losses = 0.1 + torch.rand(4, generator=torch.Generator().manual_seed(seed), dtype=F64)
    preferences = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=F64)
    ideal = torch.tensor([0.0, 0.05, 0.0, 0.02], dtype=F64)
    cases = [
        (
            fused_mtl.PBI(
                4, theta=5.0, preferences=preferences.tolist(), ideal_point=ideal.tolist()
            ),
            scalarization.PBI(5.0, preferences, ideal),
        ),
        (
            fused_mtl.COSMOS(4, mu=2.0, preferences=preferences.tolist()),
            scalarization.COSMOS(2.0, preferences),
        ),
    ]
    for ours, theirs in cases:
        point = losses.clone().requires_grad_()
        value = theirs(point)
        (gradient,) = torch.autograd.grad(value, point)
        total = ours(losses)
        # TorchJD adds 1e-12 under PBI's square root: 1e-12 / (2 d_2) off the ray.
        torch.testing.assert_close(total, value.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours.weights, gradient, rtol=1e-9, atol=1e-10)
