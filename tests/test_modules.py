"""UncertaintyWeighting and the functional API: calling conventions, options, state, errors."""

import math
import warnings

import pytest
import torch
from formulas import TASK_TYPE_COEFFICIENTS, log_variance
from torch import nn

import fused_mtl
from fused_mtl import UncertaintyWeighting
from fused_mtl.functional import uncertainty_weighting

BACKENDS = ["triton", "torch"]
LOSSES = [1.5, 0.25, 3.0]
LOG_VARS = [0.3, -0.7, 1.2]


def expected_total(losses, log_vars, types=None):
    a, b = (None, None)
    if types is not None:
        a = torch.tensor([TASK_TYPE_COEFFICIENTS[t][0] for t in types], dtype=torch.float64)
        b = torch.tensor([TASK_TYPE_COEFFICIENTS[t][1] for t in types], dtype=torch.float64)
    return log_variance(
        torch.tensor(losses, dtype=torch.float64), torch.tensor(log_vars, dtype=torch.float64), a, b
    )


def scalars(values, device):
    return [torch.tensor(v, device=device) for v in values]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_calling_convention_gives_the_same_total(backend, device):
    uw = UncertaintyWeighting(
        tasks=["depth", "seg", "normal"], init_log_var=LOG_VARS, backend=backend
    )
    uw.to(device)
    l1, l2, l3 = scalars(LOSSES, device)
    expected = expected_total(LOSSES, LOG_VARS).total
    results = [
        uw(l1, l2, l3),
        uw([l1, l2, l3]),
        uw((l1, l2, l3)),
        uw(torch.stack([l1, l2, l3])),
        uw({"seg": l2, "normal": l3, "depth": l1}),  # dict order does not matter
    ]
    for result in results:
        assert result.shape == ()
        assert math.isclose(result.item(), expected.item(), rel_tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_losses_and_log_vars(backend, device):
    uw = UncertaintyWeighting(3, init_log_var=LOG_VARS, backend=backend).to(device)
    losses = [torch.tensor(v, device=device, requires_grad=True) for v in LOSSES]
    uw(*losses).backward()
    expected = expected_total(LOSSES, LOG_VARS)
    torch.testing.assert_close(
        uw.log_vars.grad.double().cpu(), expected.grad_params, rtol=1e-6, atol=0
    )
    got = torch.stack([loss.grad for loss in losses]).double().cpu()
    torch.testing.assert_close(got, expected.grad_losses, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_task_types_as_sequence_dict_or_single_string(backend, device):
    types = ["regression", "classification", "regression"]
    expected = expected_total(LOSSES, LOG_VARS, types).total.item()
    by_name = dict(zip(["a", "b", "c"], types, strict=True))
    for task_types in (types, by_name):
        uw = UncertaintyWeighting(
            tasks=["a", "b", "c"], task_types=task_types, init_log_var=LOG_VARS, backend=backend
        ).to(device)
        assert math.isclose(uw(*scalars(LOSSES, device)).item(), expected, rel_tol=1e-6)
    uw = UncertaintyWeighting(
        3, task_types="classification", init_log_var=LOG_VARS, backend=backend
    )
    expected_cls = expected_total(LOSSES, LOG_VARS, ["classification"] * 3).total.item()
    assert math.isclose(uw.to(device)(*scalars(LOSSES, device)).item(), expected_cls, rel_tol=1e-6)


def test_weights_and_sigmas():
    uw = UncertaintyWeighting(
        2, task_types=["regression", "classification"], init_log_var=[0.4, -1.0]
    )
    assert not uw.weights.requires_grad and not uw.sigmas.requires_grad
    expected_weights = torch.tensor([0.5 * math.exp(-0.4), 1.0 * math.exp(1.0)])
    torch.testing.assert_close(uw.weights, expected_weights)
    torch.testing.assert_close(uw.sigmas, torch.tensor([math.exp(0.2), math.exp(-0.5)]))


def test_parameter_name_shape_and_initial_value():
    uw = UncertaintyWeighting(4, init_log_var=-0.5)
    assert [name for name, _ in uw.named_parameters()] == ["log_vars"]
    assert torch.equal(uw.log_vars.detach(), torch.full((4,), -0.5))
    # Task-type coefficients are configuration; the extra state holds the task names.
    assert list(uw.state_dict()) == ["log_vars", "_extra_state"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_of_non_scalar_losses(reduction, backend, device):
    per_sample = [
        torch.tensor([1.0, 2.0, 6.0], device=device),
        torch.tensor([[0.5, 1.5]], device=device),
    ]
    reduce = {"mean": lambda v: sum(v) / len(v), "sum": sum}[reduction]
    reduced = [reduce([1.0, 2.0, 6.0]), reduce([0.5, 1.5])]
    uw = UncertaintyWeighting(2, init_log_var=[0.1, 0.2], reduction=reduction, backend=backend).to(
        device
    )
    expected = expected_total(reduced, [0.1, 0.2]).total.item()
    assert math.isclose(uw(*per_sample).item(), expected, rel_tol=1e-6)
    stacked = torch.tensor([[1.0, 2.0, 6.0], [0.5, 1.5, 0.0]], device=device)
    reduced_stacked = [reduce([1.0, 2.0, 6.0]), reduce([0.5, 1.5, 0.0])]
    expected_stacked = expected_total(reduced_stacked, [0.1, 0.2]).total.item()
    assert math.isclose(uw(stacked).item(), expected_stacked, rel_tol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_task(backend, device):
    uw = UncertaintyWeighting(1, init_log_var=0.5, backend=backend).to(device)
    expected = 2.0 * math.exp(-0.5) + 0.5
    for call in (
        lambda: uw(torch.tensor(2.0, device=device)),
        lambda: uw([torch.tensor(2.0, device=device)]),
    ):
        assert math.isclose(call().item(), expected, rel_tol=1e-6)


def test_state_dict_round_trip():
    source = UncertaintyWeighting(tasks=["a", "b"])
    with torch.no_grad():
        source.log_vars.copy_(torch.tensor([0.25, -1.5]))
    target = UncertaintyWeighting(tasks=["a", "b"])
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.log_vars, source.log_vars)
    losses = [torch.tensor(1.0), torch.tensor(2.0)]
    assert torch.equal(target(*losses), source(*losses))


def test_double_precision_module_runs_in_double():
    uw = UncertaintyWeighting(2, task_types=["regression", "classification"]).double()
    total = uw(torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    assert total.dtype == torch.float64
    assert total.item() == 0.5 * 1.0 + 1.0 * 2.0  # exact at s = 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional(backend, device):
    losses = torch.tensor(LOSSES, device=device)
    s = torch.tensor(LOG_VARS, device=device)
    types = ["classification", "regression", "classification"]
    for task_types in (None, types):
        expected = expected_total(LOSSES, LOG_VARS, task_types).total.item()
        got = uncertainty_weighting(losses, s, task_types, backend=backend)
        assert math.isclose(got.item(), expected, rel_tol=1e-6)


def test_public_surface():
    assert set(fused_mtl.__all__) >= {
        "Balancer",
        "DTP",
        "DWA",
        "EqualWeighting",
        "GradNorm",
        "MGDA",
        "UncertaintyWeighting",
        "functional",
        "compat",
        "synthetic",
    }
    assert fused_mtl.functional.__all__ == ["task_grad_norms", "task_gram", "uncertainty_weighting"]
    for balancer in (
        fused_mtl.UncertaintyWeighting,
        fused_mtl.GradNorm,
        fused_mtl.DWA,
        fused_mtl.DTP,
        fused_mtl.MGDA,
        fused_mtl.EqualWeighting,
    ):
        assert issubclass(balancer, fused_mtl.Balancer)


# --- bad input: each error names the task and the fault -------------------------------------


def named_module(**kwargs):
    return UncertaintyWeighting(tasks=["depth", "seg"], **kwargs)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda uw: uw(torch.tensor(1.0)),
            ValueError,
            r"expected 2 \['depth', 'seg'\] task losses, got 1",
        ),
        (lambda uw: uw(*[torch.tensor(1.0)] * 3), ValueError, "got 3"),
        (lambda uw: uw(), ValueError, "got 0"),
        (lambda uw: uw({"depth": torch.tensor(1.0)}), ValueError, r"missing task\(s\) \['seg'\]"),
        (
            lambda uw: uw(
                {"depth": torch.tensor(1.0), "seg": torch.tensor(1.0), "edges": torch.tensor(1.0)}
            ),
            ValueError,
            r"unknown task\(s\) \['edges'\]",
        ),
        (
            lambda uw: uw(torch.tensor(1.0), torch.ones(8, 1)),
            ValueError,
            r"task 'seg': loss has shape \(8, 1\); pass reduction=",
        ),
        (
            lambda uw: uw(torch.tensor(1.0), torch.tensor(2)),
            TypeError,
            "task 'seg': loss must be a floating-point tensor, got torch.int64",
        ),
        (
            lambda uw: uw(torch.tensor(1.0), 2.0),
            TypeError,
            "task 'seg': loss must be a tensor, got float",
        ),
        (lambda uw: uw(torch.tensor(1.0), torch.ones(0)), ValueError, "task 'seg': loss is empty"),
        (lambda uw: uw(torch.ones(3)), ValueError, r"got one tensor of shape \(3,\)"),
        (lambda uw: uw(torch.ones(2, 4)), ValueError, r"shape \(2, 4\).*pass reduction="),
        (lambda uw: uw(torch.ones(2, dtype=torch.int32)), TypeError, "floating-point"),
    ],
)
def test_bad_losses(call, error, message):
    with pytest.raises(error, match=message):
        call(named_module())


def test_dict_call_needs_task_names():
    with pytest.raises(ValueError, match=r"construct with tasks=\[\.\.\.\]"):
        UncertaintyWeighting(2)({"a": torch.tensor(1.0), "b": torch.tensor(1.0)})


def test_unnamed_tasks_are_named_by_index():
    with pytest.raises(ValueError, match=r"task 1: loss has shape \(4,\)"):
        UncertaintyWeighting(2)(torch.tensor(1.0), torch.ones(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device: CUDA")
def test_loss_on_another_device():
    with pytest.raises(
        ValueError, match="task 'seg': loss is on cuda:0 but the module's parameters are on cpu"
    ):
        named_module()(torch.tensor(1.0), torch.tensor(1.0, device="cuda"))


def test_loss_on_another_device_meta():
    # The meta device stands in for a second device on machines without a GPU.
    with pytest.raises(
        ValueError, match="task 'seg': loss is on meta but the module's parameters are on cpu"
    ):
        named_module()(torch.tensor(1.0), torch.tensor(1.0, device="meta"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_names_the_task(backend):
    uw = named_module(check_finite=True, backend=backend)
    assert math.isfinite(uw(torch.tensor(1.0), torch.tensor(2.0)).item())
    with pytest.raises(FloatingPointError, match="task 'seg' = nan"):
        uw(torch.tensor(1.0), torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="task 'depth' = inf, task 'seg' = -inf"):
        uw(torch.tensor(float("inf")), torch.tensor(float("-inf")))


def test_without_check_finite_a_nan_propagates():
    # Nothing is hidden: a NaN loss gives a NaN total, exactly like the formula.
    assert math.isnan(named_module()(torch.tensor(1.0), torch.tensor(float("nan"))).item())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({}, ValueError, "give the number of tasks"),
        ({"num_tasks": 0}, ValueError, "num_tasks must be a positive integer"),
        ({"num_tasks": 2.0}, ValueError, "num_tasks must be a positive integer"),
        ({"tasks": ["a", "a", "b"]}, ValueError, r"duplicate task names: \['a'\]"),
        ({"tasks": []}, ValueError, "tasks is empty"),
        ({"tasks": "ab"}, TypeError, "tasks must be a sequence of task names"),
        ({"num_tasks": 3, "tasks": ["a", "b"]}, ValueError, "num_tasks=3 but 2 task names"),
        (
            {"num_tasks": 2, "task_types": ["regression"]},
            ValueError,
            "task_types has 1 entries for 2 tasks",
        ),
        (
            {"tasks": ["a", "b"], "task_types": ["regression", "ranking"]},
            ValueError,
            "task 'b': unknown task type 'ranking'",
        ),
        (
            {"tasks": ["a", "b"], "task_types": {"a": "regression"}},
            ValueError,
            r"task_types: missing task\(s\) \['b'\]",
        ),
        (
            {"num_tasks": 2, "task_types": {"a": "regression"}},
            ValueError,
            "task_types given as a dict need task names",
        ),
        (
            {"num_tasks": 2, "init_log_var": [0.0, 1.0, 2.0]},
            ValueError,
            "init_log_var must be one number or 2 numbers",
        ),
        (
            {"num_tasks": 2, "reduction": "max"},
            ValueError,
            "reduction must be None, 'mean' or 'sum'",
        ),
        ({"num_tasks": 2, "backend": "cuda"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        UncertaintyWeighting(**kwargs)


@pytest.mark.parametrize(
    ("losses", "log_vars", "message"),
    [
        (torch.ones(3), torch.zeros(2), r"shape \(K,\), got \(3,\) and \(2,\)"),
        (torch.ones(2, 1), torch.zeros(2), r"shape \(K,\)"),
        (torch.ones(0), torch.zeros(0), "at least one task"),
        (
            torch.ones(2, dtype=torch.int64),
            torch.zeros(2),
            "losses must be a floating-point tensor",
        ),
        (
            torch.ones(2),
            torch.zeros(2, device="meta"),
            "losses are on cpu but the per-task parameters on meta",
        ),
    ],
)
def test_functional_bad_input(losses, log_vars, message):
    with pytest.raises((ValueError, TypeError), match=message):
        uncertainty_weighting(losses, log_vars)


def ran_triton(total):
    """Whether a total came from the Triton path (its autograd node) or the torch reference."""
    return type(total.grad_fn).__name__ == "_UncertaintyFunctionBackward"


def test_backend_environment_override(monkeypatch):
    losses = (torch.tensor(1.0), torch.tensor(2.0))
    assert not ran_triton(UncertaintyWeighting(2)(*losses))  # auto on CPU: torch
    monkeypatch.setenv("FUSED_MTL_BACKEND", "triton")
    assert ran_triton(UncertaintyWeighting(2)(*losses))
    assert not ran_triton(UncertaintyWeighting(2, backend="torch")(*losses))  # explicit wins
    built_before = UncertaintyWeighting(2)  # the override is read at construction
    assert ran_triton(uncertainty_weighting(torch.ones(2, requires_grad=True), torch.zeros(2)))
    monkeypatch.setenv("FUSED_MTL_BACKEND", "torch")
    assert not ran_triton(UncertaintyWeighting(2)(*losses))
    assert ran_triton(built_before(*losses))
    assert not ran_triton(uncertainty_weighting(torch.ones(2, requires_grad=True), torch.zeros(2)))
    assert ran_triton(UncertaintyWeighting(2, backend="triton")(*losses))
    monkeypatch.setenv("FUSED_MTL_BACKEND", "fast")
    with pytest.raises(ValueError, match="FUSED_MTL_BACKEND must be one of"):
        UncertaintyWeighting(2)(*losses)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(
        RuntimeError, match="backend='triton' on CPU tensors runs only in the Triton interpreter"
    ):
        UncertaintyWeighting(2, backend="triton")(torch.tensor(1.0), torch.tensor(2.0))


def test_triton_rejects_float64():
    with pytest.raises(
        TypeError,
        match=r"backend='triton' supports float32, float16 and bfloat16, got torch\.float64",
    ):
        UncertaintyWeighting(2, backend="triton").double()(
            torch.tensor(1.0).double(), torch.tensor(2.0).double()
        )


def test_auto_uses_triton_only_on_cuda(device):
    uw = UncertaintyWeighting(2).to(device)
    total = uw(torch.tensor(1.0, device=device), torch.tensor(2.0, device=device))
    assert ran_triton(total) == (device.type == "cuda")


@pytest.mark.parametrize(
    "method", ["UncertaintyWeighting", "IMTLL", "AutomaticWeightedLoss", "GradNorm"]
)
def test_learned_weights_missing_from_the_optimizer_are_named_once(method):
    """Weights that receive gradients but never change (the balancer's parameters left out of
    the optimizer) are reported once, with the fix; given to the optimizer, with gradients
    accumulated over 4 micro-batches per step, nothing is said."""
    import fused_mtl.compat

    for included in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        if method == "GradNorm":
            balancer = fused_mtl.GradNorm(model[0].parameters(), 2)
        else:
            balancer = getattr(fused_mtl, method, None) or getattr(fused_mtl.compat, method)
            balancer = balancer(2)
        learned = [*balancer.parameters()] if included else []
        optimizer = torch.optim.Adam([*model.parameters(), *learned], lr=1e-2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for call in range(4 * 60):
                losses = (model(torch.randn(8, 3)) - 1).square().mean(0)
                balancer(*losses).backward()
                if call % 4 == 3:
                    optimizer.step()
                    optimizer.zero_grad()
        messages = [str(warning.message) for warning in caught]
        if included:
            assert messages == [], messages
            assert not torch.equal(balancer.weights, torch.ones(2))
        else:
            assert len(messages) == 1, messages
            assert messages[0].startswith(f"{type(balancer).__name__}: ")
            assert "balancer.parameters()" in messages[0]


@pytest.mark.parametrize("method", ["FAMO", "UncertaintyWeighting", "DWA", "GeometricMean"])
def test_a_loss_method_given_shared_parameters_says_it_takes_none(method):
    trunk = nn.Linear(2, 2)
    for shared in (trunk.parameters(), list(trunk.parameters()), trunk):
        with pytest.raises(TypeError, match=f"^{method} takes no shared parameters"):
            getattr(fused_mtl, method)(shared, tasks=["a", "b"])


def test_gradnorm_weights_read_as_a_tensor():
    gradnorm = fused_mtl.GradNorm(nn.Linear(2, 2).parameters(), 2)
    assert repr(gradnorm.weights) == "tensor([1., 1.])"
    assert not gradnorm.weights.requires_grad and gradnorm.learned_weights.requires_grad
    assert [name for name, _ in gradnorm.named_parameters()] == ["weights"]  # checkpoints


# --- reasonable inputs: any iterable of losses, numpy integers ---------------------------------


def iterable_methods():
    trunk = nn.Linear(3, 2)
    return {
        "UncertaintyWeighting": lambda: UncertaintyWeighting(tasks=["depth", "seg"]),
        "MultiNoiseLoss": lambda: fused_mtl.compat.MultiNoiseLoss(2),
        "DWA": lambda: fused_mtl.DWA(tasks=["depth", "seg"]),
        "GeometricMean": lambda: fused_mtl.GeometricMean(tasks=["depth", "seg"]),
        "MGDA": lambda: fused_mtl.MGDA(trunk.parameters(), tasks=["depth", "seg"]),
    }, trunk


@pytest.mark.parametrize("method", list(iterable_methods()[0]))
def test_losses_from_a_dicts_values_or_a_generator(method):
    """``balancer(d.values())`` and a generator take the losses in order, as a list does."""
    factories, trunk = iterable_methods()
    torch.manual_seed(0)
    inputs = torch.randn(4, 3)
    totals = {}
    for form in ("list", "values", "generator"):
        torch.manual_seed(1)
        balancer = factories[method]()
        out = trunk(inputs)
        losses = {"depth": out[:, 0].square().mean(), "seg": out[:, 1].exp().mean()}
        given = {
            "list": list(losses.values()),
            "values": losses.values(),
            "generator": (loss for loss in losses.values()),
        }[form]
        totals[form] = balancer(given).detach()
    assert torch.equal(totals["values"], totals["list"])
    assert torch.equal(totals["generator"], totals["list"])


def test_losses_in_a_set_are_refused_for_their_order():
    with pytest.raises(TypeError, match="set, which has no order: pass them in task order"):
        named_module()({torch.tensor(1.0), torch.tensor(2.0)})


@pytest.mark.parametrize(
    ("shape", "fix"), [((8, 3), r"losses\.T \(shape \(3, 8\)\)"), ((8, 5, 3), r"losses\.movedim")]
)
def test_a_batch_by_task_tensor_is_told_the_task_axis_comes_first(shape, fix):
    uw = UncertaintyWeighting(3, reduction="mean")
    with pytest.raises(ValueError, match=f"task axis comes first; pass {fix}"):
        uw(torch.rand(shape))
    # The fix it gives works, and is the mean over the batch of each task's column.
    losses = torch.rand(8, 3)
    torch.testing.assert_close(uw(losses.T), uw(losses.mean(dim=0)), rtol=0, atol=0)


def test_numpy_integers_are_integer_arguments():
    np = pytest.importorskip("numpy")  # installed with torch's CPU wheels and with triton
    uw = UncertaintyWeighting(np.int64(3))
    assert uw.num_tasks == 3 and type(uw.num_tasks) is int
    assert uw(torch.tensor([1.0, 2.0, 3.0])).shape == ()
    assert UncertaintyWeighting(np.int32(2), tasks=["a", "b"]).num_tasks == 2
    assert fused_mtl.DWA(np.uint8(2), period_steps=np.int64(5)).period_steps == 5
    trunk = nn.Linear(3, 2)
    assert fused_mtl.MGDA(trunk.parameters(), 2, solver_iterations=np.int16(7)).solver_iterations
    assert fused_mtl.SDMGrad(trunk.parameters(), np.int64(2), iterations=np.int64(4)).iterations
    assert fused_mtl.STCH(2, mu=np.int64(2)).mu == 2.0
    assert fused_mtl.DWA(2, temperature=np.int64(2)).temperature == 2.0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (3.0, r"num_tasks must be a positive integer, got the float 3\.0; pass int\(3\.0\)"),
        (2.5, "num_tasks must be a positive integer, got float 2.5"),
        (True, "num_tasks must be a positive integer, got the bool True"),
        ("3", "num_tasks must be a positive integer, got str '3'"),
    ],
)
def test_task_counts_that_are_not_integers_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        UncertaintyWeighting(value)
