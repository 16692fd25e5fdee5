"""Lightning: the balancer inside the LightningModule, ``strategy="ddp"``.

Automatic optimisation returns the balanced total; manual optimisation passes it to
``self.manual_backward``. Lightning starts the second process itself.

Run: ``python examples/distributed_lightning.py [--manual] [--accelerator gpu]``
"""

import argparse
import gc

import lightning as L
import torch
from torch import nn

from fused_mtl import UncertaintyWeighting

parser = argparse.ArgumentParser()
parser.add_argument("--manual", action="store_true")
parser.add_argument("--accelerator", default="cpu")
args = parser.parse_args()


class MultiTask(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.heads = nn.Linear(32, 3)
        self.balancer = UncertaintyWeighting(tasks=["depth", "seg", "normals"])
        self.automatic_optimization = not args.manual

    def training_step(self, batch, batch_index):
        inputs, targets = batch
        losses = (self.heads(self.trunk(inputs)) - targets).square().mean(dim=0)
        total = self.balancer(losses)
        if self.automatic_optimization:
            return total
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(total)
        optimizer.step()
        return None

    def on_train_end(self) -> None:
        everyone = self.all_gather(self.balancer.log_vars.detach())
        if self.global_rank == 0:
            print("log_vars per rank:", everyone.tolist())
            assert all(torch.equal(row, everyone[0]) for row in everyone)
            print("same weights on every rank")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


generator = torch.Generator().manual_seed(0)
data = torch.utils.data.TensorDataset(
    torch.randn(64, 8, generator=generator), torch.randn(64, 3, generator=generator)
)
torch.manual_seed(0)
trainer = L.Trainer(
    accelerator=args.accelerator,
    devices=2,
    strategy="ddp",
    max_epochs=2,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)
trainer.fit(MultiTask(), torch.utils.data.DataLoader(data, batch_size=8))
# Lightning leaves the process group to the exit, where freeing it (and what reference cycles
# hold) after the interpreter began its teardown can abort a gloo process ("terminate called
# without an active exception"): free both while everything lives.
gc.collect()
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
