"""GPU-only properties of the Triton path: no host synchronisation, CUDA-graph capture.

Run with ``FUSED_MTL_TEST_DEVICE=cuda``; on a machine without CUDA these tests are skipped.
"""

import pytest
import torch
from formulas import log_variance

from fused_mtl import UncertaintyWeighting

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("num_tasks", [2, 4096])
def test_no_host_synchronisation(num_tasks):
    uw = UncertaintyWeighting(num_tasks, backend="triton").cuda()
    losses = torch.rand(num_tasks, device="cuda", requires_grad=True)
    uw(losses).backward()  # compile the kernels outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        uw(losses).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


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
