"""Findings of the adversarial audit: each test fails on the code before its fix."""

import pytest
import torch

from fused_mtl import DWA, UncertaintyWeighting

MANY = 65_536


def test_many_named_tasks_build_and_call_in_linear_time_with_short_errors():
    """65,536 task names: building a module and calling it with a dict used list look-ups
    (quadratic: 102 s and 84 s a call); a wrong count listed every name (a 513 KB message)."""
    names = [f"task{i}" for i in range(MANY)]
    uw = UncertaintyWeighting(tasks=names)
    losses = dict(zip(names, torch.rand(MANY).unbind(), strict=True))
    assert uw(losses).shape == ()
    with pytest.raises(ValueError) as error:
        uw(list(losses.values())[:-1])
    assert len(str(error.value)) < 300
    assert "'task0', 'task1'" in str(error.value) and "65528 more" in str(error.value)
    wrong = dict(losses)
    wrong["extra"] = wrong.pop("task5")
    with pytest.raises(
        ValueError, match=r"unknown task\(s\) \['extra'\].*missing task\(s\)"
    ) as error:
        uw(wrong)
    assert len(str(error.value)) < 400
    with pytest.raises(ValueError, match="duplicate task names") as error:
        DWA(tasks=names + names[:100])
    assert len(str(error.value)) < 300
    with pytest.raises(ValueError, match="num_tasks=3 but 65536 task names") as error:
        DWA(3, tasks=names)
    assert len(str(error.value)) < 300


def test_a_task_whose_gradient_is_zero_at_the_first_step_is_not_rejected():
    """theta ** 2 at theta = 0: the gradient is exactly zero there, but the loss depends on the
    shared parameter; reachability is read from the graph, not from the values."""
    from fused_mtl import MGDA, GradNorm

    for make in (
        lambda theta: GradNorm([theta], 2, per_task_gradients="loop"),
        lambda theta: MGDA([theta], 2),
    ):
        for stacked in (False, True):
            theta = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
            balancer = make(theta)
            losses = [theta[0] ** 2 + 1, (theta[1] - 3) ** 2]
            total = balancer(torch.stack(losses) if stacked else losses)
            total.backward()
            assert torch.isfinite(total)


@pytest.mark.parametrize("mode", ["auto", "loop", "batched"])
@pytest.mark.parametrize("stacked", [False, True], ids=["separate", "stacked"])
def test_a_task_loss_without_a_graph_is_named_on_every_call(mode, stacked):
    """A constant (or detached) task loss among graph losses: named on the first call and on
    later ones, whatever the mode (batched mode used to accept it silently, and MGDA gave it
    all the weight)."""
    from fused_mtl import MGDA

    trunk = torch.nn.Linear(3, 2)
    balancer = MGDA(trunk.parameters(), tasks=["a", "b"], per_task_gradients=mode)
    inputs = torch.randn(4, 3)

    def losses(constant_b):
        out = trunk(inputs)
        b = torch.tensor(0.5) if constant_b else out[:, 1].abs().mean()
        pair = [out[:, 0].square().mean(), b]
        return torch.stack(pair) if stacked else pair

    with pytest.raises(ValueError, match="MGDA: task 'b': its loss has no graph"):
        balancer(losses(True))
    balancer(losses(False)).backward()  # chooses the mode
    with pytest.raises(ValueError, match="MGDA: task 'b': its loss has no graph"):
        balancer(losses(True))
