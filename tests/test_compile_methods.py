"""Every method with torch.compile: compiled forwards of the loss-level methods, a compiled model
with an eager balancer, and a compiled whole training step, each against eager.

Compiled with ``aot_eager``: dynamo's tracing and AOTAutograd's joint graph, what decides
whether a step is traced and differentiated correctly, without inductor's kernel generation
(minutes on 2 CPU cores; inductor's fused kernels add float32 reassociation, measured at
2.4e-7 on these steps)."""

import distributed_worker as worker
import pytest
import torch
from test_callable_contract import METHODS, make

STEPS = 4


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def train(method, compiled, steps=STEPS, backend="aot_eager"):
    """``steps`` training steps; ``compiled``: None, "model" (the trunk alone for MGDA-UB,
    whose features must be a graph boundary) or "step" (the whole step). Returns the totals,
    the final weights and the model's parameters."""
    net, balancer = make(method)
    optimizer = torch.optim.SGD([*net.parameters(), *balancer.parameters()], lr=0.05)
    inputs, targets = worker.global_batch(1)
    model = net
    if compiled == "model" and method == "mgda_ub":
        trunk = torch.compile(net.trunk, backend="aot_eager")

        def model(batch):
            features = trunk(batch)
            return features, net.heads(features)
    elif compiled == "model":
        model = torch.compile(net, backend="aot_eager")

    def step():
        optimizer.zero_grad()
        features, outputs = model(inputs)
        total = worker.balanced_total(balancer, method, features, outputs, targets)
        total.backward()
        optimizer.step()
        return total.detach()

    if compiled == "step":
        step = torch.compile(step, backend=backend)
    totals = torch.stack([step() for _ in range(steps)])
    return totals, balancer.weights.detach().clone(), [p.detach().clone() for p in net.parameters()]


def assert_same_training(got, expected):
    # aot_eager runs the same ATen kernels as eager: the steps agree to the last bit here, and
    # 1e-6 would still flag any difference of substance.
    (totals, weights, parameters), (eager_totals, eager_weights, eager_parameters) = got, expected
    torch.testing.assert_close(totals, eager_totals, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(weights, eager_weights, rtol=1e-6, atol=1e-7)
    for parameter, eager in zip(parameters, eager_parameters, strict=True):
        torch.testing.assert_close(parameter, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", METHODS)
def test_compiled_model_with_an_eager_balancer_equals_eager(method):
    assert_same_training(train(method, "model"), train(method, None))


@pytest.mark.parametrize("method", [m for m in METHODS if m != "mgda_ub"])
def test_compiled_whole_step_equals_eager(method):
    """Forward, the balancer's call (the gradient methods' per-task backward passes run
    between compiled graphs), backward and optimiser step, compiled as one function."""
    assert_same_training(train(method, "step"), train(method, None))


@pytest.mark.parametrize("method", ["gradnorm", "mgda"])
def test_compiled_whole_step_with_per_task_loop_equals_eager(method, monkeypatch):
    """The per-task loop (K backward passes) inside a compiled step, from a cold start: every
    task's gradient is found (no false 'gradient is zero'), the same as eager."""
    original = worker.make_balancer

    def looping(name, net, *args, **kwargs):
        return original(name, net, *args, per_task_gradients="loop", **kwargs)

    monkeypatch.setattr(worker, "make_balancer", looping)
    eager = train(method, None)
    torch._dynamo.reset()
    assert_same_training(train(method, "step"), eager)


def test_inductor_whole_step_of_a_gradient_method_is_eager_or_says_what_to_do():
    """Inductor may donate the compiled backward's buffers (it did here for this network, not
    in every environment), so that the per-task passes cannot walk it again: then the first call
    says so, naming torch.compile and the two patterns that work. Either way nothing runs wrong,
    and with donated buffers off the step trains as eager does."""
    expected = train("gradnorm", None)
    try:
        got = train("gradnorm", "step", backend="inductor")
    except RuntimeError as error:
        assert "torch.compile with donated buffers" in str(error)
        assert "donated_buffer = False" in str(error)
    else:
        assert_inductor_close(got, expected)
    torch._dynamo.reset()
    with torch._functorch.config.patch(donated_buffer=False):
        got = train("gradnorm", "step", backend="inductor")
    assert_inductor_close(got, expected)


def assert_inductor_close(got, expected):
    # Inductor's fused kernels reassociate float32 sums: 2.4e-7 measured.
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
    for parameter, eager in zip(got[2], expected[2], strict=True):
        torch.testing.assert_close(parameter, eager, rtol=1e-5, atol=1e-6)


def test_donated_buffer_refusal_becomes_what_to_do(monkeypatch):
    """The message torch gives when a compiled backward with donated buffers is walked again,
    turned into one that names torch.compile and the patterns that work."""
    refusal = (
        "This backward function was compiled with non-empty donated buffers which requires "
        "create_graph=False and retain_graph=False."
    )

    def refusing(*args, **kwargs):
        raise RuntimeError(refusal)

    net, balancer = make("gradnorm")
    inputs, targets = worker.global_batch(1)
    _, outputs = net(inputs)
    monkeypatch.setattr(torch.autograd, "grad", refusing)
    with pytest.raises(RuntimeError, match=r"torch.compile with donated buffers.*") as error:
        balancer(worker.task_losses(outputs, targets))
    assert "torch.compile(model)" in str(error.value)
    assert "torch._functorch.config.donated_buffer = False" in str(error.value)
    assert isinstance(error.value.__cause__, RuntimeError)


def test_mgda_ub_inside_one_compiled_graph_names_torch_compile():
    """z and the losses out of one compiled graph: autograd cannot take gradients at z. The
    first call says so and how to compile instead, rather than a bare 'does not reach'."""
    with pytest.raises(ValueError, match=r"one torch.compile graph.*torch.compile\(encoder\)"):
        train("mgda_ub", "step", steps=1)


@pytest.mark.parametrize("method", ["uw", "awl", "multi_noise", "equal", "dtp", "dwa"])
def test_loss_level_forward_compiles_to_one_graph(method):
    """fullgraph=True over several steps (DTP's KPIs reported between them; DWA's periods of
    2 steps closing three times, its weights changing at the last two): one graph, no
    recompilation, and the eager totals and weights."""
    counters = torch._dynamo.utils.counters
    counters.clear()
    _, eager = make(method)
    _, compiled = make(method)
    forward = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(3)
    for _ in range(7):
        losses = (torch.rand(worker.NUM_TASKS, generator=gen) + 0.5).requires_grad_()
        expected, got = eager(losses), forward(losses)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
        if method == "dtp":
            kpis = 1 / (1 + losses.detach())
            eager.update_kpis(kpis)
            compiled.update_kpis(kpis)
        torch.testing.assert_close(compiled.weights, eager.weights, rtol=1e-6, atol=1e-7)
    assert counters["stats"]["unique_graphs"] == 1
    if method == "dwa":
        assert compiled.periods_finished == 3 and compiled.steps_in_period == 1
        assert not torch.equal(compiled.weights, torch.ones(worker.NUM_TASKS))


def test_dwa_compiled_period_with_unusable_means_gives_nan_weights():
    """Inside a compiled region nothing is read on the host: a period whose mean loss is not
    positive cannot raise there, and its weights are NaN, so the total shows it; eager raises."""
    eager, compiled = (worker.make_balancer("dwa", worker.Net()) for _ in range(2))
    forward = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    good, bad = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, -2.0, 3.0])
    for losses in (good, good, good, good, bad, bad):
        forward(losses)
    # The weights of the next period are NaN, and so is its first total.
    assert torch.isnan(compiled.weights).all() and torch.isnan(forward(good))
    # A period with a negative mean as L(t-2): the rate it gives would make finite weights of
    # no meaning; they are NaN too, until that period leaves the two the rates use.
    early = worker.make_balancer("dwa", worker.Net())
    forward = torch.compile(early, fullgraph=True, backend="aot_eager")
    for losses in (bad, bad, good, good):
        forward(losses)
    assert torch.isnan(early.weights).all() and torch.isnan(forward(good))
    forward(good)
    assert torch.equal(early.weights, torch.ones(3)) and torch.isfinite(forward(good))
    for losses in (good, good, good, good, bad):
        eager(losses)
    with pytest.raises(ValueError, match=r"task 1: mean loss over period 2 is -2\.0"):
        eager(bad)


def largest_difference(got, expected) -> float:
    pairs = [(got[0], expected[0]), (got[1], expected[1]), *zip(got[2], expected[2], strict=True)]
    return max(float((a.float() - b.float()).abs().max()) for a, b in pairs)


def autocast_training(method, dtype, scaled, steps=STEPS):
    """``train(method, None)`` with autocast around the forward (and a GradScaler)."""
    net, balancer = make(method)
    optimizer = torch.optim.SGD([*net.parameters(), *balancer.parameters()], lr=0.05)
    scaler = torch.amp.GradScaler("cpu") if scaled else None
    inputs, targets = worker.global_batch(1)
    totals = []
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            features, outputs = net(inputs)
            total = worker.balanced_total(balancer, method, features, outputs, targets)
        if scaled:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            optimizer.step()
        totals.append(total.detach())
    return torch.stack(totals), balancer.weights.detach().clone(), list(net.parameters())


def main() -> None:
    """``python tests/test_compile_methods.py``: method x set-up, the largest difference from
    eager float32 training over 4 steps (totals, weights, parameters)."""
    import contextlib
    import io

    columns = [
        "bf16",
        "fp16 + GradScaler",
        "compiled forward",
        "compiled model",
        "compiled step",
        "compiled step (inductor)",
    ]
    print("| method | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for method in METHODS:
        torch._dynamo.reset()
        eager = train(method, None)
        cells = [
            largest_difference(autocast_training(method, torch.bfloat16, False), eager),
            largest_difference(autocast_training(method, torch.float16, True), eager),
        ]
        if method in ("gradnorm", "mgda", "mgda_ub"):
            cells.append("n/a (per-task gradients)")
        else:
            _, reference = make(method)
            _, compiled = make(method)
            forward = torch.compile(compiled, fullgraph=True, backend="aot_eager")
            gen = torch.Generator().manual_seed(3)
            worst = 0.0
            for _ in range(7):
                losses = torch.rand(worker.NUM_TASKS, generator=gen) + 0.5
                worst = max(worst, float((forward(losses) - reference(losses)).abs()))
                if method == "dtp":
                    compiled.update_kpis(1 / (1 + losses))
                    reference.update_kpis(1 / (1 + losses))
            cells.append(worst)
        cells.append(largest_difference(train(method, "model"), eager))
        if method == "mgda_ub":
            cells += ["clear error"] * 2
        else:
            with contextlib.redirect_stderr(io.StringIO()):
                cells.append(largest_difference(train(method, "step"), eager))
                torch._dynamo.reset()
                try:
                    inductor = train(method, "step", backend="inductor")
                    cells.append(largest_difference(inductor, eager))
                except RuntimeError:  # the donated-buffer error: measured with them off
                    torch._dynamo.reset()
                    with torch._functorch.config.patch(donated_buffer=False):
                        inductor = train(method, "step", backend="inductor")
                    difference = largest_difference(inductor, eager)
                    cells.append(f"clear error; {difference:.1e} with donated_buffer=False")
        text = [cell if isinstance(cell, str) else f"{cell:.1e}" for cell in cells]
        print(f"| {method} | " + " | ".join(text) + " |")


if __name__ == "__main__":
    main()


def test_mgda_ub_error_blames_torch_compile_only_when_z_is_inside_the_graph():
    """The encoder compiled alone, one task's loss independent of z: the error is about that
    task, not about torch.compile."""
    from fused_mtl import MGDA

    net, _ = make("equal")
    inputs, targets = worker.global_batch(1)
    features = torch.compile(net.trunk, backend="aot_eager")(inputs)
    losses = worker.task_losses(net.heads(features), targets)
    unrelated = (net.heads.weight**2).sum()
    with pytest.raises(ValueError, match="task 1: its") as error:
        MGDA(num_tasks=3)(torch.stack([losses[0], unrelated, losses[2]]), features=features)
    assert "torch.compile" not in str(error.value)


def test_a_compiled_step_with_dwa_compiles_nothing_more_at_each_period():
    """The benchmark's compiled DWA step (inductor, a period of 10 calls) breaks its graph at
    ``backward``; DWA's period then ends in eager code, whose state is new tensors at every
    period. Dynamo must not compile that code anew each time: 25 timed calls under
    ``fail_on_recompile`` cross two period ends."""
    from fused_mtl.app.benchmark_cases import compiled_step_case

    case = compiled_step_case("dwa", "compiled", 8, "cpu")
    with case.timing_guard():
        for _ in range(25):
            case.step()
