"""Every method treats the tasks alike: permuting the tasks permutes the weights.

Each case runs a short scripted history twice, once with the tasks in their order and once
permuted (task ``j`` of the second run is task ``perm[j]`` of the first, with its losses, its
configuration and its head), and compares the weights.
"""

import pytest
import torch
from torch import nn

from fused_mtl import DTP, DWA, MGDA, EqualWeighting, GradNorm, UncertaintyWeighting

NUM_TASKS = 5
PERMUTATIONS = [[4, 3, 2, 1, 0], [2, 0, 4, 1, 3]]


def loss_history(steps=4, num_tasks=NUM_TASKS):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(steps, num_tasks, generator=gen, dtype=torch.float64) * 3 + 0.1


class Heads(nn.Module):
    """A shared trunk and one head per task; ``losses(order)`` lists the tasks in ``order``."""

    def __init__(self, num_tasks):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(num_tasks))
        gen = torch.Generator().manual_seed(1)
        self.register_buffer("inputs", torch.randn(16, 4, generator=gen))
        self.register_buffer("targets", torch.randn(num_tasks, 16, generator=gen))

    def losses(self, order, features=None):
        features = self.trunk(self.inputs) if features is None else features
        scale = torch.arange(1, len(self.heads) + 1, dtype=features.dtype)
        return [
            (self.heads[i](features).squeeze(1) - self.targets[i]).square().mean() * scale[i]
            for i in order
        ]


def run_uncertainty(order, device):
    losses = loss_history().float().to(device)[:, order]
    init = torch.linspace(-1, 1, NUM_TASKS)[order].tolist()
    uw = UncertaintyWeighting(len(order), init_log_var=init).to(device)
    optimizer = torch.optim.SGD(uw.parameters(), lr=0.1)
    for step in losses:
        optimizer.zero_grad()
        uw.backward(step)
        optimizer.step()
    return uw.weights


def run_dwa(order, device):
    dwa = DWA(len(order)).to(device)
    for index, step in enumerate(loss_history(steps=6).float().to(device)[:, order]):
        dwa(step)
        if index % 2 == 1:
            dwa.end_epoch()
    return dwa.weights


def run_dtp(order, device):
    gamma = torch.linspace(0, 2, NUM_TASKS)[order].tolist()
    dtp = DTP(len(order), gamma=gamma).to(device)
    for kpis in loss_history().div(4).to(device)[:, order]:
        dtp.update_kpis(kpis)
    return dtp.weights


def run_equal(order, device):
    return EqualWeighting(len(order)).to(device).weights


def run_gradnorm(order, device):
    net = Heads(NUM_TASKS).to(device)
    gradnorm = GradNorm(net.trunk[2].parameters(), len(order))
    optimizer = torch.optim.SGD([*net.parameters(), *gradnorm.parameters()], lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        gradnorm.backward(net.losses(order))
        optimizer.step()
    gradnorm.renormalize_()
    return gradnorm.weights.detach()


def run_mgda(order, device, **options):
    net = Heads(NUM_TASKS).to(device)
    mgda = MGDA(net.trunk[2].parameters(), len(order), **options)
    mgda.backward(net.losses(order))
    return mgda.weights


def run_mgda_ub(order, device):
    net = Heads(NUM_TASKS).to(device)
    mgda = MGDA(num_tasks=len(order), normalization="l2")
    features = net.trunk(net.inputs)
    mgda.backward(net.losses(order, features), features=features)
    return mgda.weights


def run_mgda_interior_point(order, device):
    return run_mgda(order, device, normalization="loss+")


METHODS = {
    "uncertainty": run_uncertainty,
    "dwa": run_dwa,
    "dtp": run_dtp,
    "equal": run_equal,
    "gradnorm": run_gradnorm,
    "mgda": run_mgda,
    "mgda_ub": run_mgda_ub,
    "mgda_interior_point": run_mgda_interior_point,
}


@pytest.mark.parametrize("perm", PERMUTATIONS)
@pytest.mark.parametrize("method", list(METHODS))
def test_permuting_the_tasks_permutes_the_weights(device, method, perm, monkeypatch):
    if method == "mgda_interior_point":
        monkeypatch.setattr("fused_mtl.reference.ENUMERATION_MAX_TASKS", 2)
    identity = list(range(NUM_TASKS))
    weights = METHODS[method](identity, device)
    permuted = METHODS[method](perm, device)
    # The same float32 arithmetic in another order: sums over tasks round differently.
    assert torch.allclose(permuted, weights[perm], rtol=1e-5, atol=1e-6), (permuted, weights)
    # The weights differ between tasks, so a method that ignored the order would fail.
    assert float(weights.max() - weights.min()) > 1e-3 or method == "equal"
