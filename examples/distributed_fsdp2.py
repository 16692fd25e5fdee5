"""FSDP2: the trunk and the model sharded with ``fully_shard``, the balancer beside them.

Run: ``torchrun --nproc-per-node 2 examples/distributed_fsdp2.py`` (add ``--backend nccl`` on GPUs).
"""

import argparse
import gc

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from fused_mtl import GradNorm

parser = argparse.ArgumentParser()
parser.add_argument("--backend", default="gloo")
args = parser.parse_args()
dist.init_process_group(args.backend)
rank = dist.get_rank()
device_type = "cuda" if args.backend == "nccl" else "cpu"
if device_type == "cuda":
    torch.cuda.set_device(rank % torch.cuda.device_count())
mesh = init_device_mesh(device_type, (dist.get_world_size(),))


class MultiTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.heads = nn.Linear(32, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.heads(self.trunk(inputs))


def train() -> list[float]:
    """Five steps on this rank's data; the weights the balancer ends with."""
    torch.manual_seed(0)
    model = MultiTask().to(device_type)
    fully_shard(model.trunk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # After fully_shard: the balancer holds the sharded (DTensor) parameters of a shared layer.
    balancer = GradNorm(model.trunk[2].parameters(), tasks=["depth", "seg", "normals"])
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.05)

    generator = torch.Generator().manual_seed(rank)
    for _step in range(5):
        inputs = torch.randn(16, 8, generator=generator).to(device_type)
        targets = torch.randn(16, 3, generator=generator).to(device_type)
        losses = (model(inputs) - targets).square().mean(dim=0)
        optimizer.zero_grad()
        total = balancer(losses)  # norms of the global per-task gradients, from the shards
        total.backward()  # FSDP reduce-scatters the model's gradients as usual
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
