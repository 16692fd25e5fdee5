"""GPU-only properties of the Triton path: no host synchronisation, CUDA-graph capture.

Run with ``FUSED_MTL_TEST_DEVICE=cuda``; on a machine without CUDA these tests are skipped.
"""

import contextlib
import copy

import pytest
import torch
from formulas import log_variance

from fused_mtl import DTP, DWA, MGDA, EqualWeighting, GradNorm, UncertaintyWeighting
from fused_mtl.functional import task_grad_norms, task_gram
from fused_mtl.synthetic import MultiTaskMLP

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextlib.contextmanager
def host_synchronisation_is_an_error():
    """Any host synchronisation inside the block raises (after pending work has finished)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("num_tasks", [2, 4096])
def test_no_host_synchronisation(num_tasks):
    uw = UncertaintyWeighting(num_tasks, backend="triton").cuda()
    losses = torch.rand(num_tasks, device="cuda", requires_grad=True)
    uw(losses).backward()  # compile the kernels outside the checked region
    with host_synchronisation_is_an_error():
        uw(losses).backward()


def test_cuda_graph_replay_matches_eager():
    num_tasks = 8
    uw = UncertaintyWeighting(num_tasks, init_log_var=0.3, backend="triton").cuda()
    losses = torch.rand(num_tasks, device="cuda", requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: kernels compiled, autograd state settled
            losses.grad = uw.log_vars.grad = None
            uw(losses).backward()
    torch.cuda.current_stream().wait_stream(side)
    losses.grad = uw.log_vars.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = uw(losses)
        total.backward()
    for seed in range(3):
        new_losses = torch.rand(num_tasks, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            losses.copy_(new_losses)
        graph.replay()
        torch.cuda.synchronize()
        expected = log_variance(
            new_losses.double(), torch.full((num_tasks,), 0.3, dtype=torch.float64).float().double()
        )
        torch.testing.assert_close(total.double().cpu(), expected.total, rtol=2e-6, atol=0)
        torch.testing.assert_close(
            uw.log_vars.grad.double().cpu(), expected.grad_params, rtol=2e-6, atol=2e-6
        )
        torch.testing.assert_close(
            losses.grad.double().cpu(), expected.grad_losses, rtol=2e-6, atol=0
        )


def test_training_step_with_uncertainty_weighting_replays_like_eager():
    """A whole training step (network, UncertaintyWeighting, backward, Adam) captured in one CUDA
    graph and replayed on new batches follows the eager step's trajectory."""
    num_tasks = 3
    torch.manual_seed(0)
    graphed = MultiTaskMLP(num_tasks, input_dim=16, output_dim=4, hidden=32).cuda()
    graphed_uw = UncertaintyWeighting(num_tasks, init_log_var=0.5, backend="triton").cuda()
    eager, eager_uw = copy.deepcopy(graphed), copy.deepcopy(graphed_uw)

    def adam(model, uw):
        # capturable=True keeps Adam's step count on the device, as graph capture needs.
        return torch.optim.Adam([*model.parameters(), *uw.parameters()], lr=1e-2, capturable=True)

    graphed_adam, eager_adam = adam(graphed, graphed_uw), adam(eager, eager_uw)

    def step(model, uw, optimiser, inputs, targets):
        total = uw((model(inputs) - targets).square().mean(dim=(1, 2)))
        total.backward()
        optimiser.step()
        return total

    gen = torch.Generator(device="cuda").manual_seed(1)

    def batch():
        inputs = torch.randn(32, 16, generator=gen, device="cuda")
        return inputs, torch.randn(num_tasks, 32, 4, generator=gen, device="cuda")

    static_inputs, static_targets = batch()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: kernels compiled, Adam's state allocated
        for _ in range(3):
            graphed_adam.zero_grad(set_to_none=True)
            step(graphed, graphed_uw, graphed_adam, static_inputs, static_targets)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):  # the same three steps, eagerly
        eager_adam.zero_grad(set_to_none=True)
        step(eager, eager_uw, eager_adam, static_inputs, static_targets)
    graphed_adam.zero_grad(set_to_none=True)  # the captured backward writes fresh gradients
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_total = step(graphed, graphed_uw, graphed_adam, static_inputs, static_targets)
    log_vars_before = eager_uw.log_vars.detach().clone()
    for _ in range(5):
        inputs, targets = batch()
        static_inputs.copy_(inputs)
        static_targets.copy_(targets)
        graph.replay()
        eager_adam.zero_grad(set_to_none=True)
        eager_total = step(eager, eager_uw, eager_adam, inputs, targets)
        torch.testing.assert_close(static_total, eager_total, rtol=1e-5, atol=1e-6)
    for got, expected in zip(
        [*graphed.parameters(), *graphed_uw.parameters()],
        [*eager.parameters(), *eager_uw.parameters()],
        strict=True,
    ):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(eager_uw.log_vars, log_vars_before)  # the steps did learn


@pytest.mark.parametrize(
    ("num_tasks", "dtype"), [(3, torch.float32), (8, torch.float16), (33, torch.bfloat16)]
)
def test_gram_of_64m_columns_is_exact_on_integer_gradients(num_tasks, dtype):
    """P = 2^26 + 7 columns: a 64 M-element weight and a small bias. With 33 rows the weight's
    row offsets pass 2^31 elements. Entries are -1, 0 or 1, one in eight nonzero, so every
    product and every partial sum is an integer under 2^24 (about 2^23 on the diagonal): exact in
    fp32 in any order of summation. The kernels must return the exact Gram, whatever their
    chunking, and norms within the 2 ulps of an approximate square root."""
    gen = torch.Generator(device="cuda").manual_seed(num_tasks)

    def sparse_signs(columns):
        matrix = torch.empty(num_tasks, columns, dtype=dtype, device="cuda")
        for row in matrix:  # row by row: temporaries of one row, not of the whole matrix
            codes = torch.randint(
                0, 16, (columns,), generator=gen, device="cuda", dtype=torch.uint8
            )
            row.copy_((codes == 1).to(dtype) - (codes == 0).to(dtype))
        return matrix

    grads = [sparse_signs(1 << 26), sparse_signs(7)]
    expected = torch.zeros(num_tasks, num_tasks, dtype=torch.float64, device="cuda")
    for grad in grads:  # float64 sums of integers: exact
        for block in grad.split(1 << 22, dim=1):
            block = block.double()
            expected += block @ block.T
    assert expected.diagonal().max() < 2**24
    assert torch.equal(task_gram(grads, backend="triton").double(), expected)
    norms = task_grad_norms(grads, backend="triton").double()
    torch.testing.assert_close(norms, expected.diagonal().sqrt(), rtol=2.0**-22, atol=0)


def test_gradnorm_step_has_no_host_synchronisation_after_the_first():
    model = MultiTaskMLP(4, input_dim=16, output_dim=8, hidden=32).cuda()
    gradnorm = GradNorm(model.last_shared_layer.parameters(), 4, backend="triton")
    inputs, targets = torch.randn(32, 16, device="cuda"), torch.randn(4, 32, 8, device="cuda")

    def step():
        gradnorm.backward((model(inputs) - targets).square().mean(dim=(1, 2)))

    step()  # the first call chooses the gradient mode and records L_i(0): it synchronises
    step()  # kernels compiled outside the checked region
    with host_synchronisation_is_an_error():
        step()
    assert gradnorm.gradient_mode == "batched"


def test_task_gram_cuda_graph_replay_is_bitwise_eager():
    grads = [torch.randn(8, 1000, device="cuda"), torch.randn(8, 77, device="cuda")]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            task_gram(grads, backend="triton")
            task_grad_norms(grads, backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        matrix = task_gram(grads, backend="triton")
        norms = task_grad_norms(grads, backend="triton")
    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        for grad in grads:
            grad.copy_(torch.randn(grad.shape, generator=gen, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(matrix, task_gram(grads, backend="triton"))
        assert torch.equal(norms, task_grad_norms(grads, backend="triton"))


@pytest.mark.parametrize("num_tasks", [3, 12])  # the exact solver, and Frank-Wolfe beyond K = 10
@pytest.mark.parametrize("features", [False, True])
def test_mgda_step_has_no_host_synchronisation_after_the_first(num_tasks, features):
    model = MultiTaskMLP(num_tasks, input_dim=16, output_dim=8, hidden=32).cuda()
    shared = None if features else model.last_shared_layer.parameters()
    mgda = MGDA(shared, num_tasks, normalization="l2", backend="triton")
    inputs, targets = (
        torch.randn(32, 16, device="cuda"),
        torch.randn(num_tasks, 32, 8, device="cuda"),
    )

    def step():
        if features:
            z = model.trunk(inputs)
            outputs = torch.stack([head(z) for head in model.heads])
            mgda.backward((outputs - targets).square().mean(dim=(1, 2)), features=z)
        else:
            mgda.backward((model(inputs) - targets).square().mean(dim=(1, 2)))

    step()  # the first call chooses the gradient mode: it synchronises
    step()
    with host_synchronisation_is_an_error():
        step()
    assert abs(float(mgda.weights.sum()) - 1) < 1e-5


def test_loss_level_methods_have_no_host_synchronisation():
    losses = torch.rand(4, device="cuda", requires_grad=True)
    methods = [EqualWeighting(4).cuda(), DWA(4).cuda(), DTP(4).cuda()]
    methods[2].update_kpis([0.1, 0.2, 0.3, 0.4])  # reads the KPIs on the host, by design
    with host_synchronisation_is_an_error():
        for method in methods:
            method.backward(losses)  # DWA adds the losses to its period sums on the device
