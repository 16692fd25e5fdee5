"""EqualWeighting, DWA and DTP against their formulas (tests/formulas.py) over scripted runs."""

import math

import pytest
import torch
from formulas import dtp_history, dwa_history

from fused_mtl import DTP, DWA, EqualWeighting
from fused_mtl.methods.dtp import KPI_FLOOR

TASKS = ["depth", "seg", "normals"]

# The state is float32: a period mean sums at most 4 float32 losses and the weights go through a
# float32 softmax or log, a few roundings of 6e-8 each. 1e-6 is above that and far below the
# differences between the formulas' variants (e.g. 0.05 between rates and inverse rates below).
RTOL = 1e-6

# depth falls, seg stalls (the same loss every step), normals rises in the third period.
DWA_STEPS = [
    [4.0, 2.0, 1.0],
    [3.0, 2.0, 1.2],
    "end",
    [2.0, 2.0, 0.8],
    [2.5, 2.0, 0.9],
    [1.5, 2.0, 1.0],
    "end",
    [1.0, 2.0, 1.5],
    [0.5, 2.0, 2.5],
    "end",
    [0.4, 2.0, 2.0],
    [0.3, 2.0, 2.2],
    [0.2, 2.0, 2.4],
    [0.25, 2.0, 2.1],
    "end",
    [0.2, 2.0, 2.0],
]


def assert_weights(got, expected, what):
    expected = torch.tensor(expected, dtype=torch.float64)
    error = (got.double().cpu() - expected).abs()
    assert bool((error <= RTOL * expected.abs().clamp_min(1)).all()), f"{what}: {got} vs {expected}"


def run_dwa(dwa, steps, device):
    """Feed a scripted history; return (weights after each entry, total of each step)."""
    weights, totals = [], []
    for step in steps:
        if step == "end":
            dwa.end_epoch()
        else:
            totals.append(dwa(torch.tensor(step, device=device)))
        weights.append(dwa.weights.clone())
    return weights, totals


def test_equal_weighting_is_the_sum_in_every_calling_convention(device):
    equal = EqualWeighting(tasks=TASKS).to(device)
    values = [torch.tensor(v, device=device, requires_grad=True) for v in (0.5, 2.0, 3.25)]
    as_dict = dict(zip(TASKS, values, strict=True))
    for total in (equal(*values), equal(values), equal(torch.stack(values)), equal(as_dict)):
        assert total.item() == 5.75
    total = equal.backward(values)
    assert total.item() == 5.75 and not total.requires_grad
    assert [v.grad.item() for v in values] == [1.0, 1.0, 1.0]
    assert equal.weights.tolist() == [1.0, 1.0, 1.0]
    # Nothing but the task names, which a checkpoint carries to check them on load.
    assert equal.state_dict() == {"_extra_state": {"tasks": TASKS}}


def test_half_precision_losses_give_a_float32_total(device):
    equal = EqualWeighting(2).to(device)
    losses = torch.tensor([60000.0, 60000.0], dtype=torch.float16, device=device)
    total = equal(losses)
    # 120000 overflows float16 (max 65504): the total is summed in float32.
    assert total.dtype == torch.float32 and total.item() == 120000.0


def test_dwa_follows_the_formula_over_a_scripted_history(device):
    dwa = DWA(tasks=TASKS, temperature=2.0).to(device)
    expected = dwa_history(DWA_STEPS, 2.0, 3)
    weights, totals = run_dwa(dwa, DWA_STEPS, device)
    for index, (got, want) in enumerate(zip(weights, expected, strict=True)):
        assert_weights(got, want, f"entry {index}")
    # The first two periods (entries 0..5) keep weight 1; from the second "end" on, the third
    # period's weights favour the stalled task seg over depth, whose loss fell.
    assert all(w == [1.0, 1.0, 1.0] for w in expected[:6])
    assert expected[6][1] > expected[6][0]
    # Each step's total uses the weights in force before the step.
    losses = [s for s in DWA_STEPS if s != "end"]
    in_force = [expected[i - 1] if i else [1.0] * 3 for i, s in enumerate(DWA_STEPS) if s != "end"]
    for total, step, w in zip(totals, losses, in_force, strict=True):
        want = sum(wi * li for wi, li in zip(w, step, strict=True))
        assert abs(total.item() - want) <= RTOL * sum(
            abs(wi * li) for wi, li in zip(w, step, strict=True)
        )


def test_dwa_temperature_enters_the_softmax(device):
    hot = dwa_history(DWA_STEPS, 50.0, 3)[-1]
    cold = dwa_history(DWA_STEPS, 0.5, 3)[-1]
    for temperature, want in ((50.0, hot), (0.5, cold)):
        dwa = DWA(3, temperature=temperature).to(device)
        weights, _ = run_dwa(dwa, DWA_STEPS, device)
        assert_weights(weights[-1], want, f"T={temperature}")
    assert max(hot) - min(hot) < 0.1 < max(cold) - min(cold)


def test_dwa_period_steps_ends_periods_by_itself(device):
    steps = [[4.0, 2.0], [3.0, 2.0], [2.0, 2.0], [1.0, 2.0], [0.5, 2.0], [0.4, 1.0]]
    scripted = []
    for index, step in enumerate(steps):
        scripted.append(step)
        if index % 2 == 1:
            scripted.append("end")
    expected = [
        w for s, w in zip(scripted, dwa_history(scripted, 2.0, 2), strict=True) if s == "end"
    ]
    dwa = DWA(2, period_steps=2).to(device)
    for index, step in enumerate(steps):
        dwa(torch.tensor(step, device=device))
        if index % 2 == 1:
            assert_weights(dwa.weights, expected[index // 2], f"after step {index}")
            assert dwa.steps_in_period == 0


def test_dwa_resumes_bit_identically_from_a_state_dict_mid_period(device):
    whole = DWA(tasks=TASKS).to(device)
    expected, _ = run_dwa(whole, DWA_STEPS, device)
    cut = 9  # inside the third period, after two finished ones
    first = DWA(tasks=TASKS).to(device)
    run_dwa(first, DWA_STEPS[:cut], device)
    state = first.state_dict()
    resumed = DWA(tasks=TASKS).to(device)
    resumed.load_state_dict(state)
    assert resumed.steps_in_period == 2 and resumed.periods_finished == 2
    rest, _ = run_dwa(resumed, DWA_STEPS[cut:], device)
    for got, want in zip(rest, expected[cut:], strict=True):
        assert torch.equal(got, want)


def test_dwa_does_not_count_eval_mode_calls(device):
    dwa = DWA(2).to(device)
    dwa(torch.tensor([1.0, 1.0], device=device))
    dwa.eval()
    dwa(torch.tensor([100.0, 100.0], device=device))
    dwa.train()
    assert dwa.steps_in_period == 1
    assert dwa.period_loss_sums.tolist() == [1.0, 1.0]


def test_dwa_backward_gives_the_losses_their_weights(device):
    dwa = DWA(2).to(device)
    for step in ([2.0, 1.0], "end", [1.0, 1.0], "end"):
        dwa.end_epoch() if step == "end" else dwa(torch.tensor(step, device=device))
    losses = torch.tensor([3.0, 5.0], device=device, requires_grad=True)
    dwa.backward(losses)
    assert torch.equal(losses.grad, dwa.weights)
    assert not torch.equal(dwa.weights, torch.ones_like(dwa.weights))


def test_dwa_rejects_bad_input(device):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        DWA(2, temperature=0.0)
    with pytest.raises(ValueError, match="period_steps must be a positive integer"):
        DWA(2, period_steps=0)
    dwa = DWA(tasks=["a", "b"]).to(device)
    with pytest.raises(RuntimeError, match="no finite training losses since the last period"):
        dwa.end_epoch()
    dwa(torch.tensor([1.0, -0.5], device=device))
    with pytest.raises(ValueError, match=r"task 'b': mean loss over period 0 is -0.5"):
        dwa.end_epoch()
    with pytest.raises(ValueError, match=r"missing task\(s\) \['b'\]"):
        dwa({"a": torch.tensor(1.0, device=device)})


# KPIs: seg stalls at 0.5, normals starts at 0 (the floor) and reaches 1 (weight 0).
KPI_REPORTS = [
    [0.2, 0.5, 0.0],
    [0.4, 0.5, 0.3],
    [0.7, 0.5, 1.0],
    [0.9, 0.5, 1.0],
]


@pytest.mark.parametrize("gamma", [[0.0, 1.0, 2.0], [2.0, 2.0, 2.0]])
def test_dtp_follows_the_formula_over_scripted_kpis(device, gamma):
    dtp = DTP(tasks=TASKS, gamma=gamma if gamma[0] != gamma[1] else 2.0, decay=0.8).to(device)
    assert dtp.weights.tolist() == [1.0, 1.0, 1.0]
    expected = dtp_history(KPI_REPORTS, gamma, 0.8, 1e-6)
    for index, (report, want) in enumerate(zip(KPI_REPORTS, expected, strict=True)):
        dtp.update_kpis(dict(zip(TASKS, report, strict=True)))
        assert_weights(dtp.weights, want, f"report {index}")
    # The first report: normals at KPI 0 gets the floor's weight, -log(1e-6) = 13.8.
    assert 13.8 < expected[0][2] <= -math.log(KPI_FLOOR)
    losses = torch.tensor([1.0, 2.0, 4.0], device=device, requires_grad=True)
    dtp.backward(losses)
    assert torch.equal(losses.grad, dtp.weights)


def test_dtp_accepts_kpis_in_every_convention(device):
    values = [0.25, 0.5, 0.75]
    results = []
    for report in (
        values,
        tuple(values),
        torch.tensor(values, device=device),
        [torch.tensor(v, device=device) for v in values],
        dict(zip(TASKS, values, strict=True)),
    ):
        dtp = DTP(tasks=TASKS).to(device)
        dtp.update_kpis(report)
        results.append(dtp.weights)
    dtp = DTP(tasks=TASKS).to(device)
    dtp.update_kpis(*values)
    results.append(dtp.weights)
    assert all(torch.equal(r, results[0]) for r in results)


def test_dtp_resumes_bit_identically_from_a_state_dict(device):
    whole = DTP(tasks=TASKS, gamma=[0.5, 1.0, 2.0]).to(device)
    expected = []
    for report in KPI_REPORTS:
        whole.update_kpis(report)
        expected.append(whole.weights.clone())
    first = DTP(tasks=TASKS, gamma=[0.5, 1.0, 2.0]).to(device)
    for report in KPI_REPORTS[:2]:
        first.update_kpis(report)
    resumed = DTP(tasks=TASKS, gamma=[0.5, 1.0, 2.0]).to(device)
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(resumed.weights, expected[1])
    for report, want in zip(KPI_REPORTS[2:], expected[2:], strict=True):
        resumed.update_kpis(report)
        assert torch.equal(resumed.weights, want)


def test_dtp_rejects_bad_input(device):
    dtp = DTP(tasks=TASKS).to(device)
    with pytest.raises(ValueError, match=r"task 'seg': KPI is 1.5; DTP needs .* in \[0, 1\]"):
        dtp.update_kpis([0.5, 1.5, 0.5])
    with pytest.raises(ValueError, match=r"task 'depth': KPI is nan"):
        dtp.update_kpis([math.nan, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"task 'normals': KPI is -0.1"):
        dtp.update_kpis(torch.tensor([0.5, 0.5, -0.1], device=device))
    with pytest.raises(ValueError, match="KPI: expected 3 values, got 2"):
        dtp.update_kpis([0.5, 0.5])
    with pytest.raises(TypeError, match="KPI: expected one number per task"):
        dtp.update_kpis(0.5)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['pose'\]"):
        dtp.update_kpis({"depth": 0.5, "seg": 0.5, "normals": 0.5, "pose": 0.5})
    assert dtp.kpi_updates == 0 and dtp.weights.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"task 'seg': gamma is -1.0"):
        DTP(tasks=TASKS, gamma={"depth": 1.0, "seg": -1.0, "normals": 0.0})
    with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\)"):
        DTP(2, decay=1.0)


@pytest.mark.parametrize("num_tasks", [1, 65536])
def test_one_task_and_many_tasks(device, num_tasks):
    gen = torch.Generator().manual_seed(0)
    history = torch.rand(4, num_tasks, generator=gen, dtype=torch.float64) + 0.5
    dwa = DWA(num_tasks).to(device)
    for losses in history:
        dwa(losses.float().to(device))
        dwa.end_epoch()
    last, before = history[-1], history[-2]
    rates = last / before
    expected = num_tasks * torch.softmax(rates / 2.0, dim=0)  # float64, from the formula
    error = (dwa.weights.double().cpu() - expected).abs().max()
    assert error <= 1e-5 * float(expected.max()), error
    kpis = torch.rand(num_tasks, generator=gen, dtype=torch.float64)
    dtp = DTP(num_tasks, gamma=2.0).to(device)
    dtp.update_kpis(kpis.float().to(device))
    k = kpis.float().double()
    expected = -((1 - k) ** 2) * torch.log(k)
    assert torch.allclose(dtp.weights.double().cpu(), expected, rtol=1e-5, atol=1e-7)
    total = EqualWeighting(num_tasks).to(device)(history[0].to(device))
    assert abs(total.item() - float(history[0].sum())) <= 1e-12 * num_tasks


def test_dwa_handles_losses_of_extreme_scale(device):
    dwa = DWA(3).to(device)
    for losses in ([1e30, 1e-30, 1.0], [2e30, 1e-30, 1.0], [1e30, 4e-30, 0.5]):
        dwa(torch.tensor(losses, device=device))
        dwa.end_epoch()
    # Rates 0.5, 4 and 0.5: only the ratios enter the weights.
    expected = torch.softmax(torch.tensor([0.5, 4.0, 0.5], dtype=torch.float64) / 2, dim=0) * 3
    assert torch.allclose(dwa.weights.double().cpu(), expected, rtol=1e-6)
    dwa(torch.tensor([6e4, 1.0, 1.0], dtype=torch.float16, device=device))
    dwa(torch.tensor([6e4, 1.0, 1.0], dtype=torch.float16, device=device))
    # Summed in float32: 1.2e5 does not overflow float16's 65504.
    assert dwa.period_loss_sums.tolist()[0] == 120000.0


def test_dwa_rejected_period_end_changes_nothing(device):
    """A call that would end a period with an unusable mean raises and leaves the state as it
    was: the next call ends the period with its own losses instead."""
    dwa = DWA(2, period_steps=2).to(device)
    dwa(torch.tensor([1.0, 2.0], device=device))
    before = {
        key: value.clone() for key, value in dwa.state_dict().items() if key != "_extra_state"
    }
    with pytest.raises(ValueError, match=r"task 1: mean loss over period 0 is -1\.0"):
        dwa(torch.tensor([1.0, -4.0], device=device))
    for key, value in before.items():
        torch.testing.assert_close(dwa.state_dict()[key], value, rtol=0, atol=0, equal_nan=True)
    assert dwa.steps_in_period == 1 and dwa.periods_finished == 0
    dwa(torch.tensor([3.0, 4.0], device=device))
    assert dwa.periods_finished == 1
    assert torch.equal(dwa.period_means[0].cpu(), torch.tensor([2.0, 3.0]))


def test_dwa_pickled_whole_with_integer_counters_loads(tmp_path):
    """A DWA saved with torch.save(module) when its counters were Python integers (and before
    balancers could sync) loads, and continues as the same module would."""
    import io

    dwa, reference = DWA(2, period_steps=3), DWA(2, period_steps=3)
    for losses in ([2.0, 1.0], [1.0, 1.0], [1.5, 0.5], [1.0, 2.0]):
        dwa(torch.tensor(losses))
        reference(torch.tensor(losses))
    # The state of a DWA pickled before the counters moved to the device.
    del dwa._buffers["step_count"], dwa._buffers["period_count"], dwa._buffers["nonfinite_calls"]
    del dwa.__dict__["_host_steps"], dwa.__dict__["_sync"]
    dwa.__dict__.update(steps_in_period=1, periods_finished=1)
    buffer = io.BytesIO()
    torch.save(dwa, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.steps_in_period == 1 and loaded.periods_finished == 1
    for losses in ([1.0, 2.0], [0.5, 1.0], [2.0, 2.0], [1.0, 1.0]):
        assert torch.equal(loaded(torch.tensor(losses)), reference(torch.tensor(losses)))
    assert torch.equal(loaded.weights, reference.weights)


@pytest.mark.parametrize("period_steps", [1, 2, 3])
def test_dwa_every_call_of_a_period_uses_that_periods_weights(period_steps):
    """The call that ends a period is one of its calls: its total uses the period's weights,
    and the next period's weights apply from the next call (as with end_epoch() between
    epochs). DWA(2, period_steps=1) on [2, 1] then [1, 2] gives 3 at the second call."""
    gen = torch.Generator().manual_seed(period_steps)
    steps = [(torch.rand(2, generator=gen) + 0.5).tolist() for _ in range(6 * period_steps)]
    scripted, in_force = [], []
    for index, step in enumerate(steps):
        scripted.append(step)
        if (index + 1) % period_steps == 0:
            scripted.append("end")
    history = dwa_history(scripted, 2.0, 2)
    weights = [1.0, 1.0]
    for entry, after in zip(scripted, history, strict=True):
        if entry == "end":
            weights = after
        else:
            in_force.append(weights)
    dwa = DWA(2, period_steps=period_steps)
    for step, expected in zip(steps, in_force, strict=True):
        total = dwa(torch.tensor(step))
        value = sum(w * loss for w, loss in zip(expected, step, strict=True))
        assert abs(float(total) - value) <= 1e-6 * value, (step, expected)
    assert float(DWA(2, period_steps=1)(torch.tensor([2.0, 1.0]))) == 3.0
    first = DWA(2, period_steps=1)
    first(torch.tensor([2.0, 1.0]))
    assert float(first(torch.tensor([1.0, 2.0]))) == 3.0
