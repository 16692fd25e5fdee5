"""Drop-ins: same parameter names, initial values, calling conventions, numbers and gradients as
the snippets users copy, written out here as those snippets do it: a Python loop over tasks."""

import math

import pytest
import torch
from formulas import awl_loop, multi_noise_loop

from fused_mtl.compat import AutomaticWeightedLoss, MultiNoiseLoss

BACKENDS = ["triton", "torch"]
# The parameters' gradients subtract two parts of size ~1 (e.g. -L/p^3 + 2p/(1+p^2) at p = 1.3 is
# -0.910 + 0.967): float32 leaves ~1e-7 absolute error on a result of 0.056, so the comparison
# is relative to the parts (atol) as well as to the result (rtol).
GRAD_TOL = {"rtol": 1e-6, "atol": 1e-6}


def snippet_awl_total(params, losses):
    total = 0
    for i, loss in enumerate(losses):
        total += 0.5 / (params[i] ** 2) * loss + torch.log(1 + params[i] ** 2)
    return total


def snippet_multi_noise_total(noise_params, losses):
    total = 0
    for i, loss in enumerate(losses):
        total += (1 / torch.square(noise_params[i])) * loss + torch.log(noise_params[i])
    return total


def test_awl_parameter_and_initial_value():
    awl = AutomaticWeightedLoss()
    assert [name for name, _ in awl.named_parameters()] == ["params"]
    assert torch.equal(awl.params.detach(), torch.ones(2))
    assert torch.equal(AutomaticWeightedLoss(num=5).params.detach(), torch.ones(5))


def test_multi_noise_parameter_and_initial_value():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    multi_loss = MultiNoiseLoss(n_losses=4)
    assert [name for name, _ in multi_loss.named_parameters()] == ["noise_params"]
    # Same draw as torch.rand(n_losses) under the same seed, hence uniform in (0, 1).
    assert torch.equal(multi_loss.noise_params.detach(), expected)
    assert multi_loss.noise_params.device == torch.empty(0).device


@pytest.mark.parametrize("backend", BACKENDS)
def test_awl_matches_the_snippet(backend, device):
    losses = [2.0, 0.125, 7.5]
    p = [1.3, -0.6, 0.9]
    awl = AutomaticWeightedLoss(3, backend=backend).to(device)
    with torch.no_grad():
        awl.params.copy_(torch.tensor(p))
    loss_tensors = [torch.tensor(v, device=device, requires_grad=True) for v in losses]
    total = awl(*loss_tensors)
    assert total.shape == ()
    assert math.isclose(total.item(), awl_loop(losses, p), rel_tol=1e-6)
    total.backward()

    ref_p = torch.tensor(p, dtype=torch.float64, requires_grad=True)
    ref_losses = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in losses]
    snippet_awl_total(ref_p, ref_losses).backward()
    torch.testing.assert_close(awl.params.grad.double().cpu(), ref_p.grad, **GRAD_TOL)
    for got, ref in zip(loss_tensors, ref_losses, strict=True):
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, **GRAD_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_noise_matches_the_snippet(backend, device):
    losses = [2.0, 0.125, 7.5]
    eta = [0.35, 0.8, 0.05]
    multi_loss = MultiNoiseLoss(3, backend=backend).to(device)
    with torch.no_grad():
        multi_loss.noise_params.copy_(torch.tensor(eta))
    loss_tensors = [torch.tensor(v, device=device, requires_grad=True) for v in losses]
    total = multi_loss(loss_tensors)
    assert math.isclose(total.item(), multi_noise_loop(losses, eta), rel_tol=1e-6)
    total.backward()

    ref_eta = torch.tensor(eta, dtype=torch.float64, requires_grad=True)
    ref_losses = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in losses]
    snippet_multi_noise_total(ref_eta, ref_losses).backward()
    torch.testing.assert_close(
        multi_loss.noise_params.grad.double().cpu(), ref_eta.grad, **GRAD_TOL
    )
    for got, ref in zip(loss_tensors, ref_losses, strict=True):
        torch.testing.assert_close(got.grad.double().cpu(), ref.grad, **GRAD_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_training_trajectory_as_the_snippet(backend):
    """Ten SGD steps of the drop-in and of the snippet from the same start stay together."""
    torch.manual_seed(0)
    ours = AutomaticWeightedLoss(2, backend=backend)
    theirs = torch.nn.Parameter(torch.ones(2))
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_theirs = torch.optim.SGD([theirs], lr=0.1)
    for step in range(10):
        losses = [torch.tensor(1.0 + 0.1 * step), torch.tensor(3.0 / (step + 1))]
        for opt, total in (
            (opt_ours, ours(*losses)),
            (opt_theirs, snippet_awl_total(theirs, losses)),
        ):
            opt.zero_grad()
            total.backward()
            opt.step()
    torch.testing.assert_close(ours.params.detach(), theirs.detach(), rtol=1e-6, atol=0)


def test_weights_of_the_drop_ins():
    awl = AutomaticWeightedLoss(2)
    torch.testing.assert_close(awl.weights, torch.tensor([0.5, 0.5]))
    multi_loss = MultiNoiseLoss(2)
    with torch.no_grad():
        multi_loss.noise_params.copy_(torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(multi_loss.weights, torch.tensor([4.0, 0.25]))


def test_drop_in_errors_name_the_task():
    with pytest.raises(ValueError, match=r"task 1: loss has shape \(4,\)"):
        AutomaticWeightedLoss(2)(torch.tensor(1.0), torch.ones(4))
    with pytest.raises(ValueError, match="expected 3 task losses, got 2"):
        MultiNoiseLoss(3)([torch.tensor(1.0), torch.tensor(1.0)])


class SnippetAutomaticWeightedLoss(torch.nn.Module):
    """The AutomaticWeightedLoss snippet as users copy it."""

    def __init__(self, num=2):
        super().__init__()
        params = torch.ones(num, requires_grad=True)
        self.params = torch.nn.Parameter(params)

    def forward(self, *x):
        loss_sum = 0
        for i, loss in enumerate(x):
            loss_sum += 0.5 / (self.params[i] ** 2) * loss + torch.log(1 + self.params[i] ** 2)
        return loss_sum


class SnippetMultiNoiseLoss(torch.nn.Module):
    """The MultiNoiseLoss snippet, with ``noise_params`` registered as a parameter (the usual
    one keeps a plain tensor, which no ``state_dict`` holds)."""

    def __init__(self, n_losses):
        super().__init__()
        self.noise_params = torch.nn.Parameter(torch.rand(n_losses))


class Model(torch.nn.Module):
    """A model that holds its loss module, as training code does."""

    def __init__(self, loss_module):
        super().__init__()
        self.encoder = torch.nn.Linear(3, 2)
        self.awl = loss_module


@pytest.mark.parametrize(
    ("ours", "theirs", "name"),
    [
        (lambda: AutomaticWeightedLoss(3), lambda: SnippetAutomaticWeightedLoss(3), "params"),
        (lambda: MultiNoiseLoss(3), lambda: SnippetMultiNoiseLoss(3), "noise_params"),
    ],
)
@pytest.mark.parametrize("nested", [False, True])
def test_checkpoints_load_strictly_both_ways(ours, theirs, name, nested):
    """Swapping the import keeps old checkpoints loading and new ones loadable by old code."""
    wrap = Model if nested else (lambda module: module)
    prefix = "awl." if nested else ""
    drop_in, snippet = wrap(ours()), wrap(theirs())
    with torch.no_grad():
        getattr(drop_in.awl if nested else drop_in, name).copy_(torch.tensor([0.5, 1.5, 2.5]))
        getattr(snippet.awl if nested else snippet, name).copy_(torch.tensor([3.0, 4.0, 5.0]))
    saved = drop_in.state_dict()
    assert sorted(saved) == sorted(snippet.state_dict())
    assert list(saved).count(prefix + name) == 1

    into_snippet = wrap(theirs())
    into_snippet.load_state_dict(saved)  # strict
    assert torch.equal(into_snippet.state_dict()[prefix + name], torch.tensor([0.5, 1.5, 2.5]))
    into_drop_in = wrap(ours())
    into_drop_in.load_state_dict(snippet.state_dict())  # strict
    assert torch.equal(into_drop_in.state_dict()[prefix + name], torch.tensor([3.0, 4.0, 5.0]))


def test_checkpoints_with_the_old_extra_state_still_load():
    """A drop-in saved when it kept (empty) task names in its extra state loads strictly."""
    saved = {"params": torch.tensor([0.5, 1.5]), "_extra_state": {"tasks": None}}
    awl = AutomaticWeightedLoss(2)
    awl.load_state_dict(saved)
    assert torch.equal(awl.params.detach(), torch.tensor([0.5, 1.5]))
