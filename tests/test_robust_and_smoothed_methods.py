"""Krum, the trimmed mean, CR-MOGM and DB-MTL against float64 references written from their
papers (``gram_formulas``, ``method_formulas``): the weights from a Gram matrix, the update on a
float64 model over steps, and what they refuse."""

import copy
import math

import gram_formulas
import method_formulas as formulas
import pytest
import torch
from test_gram_methods import TwoHeads, jacobian
from test_loss_and_stochastic_methods import (
    NUM_TASKS,
    Net,
    assert_update,
    batch,
    head_gradients,
    sgd_step,
    trained_gradients,
)
from torch import nn

import fused_mtl
from fused_mtl.reference import gram_weights

F64 = torch.float64


def problems():
    """(J, f, m): K from 3 to 9, every valid number of outliers f and of chosen rows m, and
    one task in three an outlier (its gradient 50 times larger and turned)."""
    for num_tasks in (3, 4, 6, 9):
        J = jacobian("random", num_tasks, columns=12, seed=num_tasks)
        J[::3] = -50 * J[::3]
        for byzantine in range(num_tasks - 2):
            for selected in sorted({1, num_tasks - byzantine}):
                yield J, byzantine, selected


def test_krum_chooses_the_papers_rows():
    for J, byzantine, selected in problems():
        _, expected = gram_formulas.krum(J, byzantine, selected)
        got = gram_weights.krum_weights(J @ J.T, byzantine, selected)
        assert torch.equal(got, expected), (J.shape[0], byzantine, selected)


def test_krum_leaves_the_outlier_out_and_breaks_ties_by_index():
    J = jacobian("random", 5, columns=8)
    J[1:] = J[0] + 1e-3 * J[1:]  # four close gradients
    J[0] = J[0] * 100  # and one far off
    assert float(gram_weights.krum_weights(J @ J.T, 1, 3)[0]) == 0.0
    same = torch.ones(4, 3, dtype=F64)
    assert gram_weights.krum_weights(same @ same.T, 0, 2).tolist() == [0.5, 0.5, 0.0, 0.0]


def test_trimmed_mean_is_the_coordinate_wise_trimmed_mean():
    for num_tasks in (1, 3, 4, 7):
        J = jacobian("scaled", num_tasks, columns=30, seed=num_tasks)
        for trim in range((num_tasks - 1) // 2 + 1):
            expected = gram_formulas.trimmed_mean(J, trim)
            got = gram_weights.trimmed_mean_update(J, trim)
            torch.testing.assert_close(got, expected, rtol=1e-15, atol=1e-15)


# --- on a float64 model -----------------------------------------------------------------------


def model_step(method, **options):
    """One backward of ``method`` on a float64 two-layer trunk with three heads: the trunk's
    gradient, the per-task gradients J, the heads' gradients and the balancer."""
    torch.manual_seed(0)
    model = TwoHeads(3).double()
    inputs, targets = torch.randn(16, 5, dtype=F64), torch.randn(16, 3, dtype=F64)
    shared = list(model.trunk.parameters())
    balancer = getattr(fused_mtl, method)(model.trunk.parameters(), 3, **options)
    losses = model.losses(inputs, targets)
    rows = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
    J = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])
    heads = [
        torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)
        for loss, head in zip(losses, model.heads, strict=True)
    ]
    balancer.backward(losses)
    trunk = torch.cat([p.grad.reshape(-1) for p in shared])
    return trunk, J, heads, model, balancer


@pytest.mark.parametrize("per_task_gradients", ["batched", "loop"])
@pytest.mark.parametrize(("byzantine", "selected"), [(0, 1), (0, 2), (0, 3)])
def test_krum_backward_puts_the_chosen_mean_in_the_trunk_and_trains_every_head(
    per_task_gradients, byzantine, selected
):
    trunk, J, heads, model, krum = model_step(
        "Krum", byzantine=byzantine, selected=selected, per_task_gradients=per_task_gradients
    )
    expected, selection = gram_formulas.krum(J, byzantine, selected)
    torch.testing.assert_close(trunk, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(krum.selection, selection.to(krum.selection.dtype))
    assert torch.equal(krum.weights, torch.full((3,), 1 / 3, dtype=F64))
    for head, grads in zip(model.heads, heads, strict=True):  # every head, chosen or not
        for parameter, grad in zip(head.parameters(), grads, strict=True):
            torch.testing.assert_close(parameter.grad, grad / 3, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("per_task_gradients", ["batched", "loop"])
def test_trimmed_mean_backward_puts_the_trimmed_mean_in_the_trunk(per_task_gradients):
    trunk, J, heads, model, trimmed = model_step(
        "TrimmedMean", per_task_gradients=per_task_gradients
    )
    torch.testing.assert_close(trunk, gram_formulas.trimmed_mean(J, 1), rtol=1e-12, atol=1e-14)
    assert torch.equal(trimmed.weights, torch.full((3,), 1 / 3, dtype=F64))
    for head, grads in zip(model.heads, heads, strict=True):
        for parameter, grad in zip(head.parameters(), grads, strict=True):
            torch.testing.assert_close(parameter.grad, grad / 3, rtol=1e-12, atol=1e-14)


def test_cr_mogm_is_the_moving_average_of_its_methods_weights_over_steps():
    net = Net()
    smoothed = fused_mtl.CRMOGM(
        net.trunk.parameters(), NUM_TASKS, method=fused_mtl.UPGrad, alpha=0.7
    )
    average = None
    for step in range(4):
        data = batch(step)
        J = gram_formulas_jacobian(net, data)
        _, current = gram_formulas.upgrad(J)
        average = current if average is None else 0.7 * average + 0.3 * current
        smoothed.backward(net.losses(data))
        trunk, heads = trained_gradients(net)
        assert_update(smoothed.weights, average, 1.0)
        assert_update(trunk, J.T @ average, J.abs().max() * NUM_TASKS)
        assert_update(heads, head_gradients(net, data, average), NUM_TASKS)
        sgd_step(net)
    assert float((average - current).abs().max()) > 1e-3  # the average is not the last step's


def gram_formulas_jacobian(net, data):
    losses = net.losses(data)
    rows = [
        torch.autograd.grad(loss, list(net.trunk.parameters()), retain_graph=True)
        for loss in losses
    ]
    return torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])


@pytest.mark.parametrize("beta_sigma", [0.0, 0.5])
def test_db_mtl_is_the_papers_balance_over_steps(beta_sigma):
    net = Net()
    db_mtl = fused_mtl.DBMTL(net.trunk.parameters(), NUM_TASKS, beta=0.9, beta_sigma=beta_sigma)
    log_jacobians = []
    for step in range(4):
        data = batch(step)
        losses = net.losses(data)
        rows = [
            torch.autograd.grad(
                torch.log(loss + 1e-8), list(net.trunk.parameters()), retain_graph=True
            )
            for loss in losses
        ]
        log_jacobians.append(torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows]))
        expected = formulas.db_mtl(log_jacobians, 0.9, beta_sigma)[-1]
        inverse = 1 / (losses.detach() + 1e-8)
        total = db_mtl.backward(losses)
        trunk, heads = trained_gradients(net)
        assert_update(trunk, expected, expected.abs().max())
        assert_update(db_mtl.weights, inverse, inverse.max())
        assert_update(heads, head_gradients(net, data, inverse), inverse.max())
        assert abs(float(total) - float(torch.log(losses.detach() + 1e-8).sum())) < 1e-12
        sgd_step(net)
    assert float(db_mtl.steps) == 4


STATEFUL = {
    "DBMTL": lambda net: fused_mtl.DBMTL(net.trunk.parameters(), NUM_TASKS),
    "CRMOGM": lambda net: fused_mtl.CRMOGM(net.trunk.parameters(), NUM_TASKS),
}


@pytest.mark.parametrize("method", list(STATEFUL))
def test_state_dict_round_trip_continues_bit_for_bit(method):
    from test_loss_and_stochastic_methods import train_steps

    net = Net()
    balancer = STATEFUL[method](net)
    train_steps(net, balancer, range(3))
    copy_net = copy.deepcopy(net)
    resumed = STATEFUL[method](copy_net)
    resumed.load_state_dict(balancer.state_dict())
    original = train_steps(net, balancer, range(3, 6))
    continued = train_steps(copy_net, resumed, range(3, 6))
    for (weights_a, params_a), (weights_b, params_b) in zip(original, continued, strict=True):
        assert torch.equal(weights_a, weights_b)
        assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))


def test_cr_mogm_refuses_an_infinite_checkpoint_and_changes_nothing():
    smoothed = fused_mtl.CRMOGM(nn.Linear(2, 2).parameters(), tasks=["a", "b", "c"])
    state = smoothed.state_dict()
    state["smoothed_weights"] = torch.tensor([0.5, math.inf, 0.5])
    with pytest.raises(RuntimeError, match="smoothed_weights of task 'b' is inf"):
        smoothed.load_state_dict(state)
    assert torch.isnan(smoothed.smoothed_weights).all()


# --- what they refuse ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "num_tasks", "options", "match"),
    [
        ("Krum", 2, {}, r"Krum: byzantine=0 needs at least 3 tasks .* got 2"),
        ("Krum", 4, {"byzantine": 2}, r"Krum: byzantine=2 needs at least 5 tasks"),
        ("Krum", 3, {"selected": 4}, r"Krum: selected=4 is more than the 3 tasks"),
        ("Krum", 3, {"selected": 0}, r"Krum: selected must be a whole number >= 1, got 0"),
        ("Krum", 3, {"byzantine": 1.0}, r"Krum: byzantine must be a whole number >= 0, got 1.0"),
        ("Krum", 3, {"byzantine": True}, r"Krum: byzantine must be a whole number >= 0, got True"),
        ("TrimmedMean", 2, {}, r"TrimmedMean: trim=1 drops 2 .* needs at least 3 tasks, got 2"),
        ("TrimmedMean", 3, {"trim": -1}, r"TrimmedMean: trim must be a whole number >= 0"),
        ("CRMOGM", 3, {"alpha": 1.5}, r"CRMOGM: alpha must be a number in \[0.0, 1.0\]"),
        ("CRMOGM", 3, {"method": "UPGrad"}, r"CRMOGM: method must be a Gram method's class"),
        ("CRMOGM", 3, {"method": fused_mtl.GradVac}, r"CRMOGM: GradVac keeps state .*targets"),
        ("CRMOGM", 3, {"method": fused_mtl.SDMGrad}, r"CRMOGM: SDMGrad cannot be smoothed"),
        ("DBMTL", 3, {"beta": 1.0}, r"DBMTL: beta must be a number in \[0.0, 1.0\)"),
        ("DBMTL", 3, {"beta_sigma": -1}, r"DBMTL: beta_sigma must be a number in \[0.0"),
    ],
)
def test_bad_hyper_parameters_are_refused_by_name(method, num_tasks, options, match):
    error = TypeError if options.get("method") == "UPGrad" else ValueError
    with pytest.raises(error, match=match):
        getattr(fused_mtl, method)(nn.Linear(2, 2).parameters(), num_tasks, **options)


def test_cr_mogm_passes_its_methods_options():
    smoothed = fused_mtl.CRMOGM(
        nn.Linear(2, 2).parameters(), 3, method_options={"normalization": "l2"}
    )
    assert smoothed.method.normalization == "l2"


@pytest.mark.parametrize("method", ["DBMTL", "TrimmedMean", "Krum"])
def test_methods_of_the_whole_gradients_refuse_fsdp2_sharded_parameters(method, monkeypatch):
    import fused_mtl.balancer

    monkeypatch.setattr(fused_mtl.balancer, "is_sharded", lambda tensor: True)
    with pytest.raises(NotImplementedError, match=f"{method}: FSDP2-sharded shared parameters"):
        getattr(fused_mtl, method)(nn.Linear(2, 2).parameters(), 3)


# --- edges the review found ---------------------------------------------------------------------


def test_cr_mogm_after_a_resume_reports_with_the_smoothed_weights():
    net = Net()
    smoothed = fused_mtl.CRMOGM(net.trunk.parameters(), NUM_TASKS, method=fused_mtl.UPGrad)
    for step in range(3):
        smoothed.backward(net.losses(batch(step)))
    resumed = fused_mtl.CRMOGM(net.trunk.parameters(), NUM_TASKS, method=fused_mtl.UPGrad)
    resumed.load_state_dict(smoothed.state_dict())
    assert torch.equal(resumed.weights, smoothed.weights)
    resumed.eval()
    smoothed.eval()
    losses = net.losses(batch(9))
    assert torch.equal(resumed(losses), smoothed(losses))


def test_cr_mogm_refuses_a_partly_missing_average_a_bad_alpha_and_its_own_options():
    smoothed = fused_mtl.CRMOGM(nn.Linear(2, 2).parameters(), 3)
    state = smoothed.state_dict()
    state["smoothed_weights"] = torch.tensor([0.5, math.nan, 0.5])
    with pytest.raises(RuntimeError, match="NaN for some tasks only"):
        smoothed.load_state_dict(state)
    with pytest.raises(ValueError, match=r"CRMOGM: alpha must be a number in \[0.0, 1.0\]"):
        smoothed.alpha = 2.0
    assert smoothed.alpha == 0.9
    with pytest.raises(ValueError, match="CRMOGM: method_options cannot set sync"):
        fused_mtl.CRMOGM(nn.Linear(2, 2).parameters(), 3, method_options={"sync": False})


def test_db_mtl_stays_finite_for_a_zero_half_loss_and_checks_when_asked():
    shared = nn.Parameter(torch.ones(2))
    db_mtl = fused_mtl.DBMTL([shared], 2)
    losses = [(shared.sum() * 0).half(), shared.square().sum().half()]
    total = db_mtl(losses)
    assert torch.isfinite(total)
    checked = fused_mtl.DBMTL([shared], tasks=["depth", "seg"], check_finite=True)
    with pytest.raises(ValueError, match="task 'seg'"):
        checked([shared.sum(), -shared.square().sum()])
    assert float(checked.steps) == 0


def test_db_mtl_reports_the_sum_of_log_losses_and_weights_in_float32_in_a_bfloat16_model():
    net = Net()
    db_mtl = fused_mtl.DBMTL(net.trunk.parameters(), NUM_TASKS)
    losses = net.losses(batch(0))
    total = db_mtl(losses)
    db_mtl.eval()
    assert float(db_mtl(losses)) == pytest.approx(float(total), rel=1e-12)
    model = Net().to(torch.bfloat16)
    bf16 = fused_mtl.DBMTL(model.trunk.parameters(), NUM_TASKS)
    inputs, targets = batch(0)
    errors = model.heads(model.trunk(inputs.bfloat16())).float() - targets.float()
    float_losses = errors.square().mean(dim=0)
    bf16(float_losses)
    assert bf16.weights.dtype == torch.float32
    torch.testing.assert_close(bf16.weights, 1 / (float_losses.detach() + 1e-8))
