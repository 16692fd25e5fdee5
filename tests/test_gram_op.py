"""Per-task gradient norms and Gram matrix, both backends, against the float64 definition.

The Triton backend runs the real kernels: compiled on CUDA, in the Triton interpreter on CPU.
"""

import pytest
import torch
from checks import LaunchCounter, assert_close_to
from formulas import grad_norms, gram

from fused_mtl.functional import task_grad_norms, task_gram

# Every value is accumulated in fp32 (the inputs' products are exact in fp32 for fp16 / bf16 and
# rounded once for fp32). Along any accumulation path of the kernels (blocks, tl.dot, chunks) or
# of torch's matmul there are fewer than P + 64 additions, so the classic bound of recursive
# summation, (P + 64) * 2^-24 times the sum of the magnitudes, holds for every entry. A norm is
# the square root of a diagonal entry: its relative error is at most half that, plus one ulp.
ACCUMULATION_ULPS = 64
FP32_EPS = 2.0**-24
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NUM_TASKS = [1, 2, 3, 8, 33]
# A weight of 1,500 elements spans several chunks; no width is a multiple of any block size.
PARAM_SHAPES = [(5, 300), (129,), (3, 1), ()]


def sample_task_grads(num_tasks, dtype, device, seed=0, shapes=PARAM_SHAPES):
    gen = torch.Generator().manual_seed(seed + 100 * num_tasks)
    grads = []
    for index, shape in enumerate(shapes):
        # Parameters of different scales, as the layers of a network have.
        values = torch.randn((num_tasks, *shape), generator=gen) * 4.0**index
        grads.append(values.to(dtype).to(device))
    return grads


def total_width(grads):
    return sum(g[0].numel() for g in grads)


def assert_gram_close(got, grads, what):
    value, magnitude = gram(grads)
    assert got.shape == value.shape
    rtol = (total_width(grads) + ACCUMULATION_ULPS) * FP32_EPS
    assert_close_to(got, value, magnitude, rtol, what)


def assert_norms_close(got, grads, what):
    norms = grad_norms(grads)
    assert got.shape == norms.shape
    rtol = (total_width(grads) + ACCUMULATION_ULPS) * FP32_EPS / 2 + FP32_EPS
    assert_close_to(got, norms, norms, rtol, what)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tasks", NUM_TASKS)
def test_norms_match_the_definition(num_tasks, dtype, backend, device):
    grads = sample_task_grads(num_tasks, dtype, device)
    norms = task_grad_norms(grads, backend=backend)
    assert norms.dtype == torch.float32 and norms.device == device
    assert_norms_close(norms, grads, f"norms K={num_tasks} {dtype}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tasks", [*NUM_TASKS, 70])  # 70: Gram tiles over a 2 x 2 grid
def test_gram_matches_the_definition(num_tasks, dtype, backend, device):
    grads = sample_task_grads(num_tasks, dtype, device)
    matrix = task_gram(grads, backend=backend)
    assert matrix.dtype == torch.float64 and matrix.device == device  # the Gram of any dtype
    assert_gram_close(matrix, grads, f"Gram K={num_tasks} {dtype}")


def test_float64_runs_in_float64_on_the_torch_backend(device):
    grads = sample_task_grads(3, torch.float64, device)
    value, magnitude = gram(grads)
    matrix = task_gram(grads, backend="torch")
    assert matrix.dtype == torch.float64
    assert_close_to(matrix, value, magnitude, 64 * 2.0**-53, "float64 Gram")
    norms = task_grad_norms(grads)  # "auto" takes the torch path for float64 everywhere
    assert norms.dtype == torch.float64
    assert_close_to(norms, value.diagonal().sqrt(), value.diagonal().sqrt(), 1e-14, "norms")


def test_many_tasks_norms(device):
    """Norms tile K over the grid beyond 32 rows; 65,536 tasks of a small parameter."""
    grads = sample_task_grads(65536, torch.float32, device, shapes=[(3,), ()])
    assert_norms_close(task_grad_norms(grads, backend="triton"), grads, "norms K=65536")


@pytest.mark.parametrize("diagonal", [True, False])
def test_one_launch_for_all_parameters(diagonal, device, monkeypatch):
    """Four parameters: one launch of the partials kernel and one of the reduction, no more."""
    from fused_mtl.kernels import gram as kernels

    partials = LaunchCounter(kernels._task_gram_partials_kernel)
    reduce = LaunchCounter(kernels._reduce_partials_kernel)
    monkeypatch.setattr(kernels, "_task_gram_partials_kernel", partials)
    monkeypatch.setattr(kernels, "_reduce_partials_kernel", reduce)
    grads = sample_task_grads(3, torch.float32, device)
    op = task_grad_norms if diagonal else task_gram
    op(grads, backend="triton")
    assert (partials.launches, reduce.launches) == (1, 1)


@pytest.mark.parametrize("op", [task_grad_norms, task_gram])
def test_bitwise_reproducible(op, device):
    grads = sample_task_grads(8, torch.float32, device, shapes=[(40, 250), (77,)])
    first = op(grads, backend="triton")
    for _ in range(2):
        assert torch.equal(op(grads, backend="triton"), first)


def test_triton_gram_is_exactly_symmetric(device):
    matrix = task_gram(sample_task_grads(33, torch.float32, device), backend="triton")
    assert torch.equal(matrix, matrix.T)


def test_input_forms_agree(device):
    """A list of (K, *shape) tensors, one (K, *shape) tensor and one (K, P) matrix agree."""
    (weight,) = sample_task_grads(4, torch.float32, device, shapes=[(6, 7)])
    for backend in ["triton", "torch"]:
        as_list = task_gram([weight], backend=backend)
        torch.testing.assert_close(task_gram(weight, backend=backend), as_list, rtol=0, atol=0)
        flat = weight.reshape(4, 42)
        torch.testing.assert_close(task_gram(flat, backend=backend), as_list, rtol=0, atol=0)


def test_non_contiguous_gradients(device):
    """A transposed view is read through its strides (or one copy), never misread."""
    base = sample_task_grads(3, torch.float32, device, shapes=[(9, 11)])[0]
    strided = base.transpose(1, 2)  # (3, 11, 9), not contiguous
    for op in (task_grad_norms, task_gram):
        got = op([strided, base[:, ::2]], backend="triton")
        if op is task_grad_norms:
            assert_norms_close(got, [strided, base[:, ::2]], "strided norms")
        else:
            assert_gram_close(got, [strided, base[:, ::2]], "strided Gram")


def test_zero_gradient_has_zero_norm_and_zero_gradient(device):
    grads = [torch.zeros(2, 5, device=device), torch.zeros(2, device=device)]
    grads[0][1] = 3.0
    for backend in ["triton", "torch"]:
        leaves = [g.clone().requires_grad_() for g in grads]
        norms = task_grad_norms(leaves, backend=backend)
        assert norms.tolist() == [0.0, pytest.approx(3.0 * 5**0.5)]
        norms.sum().backward()
        assert torch.isfinite(leaves[0].grad).all()
        assert leaves[0].grad[0].abs().sum() == 0


def test_half_gradients_beyond_float16_range(device):
    """fp16 gradients whose squared norm (and Gram) exceed 65,504: the fp32 result holds them."""
    grads = [torch.full((2, 1000), 60000.0, dtype=torch.float16, device=device)]
    for backend in ["triton", "torch"]:
        assert_gram_close(task_gram(grads, backend=backend), grads, "fp16 Gram near max")
        assert_norms_close(task_grad_norms(grads, backend=backend), grads, "fp16 norms near max")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradients_match_the_formulas(backend, device):
    """d||g_i||/dg_i = g_i / ||g_i||; for M = G G^T, dL/dG = (U + U^T) G with U = dL/dM."""
    grads = sample_task_grads(3, torch.float32, device, shapes=[(4, 5), (2,)])
    leaves = [g.clone().requires_grad_() for g in grads]
    upstream = torch.randn(3, 3, generator=torch.Generator().manual_seed(1)).to(device)
    (task_gram(leaves, backend=backend) * upstream).sum().backward()
    joined = torch.cat([g.double().cpu().reshape(3, -1) for g in grads], dim=1)
    u = upstream.double().cpu()
    expected = (u + u.T) @ joined
    got = torch.cat([leaf.grad.double().cpu().reshape(3, -1) for leaf in leaves], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    leaves = [g.clone().requires_grad_() for g in grads]
    weights = torch.tensor([0.5, -1.0, 2.0], device=device)
    (task_grad_norms(leaves, backend=backend) * weights).sum().backward()
    norms = joined.norm(dim=1, keepdim=True)
    expected = weights.double().cpu()[:, None] * joined / norms
    got = torch.cat([leaf.grad.double().cpu().reshape(3, -1) for leaf in leaves], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_torch_backend_gradcheck():
    gen = torch.Generator().manual_seed(2)
    grads = [
        torch.randn(3, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True),
        torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True),
    ]
    assert torch.autograd.gradcheck(lambda *g: task_gram(list(g), backend="torch"), grads)
    assert torch.autograd.gradcheck(lambda *g: task_grad_norms(list(g), backend="torch"), grads)


@pytest.mark.parametrize(
    ("task_grads", "error", "message"),
    [
        ([], ValueError, "task_grads is empty"),
        ("grads", TypeError, "sequence of tensors"),
        ([torch.zeros(2, 3), "x"], TypeError, r"task_grads\[1\]: expected a tensor, got str"),
        ([torch.zeros(2, 3, dtype=torch.int64)], TypeError, r"task_grads\[0\]: .*floating"),
        ([torch.zeros(2, 3), torch.zeros(3, 3)], ValueError, r"task_grads\[1\] has 3 task rows"),
        ([torch.zeros(2, 3), torch.tensor(1.0)], ValueError, r"task_grads\[1\]: shape \(\)"),
        ([torch.zeros(0, 3)], ValueError, "K = 0"),
        (torch.zeros(5), ValueError, r"single tensor must be a \(K, P\) matrix"),
        (
            [torch.zeros(2, 3), torch.zeros(2, 3, device="meta")],
            ValueError,
            r"task_grads\[1\] is on meta",
        ),
    ],
)
def test_bad_input(task_grads, error, message):
    for op in (task_grad_norms, task_gram):
        with pytest.raises(error, match=message):
            op(task_grads)


def test_triton_backend_rejects_float64():
    with pytest.raises(TypeError, match="float64"):
        task_gram([torch.zeros(2, 3, dtype=torch.float64)], backend="triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_upcast_in_chunks_and_summed_exactly(dtype, monkeypatch):
    """Half-precision gradients are upcast a chunk of columns at a time (here 7 columns, so
    that blocks end inside each parameter and a last short one remains): every column is
    counted once, in float32, as with the whole matrix upcast at once."""
    from fused_mtl.reference import gram as reference

    monkeypatch.setattr(reference, "UPCAST_CHUNK_ELEMENTS", 21)  # 7 columns at K = 3
    gen = torch.Generator().manual_seed(5)
    grads = [
        torch.randn(3, 4, 5, generator=gen).to(dtype),
        torch.randn(3, 9, generator=gen).to(dtype),
    ]
    flat = torch.cat([g.reshape(3, -1).double() for g in grads], dim=1)
    expected_gram = flat @ flat.T
    gram = reference.task_gram(grads)
    norms = reference.task_grad_norms(grads)
    assert gram.dtype == torch.float64 and norms.dtype == torch.float32
    assert torch.allclose(gram.double(), expected_gram, rtol=1e-6, atol=1e-6)
    assert torch.allclose(norms.double(), expected_gram.diagonal().sqrt(), rtol=1e-6)
