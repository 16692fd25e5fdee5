"""MGDA: the min-norm solver against an exact solver and the optimality conditions, and the
module against the method written out in float64."""

import copy

import pytest
import torch
from formulas import min_norm_exact
from torch import nn

from fused_mtl import MGDA
from fused_mtl.reference import ENUMERATION_MAX_TASKS, min_norm_weights

TASKS = ["depth", "seg", "normals"]


def sample_gram(kind, num_tasks, seed, dtype=torch.float64):
    """Gram matrices of random task gradients (12 coordinates) of several kinds."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(num_tasks, 12, generator=gen, dtype=torch.float64)
    if kind == "rank2":
        grads = torch.randn(num_tasks, 2, generator=gen, dtype=torch.float64) @ grads[:2]
    elif kind == "rank1":
        grads = torch.randn(num_tasks, 1, generator=gen, dtype=torch.float64) @ grads[:1]
    elif kind == "scaled":  # norms spread over six decades
        grads = grads * torch.logspace(-3, 3, num_tasks, dtype=torch.float64)[:, None]
    elif kind == "duplicate":
        grads[-1] = grads[0]
    gram = grads @ grads.T
    return gram.to(dtype)


KINDS = ["random", "rank2", "rank1", "scaled", "duplicate"]

# Objective and optimality are measured relative to the largest squared norm, the scale of the
# problem. float64: the solvers are exact up to rounding (the interior-point path
# and its polish: see reference.min_norm_weights), so 1e-10 leaves room for the conditioning of
# the face systems and is far below any wrong answer (a vertex or the uniform point is off by
# 1e-2 or more on these samples). float32 Gram matrices, as MGDA computes them: 1e-5.
OBJECTIVE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def assert_min_norm(alpha, gram, what):
    """alpha is on the simplex, as good as the exact optimum, and satisfies the optimality
    conditions: no task's slope (M alpha)_i is below alpha^T M alpha (the Frank-Wolfe gap)."""
    rtol = OBJECTIVE_RTOL[gram.dtype]
    gram64, alpha64 = gram.double().cpu(), alpha.double().cpu()
    scale = float(gram64.diagonal().max())
    assert bool((alpha64 >= 0).all()), f"{what}: negative weight {alpha64}"
    assert abs(float(alpha64.sum()) - 1) <= 1e-6, f"{what}: weights sum to {alpha64.sum()}"
    optimum, _ = min_norm_exact(gram64)
    objective = float(alpha64 @ gram64 @ alpha64)
    assert objective - float(optimum) <= rtol * scale, f"{what}: {objective} vs {optimum}"
    gap = objective - float((gram64 @ alpha64).min())
    assert gap <= rtol * scale, f"{what}: optimality gap {gap:.3e}"


@pytest.mark.parametrize("num_tasks", [3, 5, 10])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_solver_finds_the_min_norm_point(device, num_tasks, kind, dtype):
    for seed in range(3):
        gram = sample_gram(kind, num_tasks, seed, dtype).to(device)
        alpha = min_norm_weights(gram)
        assert alpha.dtype == dtype and alpha.device == gram.device
        assert_min_norm(alpha, gram, f"{kind} K={num_tasks} seed={seed}")


@pytest.mark.parametrize("kind", KINDS)
def test_the_interior_point_path_finds_the_min_norm_point(device, kind, monkeypatch):
    # Force the path used beyond ENUMERATION_MAX_TASKS on problems the exact solver can check.
    monkeypatch.setattr("fused_mtl.reference.ENUMERATION_MAX_TASKS", 2)
    for num_tasks in (3, 6, 10):
        gram = sample_gram(kind, num_tasks, seed=7).to(device)
        assert_min_norm(min_norm_weights(gram), gram, f"{kind} K={num_tasks}")


def test_the_interior_point_path_runs_above_the_enumeration_limit(device):
    num_tasks = ENUMERATION_MAX_TASKS + 6
    gram = sample_gram("rank2", num_tasks, seed=3).to(device)
    alpha = min_norm_weights(gram).double().cpu()
    gram = gram.double().cpu()
    # Too many faces for the exact solver: check the optimality conditions alone.
    gap = float(alpha @ gram @ alpha - (gram @ alpha).min())
    assert (alpha >= 0).all() and abs(float(alpha.sum()) - 1) < 1e-12
    assert gap <= 1e-10 * float(gram.diagonal().max())


def test_two_tasks_use_the_closed_form_exactly(device):
    for seed in range(5):
        gram = sample_gram("random", 2, seed).to(device)
        (m11, m12), (_, m22) = gram.tolist()
        first = min(max((m22 - m12) / (m11 + m22 - 2 * m12), 0.0), 1.0)
        alpha = min_norm_weights(gram)
        assert alpha.tolist() == pytest.approx([first, 1 - first], rel=1e-15, abs=1e-15)
        assert_min_norm(alpha, gram, f"K=2 seed={seed}")
    # One gradient is a multiple of the other, shorter one: all weight goes to the shorter one.
    g = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64, device=device)
    assert min_norm_weights(g @ g.T).tolist() == [1.0, 0.0]
    # Equal gradients: every alpha is optimal; the solver returns one half each.
    same = torch.ones(2, 2, dtype=torch.float64, device=device)
    assert min_norm_weights(same).tolist() == [0.5, 0.5]
    assert min_norm_weights(torch.eye(1, device=device)).tolist() == [1.0]


class TwoLayerNet(nn.Module):
    """A shared layer, then one linear head per task; losses of different kinds."""

    def __init__(self, bias=True):
        super().__init__()
        self.shared = nn.Linear(6, 5, bias=bias)
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in TASKS)

    def features(self, inputs):
        return self.shared(inputs)

    def losses(self, features, targets):
        outputs = [head(torch.tanh(features)).squeeze(1) for head in self.heads]
        return [
            (outputs[0] - targets[0]).square().mean(),
            (outputs[1] - targets[1]).abs().mean() + 0.1,
            torch.nn.functional.softplus(outputs[2] * targets[2]).mean(),
        ]


def make_problem(device, seed=0, bias=True, inputs=None):
    torch.manual_seed(seed)
    net = TwoLayerNet(bias).to(device)
    gen = torch.Generator().manual_seed(seed + 100)
    if inputs is None:
        inputs = torch.randn(8, 6, generator=gen)
    targets = [torch.randn(inputs.shape[0], generator=gen).to(device) for _ in TASKS]
    return net, inputs.to(device), targets


def expected_step(net, inputs, targets, normalization):
    """MGDA in float64 from the definition: per-task gradients of the shared layer, their
    normalised Gram, the exact min-norm alpha, and the gradients of sum_i alpha_i L_i."""
    net = copy.deepcopy(net).double().cpu()
    losses = net.losses(net.features(inputs.double().cpu()), [t.double().cpu() for t in targets])
    shared = list(net.shared.parameters())
    grads = torch.stack(
        [
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            for loss in losses
        ]
    )
    values = torch.stack(losses).detach()
    norms = grads.norm(dim=1)
    scales = {
        "none": torch.ones_like(values),
        "l2": norms,
        "loss": values,
        "loss+": values * norms,
    }[normalization]
    unit = grads / scales[:, None]
    _, alpha = min_norm_exact(unit @ unit.T)
    total = sum(a * loss for a, loss in zip(alpha, losses, strict=True))
    total.backward()
    return alpha, {name: p.grad for name, p in net.named_parameters()}


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_step_matches_the_method_in_float64(device, normalization, backend):
    net, inputs, targets = make_problem(device)
    alpha, grads = expected_step(net, inputs, targets, normalization)
    mgda = MGDA(net.shared.parameters(), tasks=TASKS, normalization=normalization, backend=backend)
    losses = net.losses(net.features(inputs), targets)
    total = mgda.backward(dict(zip(TASKS, losses, strict=True)))
    # float32 network and Gram: the weights agree to float32 precision of the problem.
    assert torch.allclose(mgda.weights.double().cpu(), alpha, atol=1e-4), (mgda.weights, alpha)
    for name, param in net.named_parameters():
        assert torch.allclose(param.grad.double().cpu(), grads[name], rtol=1e-4, atol=1e-5), name
    want = sum(a * loss.detach() for a, loss in zip(mgda.weights, losses, strict=True))
    assert torch.allclose(total, want) and not total.requires_grad


def test_the_normalisations_give_different_weights(device):
    net, inputs, targets = make_problem(device)
    weights = {}
    for normalization in ("none", "l2", "loss", "loss+"):
        mgda = MGDA(net.shared.parameters(), 3, normalization=normalization)
        mgda.backward(net.losses(net.features(inputs), targets))
        weights[normalization] = mgda.weights
    values = list(weights.values())
    assert all(
        not torch.allclose(a, b, atol=1e-3) for i, a in enumerate(values) for b in values[i + 1 :]
    )


def test_mgda_ub_equals_mgda_when_the_representation_determines_the_gradient(device):
    # z = x W^T with the rows of x orthonormal: the gradient of W is dz^T x, so
    # <g_W^i, g_W^k> = tr(dz_i^T x x^T dz_k) = <dz_i, dz_k>: the same Gram, the same alpha.
    basis, _ = torch.linalg.qr(torch.randn(6, 4, generator=torch.Generator().manual_seed(5)))
    net, inputs, targets = make_problem(device, bias=False, inputs=basis.T)
    by_parameters = MGDA(net.shared.parameters(), 3, normalization="l2")
    by_parameters.backward(net.losses(net.features(inputs), targets))
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    net.zero_grad()
    upper_bound = MGDA(num_tasks=3, normalization="l2")
    features = net.features(inputs)
    upper_bound.backward(net.losses(features, targets), features=features)
    assert torch.allclose(upper_bound.gram, by_parameters.gram, rtol=1e-5, atol=1e-6)
    assert torch.allclose(upper_bound.weights, by_parameters.weights, atol=1e-5)
    for name, param in net.named_parameters():
        assert torch.allclose(param.grad, grads[name], rtol=1e-4, atol=1e-6), name
    # With inputs whose rows are not orthonormal the two Gram matrices differ: the test can fail.
    net, inputs, targets = make_problem(device, bias=False, inputs=3 * basis.T + 1)
    by_parameters = MGDA(net.shared.parameters(), 3, normalization="l2")
    by_parameters.backward(net.losses(net.features(inputs), targets))
    features = net.features(inputs)
    upper_bound.backward(net.losses(features, targets), features=features)
    assert not torch.allclose(upper_bound.gram, by_parameters.gram, rtol=1e-2)


def test_mgda_ub_crosses_the_shared_layer_once(device):
    net, inputs, targets = make_problem(device)
    crossings = []
    net.shared.weight.register_hook(lambda grad: crossings.append(grad.shape))
    mgda = MGDA(tasks=TASKS)
    features = net.features(inputs)
    mgda.backward(net.losses(features, targets), features=features)
    # The per-task passes stop at the representation; only the weighted total reaches the layer.
    assert len(crossings) == 1
    # And what reaches it is the gradient of sum_i alpha_i L_i, nothing more.
    check, _, _ = make_problem(device)
    losses = check.losses(check.features(inputs), targets)
    sum(a * loss for a, loss in zip(mgda.weights, losses, strict=True)).backward()
    for (name, param), expected in zip(net.named_parameters(), check.parameters(), strict=True):
        assert torch.allclose(param.grad, expected.grad, rtol=1e-5, atol=1e-7), name
    # Gradients of the parameters cross it in every per-task pass as well: 3 + 1 batched (the
    # first call compares both modes) + 1 for the total.
    crossings.clear()
    by_parameters = MGDA(net.shared.parameters(), tasks=TASKS)
    by_parameters.backward(net.losses(net.features(inputs), targets))
    assert len(crossings) == 5


def test_one_task_gets_all_the_weight(device):
    net, inputs, targets = make_problem(device)
    mgda = MGDA(net.shared.parameters(), 1, normalization="loss+")
    loss = net.losses(net.features(inputs), targets)[0]
    total = mgda.backward(loss)
    assert mgda.weights.tolist() == [1.0] and total.item() == loss.item()


def test_mgda_rejects_bad_input(device):
    net, inputs, targets = make_problem(device)
    with pytest.raises(ValueError, match="normalization must be one of"):
        MGDA(net.shared.parameters(), 3, normalization="max")
    with pytest.raises(ValueError, match="solver_iterations must be a positive integer"):
        MGDA(net.shared.parameters(), 3, solver_iterations=0)
    mgda = MGDA(net.shared.parameters(), tasks=TASKS, normalization="loss")
    losses = net.losses(net.features(inputs), targets)
    with pytest.raises(ValueError, match=r"task 'seg': loss is -1.0; normalization='loss'"):
        mgda.backward([losses[0], losses[1] * 0 - 1, losses[2]])
    with pytest.raises(ValueError, match="no shared parameters were given"):
        MGDA(num_tasks=3).backward(losses)
    features = net.features(inputs)
    with pytest.raises(ValueError, match="features does not require grad"):
        MGDA(num_tasks=3).backward(losses, features=features.detach())
    with pytest.raises(ValueError, match="task 'seg': its loss does not reach the shared"):
        MGDA(net.heads[0].parameters(), tasks=TASKS).backward(losses)
    with pytest.raises(ValueError, match="no task loss requires grad"):
        mgda.backward([loss.detach() for loss in losses])


class TiedHeadNet(nn.Module):
    """A trunk of two layers and linear heads, one of which also reads the trunk's first
    layer's weight: a head that reaches a shared parameter on its own."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 5)
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in TASKS)

    def losses(self, inputs, targets, tied):
        features = self.second(torch.tanh(self.first(inputs)))
        losses = [
            (head(features).squeeze(1) - target).square().mean()
            for head, target in zip(self.heads, targets, strict=True)
        ]
        if tied:
            losses[0] = losses[0] + 0.1 * self.first.weight.square().sum()
        return losses


def float64_step(net, inputs, targets, shared_names, tied):
    """MGDA ("none") from the definition in float64: per-task gradients of the named shared
    parameters, the exact alpha, then every parameter's gradient of sum_i alpha_i L_i."""
    net = copy.deepcopy(net).double()
    losses = net.losses(inputs.double(), [t.double() for t in targets], tied)
    shared = [p for name, p in net.named_parameters() if name in shared_names]
    grads = torch.stack(
        [
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            for loss in losses
        ]
    )
    _, alpha = min_norm_exact(grads @ grads.T)
    sum(a * loss for a, loss in zip(alpha, losses, strict=True)).backward()
    return {name: p.grad for name, p in net.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shared_names", [("second.weight", "second.bias"), "trunk"])
def test_backward_is_the_definitions_step_for_trunks_and_heads_of_every_shape(tied, shared_names):
    """Per-head losses (the two-stage batched backward): the step is the definition's with a
    part of the trunk outside the shared parameters and with a head that reads a shared weight
    itself; the parameters' hooks run once per step and a gradient already there is added to."""
    torch.manual_seed(3)
    net = TiedHeadNet()
    if shared_names == "trunk":
        shared_names = ("first.weight", "first.bias", "second.weight", "second.bias")
    gen = torch.Generator().manual_seed(4)
    inputs = torch.randn(16, 6, generator=gen)
    targets = [torch.randn(16, generator=gen) for _ in TASKS]
    expected = float64_step(net, inputs, targets, shared_names, tied)
    shared = [p for name, p in net.named_parameters() if name in shared_names]
    hook_calls = []
    shared[0].register_post_accumulate_grad_hook(lambda p: hook_calls.append(p.grad.clone()))
    mgda = MGDA(shared, tasks=TASKS)
    for _ in range(2):  # the first call also chooses the gradient mode
        net.zero_grad()
        mgda.backward(net.losses(inputs, targets, tied))
    assert len(hook_calls) == 2
    for name, parameter in net.named_parameters():
        got = parameter.grad.double()
        assert torch.allclose(got, expected[name], rtol=1e-5, atol=1e-6), name
    previous = {name: p.grad.clone() for name, p in net.named_parameters()}
    mgda.backward(net.losses(inputs, targets, tied))  # without zero_grad: accumulates
    for name, parameter in net.named_parameters():
        assert torch.allclose(parameter.grad, 2 * previous[name], rtol=1e-5, atol=1e-6), name


def test_frontiers_are_where_each_head_enters_the_trunk():
    """Per-head losses: each task's frontier is the one edge into the trunk's output; a head
    that reaches a shared parameter itself has none (its share would be counted twice)."""
    from fused_mtl.ops.task_gradients import task_frontiers, task_root_edges

    net = TiedHeadNet()
    inputs, targets = torch.randn(4, 6), [torch.randn(4) for _ in TASKS]
    shared = list(net.first.parameters()) + list(net.second.parameters())
    losses = net.losses(inputs, targets, tied=False)
    frontiers = task_frontiers(task_root_edges(torch.stack(losses), None), shared)
    assert frontiers is not None
    nodes = {(id(edge.node), edge.output_nr) for frontier in frontiers for edge in frontier}
    assert len(nodes) == 1 and all(len(frontier) == 1 for frontier in frontiers)
    assert type(frontiers[0][0].node).__name__ == "AddmmBackward0"  # net.second's output
    tied = net.losses(inputs, targets, tied=True)
    assert task_frontiers(task_root_edges(torch.stack(tied), tied), shared) is None
    # A shared parameter that only one task's own part reaches.
    with_head = [*shared, net.heads[0].weight]
    assert task_frontiers(task_root_edges(torch.stack(losses), losses), with_head) is None


class ReusedLayerNet(nn.Module):
    """A trunk whose second linear layer runs twice (a weight shared across depth), then heads."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.ModuleDict({"first": nn.Linear(6, 5), "second": nn.Linear(5, 5)})
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in TASKS)

    def losses(self, inputs, targets):
        hidden = torch.tanh(self.trunk["first"](inputs))
        features = self.trunk["second"](torch.tanh(self.trunk["second"](hidden)))
        return [
            (head(features).squeeze(1) - target).square().mean()
            for head, target in zip(self.heads, targets, strict=True)
        ]


@pytest.mark.parametrize("per_task_gradients", ["auto", "loop"])
@pytest.mark.parametrize("stacked", [False, True])
def test_gram_by_layer_is_the_gram_of_the_per_task_gradients(per_task_gradients, stacked):
    """The Gram built layer by layer from the layers' inputs and output gradients is the Gram
    of the per-task parameter gradients (float64, from torch.autograd.grad), with a layer
    called twice, after a forward pass whose losses are not the ones given (ignored), and the
    update that follows is the definition's."""
    torch.manual_seed(5)
    net = ReusedLayerNet().double()
    gen = torch.Generator().manual_seed(6)
    inputs = torch.randn(12, 6, generator=gen, dtype=torch.float64)
    targets = [torch.randn(12, generator=gen, dtype=torch.float64) for _ in TASKS]
    mgda = MGDA(net.trunk, tasks=TASKS, gram_by_layer=True, per_task_gradients=per_task_gradients)
    shared = list(net.trunk.parameters())
    for _ in range(2):
        net.losses(inputs * 2, targets)  # another forward pass, with grad: not these losses
        losses = net.losses(inputs, targets)
        grads = torch.stack(
            [
                torch.cat(
                    [g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)]
                )
                for loss in losses
            ]
        )
        net.zero_grad()
        mgda.backward(torch.stack(losses) if stacked else losses)
        assert torch.allclose(mgda.gram, grads @ grads.T, rtol=1e-12, atol=1e-14)
    _, alpha = min_norm_exact(grads @ grads.T)
    assert torch.allclose(mgda.weights, alpha, atol=1e-9)
    want = torch.autograd.grad(
        sum(a * loss for a, loss in zip(alpha, net.losses(inputs, targets), strict=True)),
        list(net.parameters()),
    )
    for got, expected in zip([p.grad for p in net.parameters()], want, strict=True):
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_gram_by_layer_forms_no_per_task_gradient_of_a_wide_layer():
    """Peak memory of the call: below K x (one layer's weight), whatever the depth (at batch 8
    the rows' products are cheaper than a 256 x 256 layer's per-task gradients), against K x
    (every shared parameter) for the per-task gradients of all layers at once."""
    from fused_mtl.app.benchmark_cases import live_bytes_peak

    num_tasks, width = 4, 256
    trunk = nn.Sequential(*[nn.Linear(width, width) for _ in range(8)])
    heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(num_tasks))
    inputs = torch.randn(8, width)

    def losses():
        features = trunk(inputs)
        return [head(features).square().mean() for head in heads]

    by_layer = MGDA(trunk, num_tasks, gram_by_layer=True)
    whole = MGDA(trunk.parameters(), num_tasks)
    peaks = {}
    for name, mgda in (("by_layer", by_layer), ("whole", whole)):
        mgda(losses())  # the first call also checks the Gram against per-task backward passes
        peaks[name] = live_bytes_peak(lambda m=mgda: m(losses()), "cpu")
    assert by_layer.gradient_mode == "layers" and whole.gradient_mode == "batched"
    all_layers = num_tasks * sum(p.numel() for p in trunk.parameters()) * 4
    one_layer = num_tasks * width * width * 4
    assert peaks["whole"] >= all_layers
    assert peaks["by_layer"] < one_layer / 2, peaks


def test_gram_by_layer_needs_a_module():
    with pytest.raises(TypeError, match="needs the shared layers as a module"):
        MGDA(nn.Linear(3, 3).parameters(), 2, gram_by_layer=True)
    with pytest.raises(TypeError, match="needs the shared layers as a module"):
        MGDA(nn.Linear(3, 3).parameters(), 2, per_task_gradients="layers")
    with pytest.raises(ValueError, match="per_task_gradients must be one of"):
        MGDA(nn.Linear(3, 3), 2, per_task_gradients="layer")


def test_a_head_that_reads_two_trunk_tensors_one_below_the_other_keeps_exact_gradients():
    """A head reading ``h + h1`` with ``h`` computed from ``h1`` (a skip connection): the
    gradient at ``h1`` already holds the path through ``h``, so the two-stage backward is not
    used, and the per-task gradients are the definition's."""
    from fused_mtl.ops.task_gradients import task_frontiers, task_root_edges

    torch.manual_seed(7)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in TASKS)
    inputs = torch.randn(10, 4)

    def losses():
        h1 = torch.tanh(first(inputs))
        h = second(h1)
        return [head(h + h1).square().mean() for head in heads]

    shared = list(first.parameters())
    separate = losses()
    assert task_frontiers(task_root_edges(torch.stack(separate), separate), shared) is None
    mgda = MGDA(shared, tasks=TASKS, per_task_gradients="batched")
    for _ in range(2):
        separate = losses()
        grads = torch.stack(
            [
                torch.cat(
                    [g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)]
                )
                for loss in separate
            ]
        )
        mgda(separate)
        assert torch.allclose(mgda.gram, (grads @ grads.T).double(), rtol=1e-5, atol=1e-7)


def test_gram_by_layer_takes_an_in_place_activation_and_keeps_the_model_picklable():
    """An in-place ReLU after a layer changes its output, not the input that its rule uses:
    the Gram is still the per-task gradients'. An input changed in place after the layer ran
    is refused, naming the fix. The layers' hooks hold nothing a pickle or a deep copy of the
    model cannot carry."""
    import pickle

    torch.manual_seed(8)
    trunk = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)).double()
    heads = nn.ModuleList(nn.Linear(3, 1) for _ in TASKS).double()
    inputs = torch.randn(6, 4, dtype=torch.float64)
    mgda = MGDA(trunk, tasks=TASKS, gram_by_layer=True)
    losses = [head(trunk(inputs)).mean() for head in heads]
    shared = list(trunk.parameters())
    grads = torch.stack(
        [
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            for loss in losses
        ]
    )
    mgda(losses)
    torch.testing.assert_close(mgda.gram, grads @ grads.T, rtol=1e-12, atol=1e-14)

    changed = inputs.clone()
    features = trunk[2](trunk[0](changed))
    changed.mul_(2)  # the first layer's recorded input, after it ran
    # The layers' message, or autograd's where the second call's passes differentiate it.
    in_place = r"its input was changed in place .* inplace=False|modified by an inplace operation"
    with pytest.raises(RuntimeError, match=in_place):
        mgda([head(features).mean() for head in heads])
    copied = pickle.loads(pickle.dumps(trunk))
    assert torch.equal(copied(inputs), trunk(inputs))
    copy.deepcopy(trunk)(inputs)


class EncoderNet(nn.Module):
    """A transformer encoder layer as the trunk, its mean over the sequence the shared
    representation z, and one linear head per task."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in TASKS)

    def forward(self, inputs):
        features = self.encoder(self.embed(inputs)).mean(1)
        return features, torch.cat([head(features) for head in self.heads], 1)


def test_mgda_ub_model_deep_copies_and_pickles_after_a_step_and_the_copy_trains_alike():
    """An EMA model taken with copy.deepcopy after an MGDA-UB step: the balancer held that
    step's features (a non-leaf tensor, which deepcopy refuses); the copy's next step is the
    original's."""
    import io

    torch.manual_seed(3)
    net = EncoderNet()
    whole = nn.ModuleDict({"net": net, "mgda": MGDA(tasks=TASKS)})
    inputs, targets = torch.randn(4, 5, 3), torch.randn(4, len(TASKS))

    def step(model, inputs):
        model.zero_grad()
        features, outputs = model["net"](inputs)
        losses = (outputs - targets).square().mean(0)
        model["mgda"].backward(losses, features=features)
        return model["mgda"].weights.clone(), [p.grad.clone() for p in model.parameters()]

    step(whole, inputs)
    ema = copy.deepcopy(whole)
    buffer = io.BytesIO()
    torch.save(whole, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    weights, grads = step(whole, inputs * 0.5)
    for model in (ema, loaded):
        got_weights, got_grads = step(model, inputs * 0.5)
        assert torch.equal(got_weights, weights)
        for got, expected in zip(got_grads, grads, strict=True):
            assert torch.equal(got, expected)


def test_gram_by_layer_model_deep_copies_and_pickles_after_a_step_and_between_calls():
    """gram_by_layer=True: its layers' outputs (the inputs of the per-task gradients) and the
    recorded calls of a forward pass not yet balanced are non-leaf tensors; a deep copy or a
    pickle of the model leaves them behind, and the original's next call still uses its
    own."""
    import io

    torch.manual_seed(5)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
    heads = nn.ModuleList(nn.Linear(5, 1) for _ in TASKS)
    mgda = MGDA(trunk, tasks=TASKS, gram_by_layer=True)
    whole = nn.ModuleDict({"trunk": trunk, "heads": heads, "mgda": mgda})
    inputs = torch.randn(6, 4)

    def losses():
        features = trunk(inputs)
        return [head(features).square().mean() for head in heads]

    mgda.backward(losses())
    pending = losses()  # a forward pass whose recorded calls wait for the next call
    copied = copy.deepcopy(whole)
    torch.save(whole, io.BytesIO())
    assert copied["mgda"]._layer_gram.engine._hooks  # the copy's own, on the copied layers
    reference = MGDA(trunk, tasks=TASKS, gram_by_layer=True)
    reference_losses = losses()
    mgda.backward(pending)
    reference.backward(reference_losses)
    torch.testing.assert_close(mgda.weights, reference.weights)
