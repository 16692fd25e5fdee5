"""Every balancer under DDP, FSDP2 and Lightning (gloo, 127.0.0.1): the same weights on every
rank, and the weights and parameters of one process trained on the whole batch.

Each set-up runs once per module (``distributed_worker.py``, one process per rank, every method
in turn, 6 steps); the tests below compare what the ranks saved. Every launch has a time limit
and every process it starts is ended.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import pytest
import torch

HERE = Path(__file__).resolve().parent
LAUNCH_TIMEOUT_S = 240

# The ranks and the single process add the same numbers in different orders (a mean of two
# local means against one mean of the whole batch; the Gram of reduced gradient shards against
# one Gram): float32 rounding, a few 1e-7 relative per operation, grows to ~1e-6 over 6 SGD
# steps. 1e-5 is ten times that and far below what a rank-local balancer drifts by (the ranks'
# local weights differ by 1e-2 to 1e-1 here).
RTOL = 1e-5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(setup: str, world: int, out_dir: Path, methods: list[str] | None = None) -> list:
    """Run ``world`` ranks of ``setup``; return each rank's saved results."""
    port = str(free_port())
    processes = []
    for rank in range(world):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "NODE_RANK": "0",
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
        }
        command = [sys.executable, str(HERE / "distributed_worker.py"), setup, str(out_dir)]
        if methods:
            command.append(",".join(methods))
        processes.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
            outputs.append(output)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{setup} with {world} ranks did not finish in {LAUNCH_TIMEOUT_S} s")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for rank, (process, output) in enumerate(zip(processes, outputs, strict=True)):
        assert process.returncode == 0, f"{setup} rank {rank} failed:\n{output[-4000:]}"
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world)]


SETUPS = {
    "ddp_outside": 2,
    "ddp_inside": 2,
    "fsdp2": 2,
    "ddp_outside_3": 3,
    "lightning_auto": 2,
    "lightning_manual": 2,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Each set-up's results, launched on first use."""
    cache: dict[str, list] = {}

    def get(setup: str) -> list:
        if setup not in cache:
            if setup.startswith("lightning"):
                pytest.importorskip("lightning")
            world = SETUPS[setup]
            out_dir = tmp_path_factory.mktemp(setup)
            cache[setup] = launch(setup.removesuffix("_3"), world, out_dir)
        return cache[setup]

    return get


@pytest.fixture(scope="module")
def single() -> dict:
    """One process on the whole batch of each world size, every method."""
    cache: dict[tuple[str, int], dict] = {}

    def get(method: str, world: int) -> dict:
        if (method, world) not in cache:
            cache[method, world] = worker.train("single", method, 0, world)
        return cache[method, world]

    return get


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = max(float(expected.abs().max()), 1.0)
    error = float((got - expected).abs().max())
    assert error <= RTOL * scale, f"{what}: differs from one process by {error:.3e}"


@pytest.mark.parametrize("method", worker.METHODS)
@pytest.mark.parametrize("setup", list(SETUPS))
def test_every_rank_equals_one_process_on_the_whole_batch(runs, single, setup, method):
    ranks = runs(setup)
    world = SETUPS[setup]
    results = [rank[method] for rank in ranks]
    # Bit-for-bit the same weights, parameters and balancer state on every rank.
    for rank, result in enumerate(results[1:], start=1):
        assert torch.equal(result["weights"], results[0]["weights"]), f"rank {rank} weights"
        for name, value in result["parameters"].items():
            assert torch.equal(value, results[0]["parameters"][name]), f"rank {rank}: {name}"
        for name, value in result["balancer"].items():
            assert torch.equal(value, results[0]["balancer"][name]), f"rank {rank}: {name}"
    expected = single(method, world)
    assert_close(results[0]["weights"], expected["weights"], "weights")
    for name, value in results[0]["parameters"].items():
        assert_close(value, expected["parameters"][name], name)
    for name, value in results[0]["balancer"].items():
        assert_close(value, expected["balancer"][name], f"balancer.{name}")


def test_ranks_built_with_different_task_counts_fail_on_every_rank(tmp_path):
    ranks = launch("mismatch", 2, tmp_path)
    for result in ranks:
        error = result["mismatch"]["error"]
        assert error is not None
        assert "ranks [1] differ from rank 0" in error
        assert "num_tasks=3" in error and "num_tasks=4" in error


ADAPTIVE = [method for method in worker.METHODS if method != "equal"]


def test_process_group_and_sync_false(tmp_path):
    """Ranks 0 and 1 sync over their own group; rank 2, with sync=False, communicates nothing
    (it would hang the others if it joined a collective) and keeps its own weights."""
    ranks = launch("groups", 3, tmp_path, ADAPTIVE)
    for method in ADAPTIVE:
        zero, one, two = (rank[method]["weights"] for rank in ranks)
        assert torch.equal(zero, one), method
        assert not torch.allclose(zero, two), method
