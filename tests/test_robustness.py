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
