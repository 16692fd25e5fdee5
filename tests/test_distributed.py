"""Every balancer under DDP, FSDP2 and Lightning (gloo, 127.0.0.1): the same weights on every
rank, and the weights and parameters of one process trained on the whole batch.

Each set-up runs once per module (``distributed_worker.py``, one process per rank, every method
in turn, 6 steps); the tests below compare what the ranks saved. Every launch has a time limit
and every process it starts is ended.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker as worker
import pytest
import torch

HERE = Path(__file__).resolve().parent
LAUNCH_TIMEOUT_S = 240

# The ranks and the single process add the same numbers in different orders (a mean of two
# local means against one mean of the whole batch; the Gram of reduced gradient shards against
# one Gram): float32 rounding. Measured (``python tests/test_distributed.py``): at most 1.8e-7
# after 6 steps, over every set-up and method. 1e-5 leaves room for other machines' summation
# orders and stays far below what the same balancers drift by without syncing (3e-3 to 0.5
# against one process, measured the same way).
RTOL = 1e-5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def run_ranks(commands: list[list[str]], what: str, ranked: bool = True) -> list[str]:
    """Start one process per command, wait at most ``LAUNCH_TIMEOUT_S`` and end every process,
    its children included; return their output.

    ``ranked``: command i runs as rank i of ``len(commands)`` on 127.0.0.1; otherwise the
    process gets no rank variables and starts its other ranks itself (Lightning does).
    """
    port = str(free_port())
    world = len(commands)
    processes = []
    for rank, command in enumerate(commands):
        rank_env = {
            key: value
            for key, value in os.environ.items()
            if key not in (*RANK_VARIABLES, "MASTER_ADDR", "MASTER_PORT")
        }
        rank_env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        if ranked:
            rank_env.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                NODE_RANK="0",
                WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world),
            )
        processes.append(
            subprocess.Popen(
                command,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    outputs = []
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        for process in processes:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(output)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish in {LAUNCH_TIMEOUT_S} s")
    finally:
        for process in processes:
            # Each rank leads its own session: this ends the processes it started too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for rank, (process, output) in enumerate(zip(processes, outputs, strict=True)):
        assert process.returncode == 0, f"{what} rank {rank} failed:\n{output[-4000:]}"
    return outputs


def launch(setup: str, world: int, out_dir: Path, methods: list[str] | None = None) -> list:
    """Run ``world`` ranks of ``setup`` in ``distributed_worker.py``; return their results."""
    command = [sys.executable, str(HERE / "distributed_worker.py"), setup, str(out_dir)]
    if methods:
        command.append(",".join(methods))
    run_ranks([command] * world, f"{setup} with {world} ranks")
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


@pytest.mark.parametrize(
    ("setup", "method"),
    [
        (setup, method)
        for setup in SETUPS
        for method in worker.METHODS
        if not (setup == "fsdp2" and method in worker.NOT_SHARDED)
    ],
)
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


def test_ranks_built_with_different_tasks_fail_on_every_rank(tmp_path):
    ranks = launch("mismatch", 2, tmp_path)
    for result in ranks:
        count, names = result["mismatch"]["count"], result["mismatch"]["names"]
        assert count is not None and names is not None
        assert "ranks [1] differ from rank 0" in count
        assert "rank 0: UncertaintyWeighting(num_tasks=3" in count
        assert "rank 1: UncertaintyWeighting(num_tasks=4" in count
        assert "ranks [1] differ from rank 0" in names
        assert "['depth', 'seg']" in names and "['depth', 'normals']" in names
        assert (
            "under FSDP2, build the balancer after fully_shard" in result["mismatch"]["fsdp_before"]
        )


def test_ranks_that_differ_in_data_or_state_still_agree(tmp_path):
    zero, one = (rank["edge_cases"] for rank in launch("edge_cases", 2, tmp_path))
    # Every rank ran every case (none raised, none hung) and agrees.
    for key in ("zero_on_one_rank", "multi_noise", "initial_losses", "gradnorm_grad"):
        assert torch.equal(zero[key], one[key]), key
    # Rank 0's PCGrad orders won.
    assert torch.equal(zero["pcgrad_rank_seeds"], one["pcgrad_rank_seeds"])
    for key in ("dwa_no_grad", "deepcopy_grad", "pickled_grad", "compiled_grad"):
        assert torch.equal(zero[key], one[key]), key
    # Rank 0's initial losses (1.0) and noise parameters won.
    assert torch.equal(zero["initial_losses"], torch.ones(3))
    torch.manual_seed(100)  # rank 0's seed for MultiNoiseLoss's torch.rand draw
    assert torch.equal(zero["multi_noise"], torch.rand(3))
    # d/ds of e^{-s} L + s at s = 0, averaged over ranks with L = 1 and 2: 1 - 1.5.
    assert torch.allclose(zero["deepcopy_grad"], torch.full((3,), -0.5))
    assert torch.allclose(zero["compiled_grad"], torch.full((3,), -0.5))
    assert "was pickled with a process group" in zero["pickled"]
    assert "set_process_group" in zero["pickled"]
    # The layers' Gram of an FSDP2-sharded trunk: the whole batch's, on every rank.
    for rank in (zero, one):
        assert rank["fsdp2_layers_mode"] == "layers"
        reference = rank["fsdp2_layers_reference"]
        scale = float(reference.abs().max())
        for gram in rank["fsdp2_layers_grams"]:
            torch.testing.assert_close(gram, reference, rtol=RTOL, atol=RTOL * scale)
    # Inside an FSDP2 module: the round trip loads, a NaN is refused on every rank, unchanged.
    for rank in (zero, one):
        assert rank["fsdp2_round_trip"].tolist() == [0.5, -0.5, 1.0]
        assert "log_vars of task 'b' is nan" in rank["fsdp2_nan"], rank["fsdp2_nan"]
        assert rank["fsdp2_after"].tolist() == [0.5, -0.5, 1.0]


#: The methods whose weights follow the data (RLW's are draws, the same on a rank with the
#: same seed whether or not it syncs).
# The methods whose weights change with the numbers they see (the trimmed mean's are 1 / K).
ADAPTIVE = [m for m in worker.METHODS if m not in ("equal", "rlw", "trimmed_mean")]


def test_process_group_and_sync_false(tmp_path):
    """Ranks 0 and 1 sync over their own group; rank 2, with sync=False, communicates nothing
    (it would hang the others if it joined a collective) and keeps its own weights."""
    ranks = launch("groups", 3, tmp_path, ADAPTIVE)
    for method in ADAPTIVE:
        zero, one, two = (rank[method]["weights"] for rank in ranks)
        assert torch.equal(zero, one), method
        assert not torch.allclose(zero, two), method


def test_communication_per_step(tmp_path):
    """What each method sends per step besides the engine's own gradient reduction, as
    docs/distributed.md states it (K = 3 tasks, 2 ranks; P shared-parameter elements)."""
    ranks = launch("count", 2, tmp_path)
    num_tasks = worker.NUM_TASKS
    net = worker.Net()
    last_layer = sum(p.numel() for p in net.trunk[2].parameters())
    trunk = sum(p.numel() for p in net.trunk.parameters())
    gram_and_losses = ("all_reduce", num_tasks * num_tasks + num_tasks)
    first_layer = sum(p.numel() for p in net.trunk[0].parameters())
    by_layer = [
        ("reduce_scatter", num_tasks * 2 * -(-last_layer // 2)),
        ("reduce_scatter", num_tasks * 2 * -(-first_layer // 2)),
    ]
    # The methods given the trunk (or GradNorm's layer) as a module, and their P.
    LAYER_METHODS = {"gradnorm": last_layer, "mgda": trunk, "upgrad": trunk}
    expected = {
        "uw": [("all_reduce", num_tasks)],
        "awl": [("all_reduce", num_tasks)],
        "equal": [],
        "dwa": [("all_reduce", num_tasks)],
        "dtp": [("all_gather", num_tasks)],
        # reduce_scatter: each rank puts in its K x P gradients (P padded to a multiple
        # of W) and receives its K x P / W shard of the sum.
        # GradNorm, MGDA and UPGrad take the Gram one layer at a time: a reduce_scatter per
        # layer, as its per-task gradients arrive (the last layer first), then the shares.
        "gradnorm": [("reduce_scatter", num_tasks * 2 * -(-last_layer // 2)), gram_and_losses],
        "mgda": [*by_layer, gram_and_losses],
        "mgda_ub": [gram_and_losses],
        # PCGrad: the Gram of MGDA, and rank 0's task orders (K x (K - 1) indices).
        "pcgrad": [
            ("reduce_scatter", num_tasks * 2 * -(-trunk // 2)),
            gram_and_losses,
            ("broadcast", num_tasks * (num_tasks - 1)),
        ],
        "upgrad": [*by_layer, gram_and_losses],
        # The loss-level methods: the losses' mean (IMTL-L: its parameter's gradient, as UW),
        # RLW rank 0's draw.
        "famo": [("all_reduce", num_tasks)],
        "rlw": [("broadcast", num_tasks)],
        "gls": [("all_reduce", num_tasks)],
        "imtl_l": [("all_reduce", num_tasks)],
        # MoCo and ExcessMTL: the mean of the K x P gradients themselves.
        "moco": [("all_reduce", num_tasks * trunk)],
        "sdmgrad": [("reduce_scatter", num_tasks * 2 * -(-trunk // 2)), gram_and_losses],
        "excess_mtl": [("all_reduce", num_tasks * trunk)],
        # DB-MTL: the mean gradients and the mean losses (their logarithms' gradients); the
        # trimmed mean: the mean gradients.
        "db_mtl": [("all_reduce", num_tasks * trunk), ("all_reduce", num_tasks)],
        "trimmed_mean": [("all_reduce", num_tasks * trunk)],
        # CR-MOGM: its method's (MGDA's) Gram; PBI: the losses' mean.
        "cr_mogm": [("reduce_scatter", num_tasks * 2 * -(-trunk // 2)), gram_and_losses],
        "pbi": [("all_reduce", num_tasks)],
        # GO4Align: the losses' mean; NTKMTL: the Gram (its diagonal is the kernels'); Auto-
        # Lambda without a closure: the mean per-task gradients (with one: K more numbers).
        "go4align": [("all_reduce", num_tasks)],
        "ntkmtl": [("reduce_scatter", num_tasks * 2 * -(-trunk // 2)), gram_and_losses],
        "auto_lambda": [("all_reduce", num_tasks * trunk)],
    }
    for method, calls in expected.items():
        steps = ranks[0][method]["steps"]
        # The first call also checks that the ranks built the same balancer and gives every rank
        # rank 0's state; the gradient methods agree on their first call's checks (K + 1
        # numbers).
        if calls:
            first = [name for name, _, _ in steps[0]]
            assert first[:2] == ["all_gather_object", "broadcast_object_list"], method
        else:
            assert not steps[0], method
        sent = [[(name, numel) for name, numel, _ in later] for later in steps[1:]]
        if method not in LAYER_METHODS:
            assert all(later == calls for later in sent), method
            continue
        # The layers' Gram off CUDA: the first call batched, the second one task at a time
        # (every parameter differentiated in each pass: one reduce_scatter of them all), after
        # which the ranks agree on the faster (1 number); then the faster.
        scatter = ("reduce_scatter", num_tasks * 2 * -(-LAYER_METHODS[method] // 2))
        one_pass = [scatter, gram_and_losses]
        assert sent[0] == [scatter, ("all_reduce", 1), gram_and_losses], (method, sent)
        assert sent[1] in (calls, one_pass), method


DOCS = (HERE.parent / "docs" / "distributed.md").read_text()


def doc_block(example: str) -> str:
    """The code block of docs/distributed.md that shows ``examples/<example>``."""
    blocks = re.findall(r"```python\n(# examples/(\S+)\n.*?)```", DOCS, flags=re.DOTALL)
    matching = [code for code, name in blocks if name == example]
    assert len(matching) == 1, f"docs/distributed.md shows examples/{example} once"
    return matching[0]


RECIPES = ["distributed_ddp.py", "distributed_fsdp2.py"]


@pytest.mark.parametrize("example", RECIPES)
def test_recipe_in_the_docs_runs_on_two_ranks(example):
    path = HERE.parent / "examples" / example
    code = path.read_text()
    assert doc_block(example) == f"# examples/{example}\n" + code.split('"""', 2)[2].lstrip()
    outputs = run_ranks([[sys.executable, str(path)]] * 2, example)
    assert "same weights on every rank" in outputs[0]


@pytest.mark.parametrize("options", [[], ["--manual"]], ids=["automatic", "manual"])
def test_lightning_recipe_in_the_docs_runs(options):
    pytest.importorskip("lightning")
    example = "distributed_lightning.py"
    path = HERE.parent / "examples" / example
    code = path.read_text()
    assert doc_block(example) == f"# examples/{example}\n" + code.split('"""', 2)[2].lstrip()
    (output,) = run_ranks([[sys.executable, str(path), *options]], example, ranked=False)
    assert "same weights on every rank" in output


def largest_differences(results: list[dict], expected: dict) -> tuple[float, float]:
    """Largest |difference| across ranks, and of rank 0 against one process, over the weights
    of every step, the final parameters and the balancer's parameters."""

    def tensors(result):
        return [result["weights"], *result["parameters"].values(), *result["balancer"].values()]

    across = max(
        float((a - b).abs().max())
        for other in results[1:]
        for a, b in zip(tensors(other), tensors(results[0]), strict=True)
    )
    single = max(
        float((a - b).abs().max())
        for a, b in zip(tensors(results[0]), tensors(expected), strict=True)
    )
    return across, single


def main() -> None:
    """``python tests/test_distributed.py``: the table of set-up x method, as markdown."""
    import tempfile

    print("| set-up | ranks | " + " | ".join(worker.METHODS) + " |")
    print("|---|---|" + "---|" * len(worker.METHODS))
    singles: dict[tuple[str, int], dict] = {}
    for setup, world in SETUPS.items():
        with tempfile.TemporaryDirectory() as out_dir:
            ranks = launch(setup.removesuffix("_3"), world, Path(out_dir))
        cells = []
        for method in worker.METHODS:
            if (method, world) not in singles:
                singles[method, world] = worker.train("single", method, 0, world)
            across, single = largest_differences(
                [rank[method] for rank in ranks], singles[method, world]
            )
            cells.append(f"{across:.0e} / {single:.1e}")
        print(f"| {setup.removesuffix('_3')} | {world} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
