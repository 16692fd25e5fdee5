"""DDP: the model wrapped in DistributedDataParallel, the balancer beside it.

Run: ``torchrun --nproc-per-node 2 examples/distributed_ddp.py`` (add ``--backend nccl`` on GPUs).
"""

import argparse
import gc

import torch
import torch.distributed as dist
from torch import nn

from fused_mtl import MGDA

parser = argparse.ArgumentParser()
parser.add_argument("--backend", default="gloo")
args = parser.parse_args()
dist.init_process_group(args.backend)
rank = dist.get_rank()
device = torch.device(
    f"cuda:{rank % torch.cuda.device_count()}" if args.backend == "nccl" else "cpu"
)


def train() -> list[float]:
    """Five steps on this rank's data; the weights the balancer ends with."""
    torch.manual_seed(0)  # the same initial model on every rank
    trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU()).to(device)
    heads = nn.Linear(32, 3).to(device)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(trunk, heads))
    # Built from the model's own parameters, after wrapping; it syncs over the default group.
    balancer = MGDA(trunk.parameters(), tasks=["depth", "seg", "normals"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    generator = torch.Generator().manual_seed(rank)  # each rank its own slice of the data
    for _step in range(5):
        inputs = torch.randn(16, 8, generator=generator).to(device)
        targets = torch.randn(16, 3, generator=generator).to(device)
        errors = model(inputs) - targets
        losses = errors.square().mean(dim=0)  # (3,): each task's mean over this rank's batch
        optimizer.zero_grad()
        total = balancer(losses)  # global Gram of the per-task gradients: same weights everywhere
        total.backward()  # DDP averages the model's gradients as usual
        optimizer.step()
    return balancer.weights.tolist()


# In a function, and collected below: the wrapped model and the last step's graph are freed
# while the process group lives.
weights = train()
everyone = [None] * dist.get_world_size()
dist.all_gather_object(everyone, weights)
if rank == 0:
    print("weights per rank:", everyone)
    assert all(other == everyone[0] for other in everyone)
    print("same weights on every rank")
# torch's first optimizer can leave train()'s frame in a reference cycle; freed at exit, after
# the group, it can abort the process ("terminate called without an active exception").
gc.collect()
dist.barrier()  # every rank is done with the group before any rank tears it down
dist.destroy_process_group()
