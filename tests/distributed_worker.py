"""One rank of a distributed test, or the single process on the whole batch it is compared to.

``python distributed_worker.py SETUP OUT_DIR`` runs under the environment a launcher sets
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT``), trains every method for
``STEPS`` steps on this rank's slice of a fixed global batch, and saves what it saw to
``OUT_DIR/rank{RANK}.pt``: per method, the weights after each step and the final parameters.
``train(setup="single", ...)`` is the same loop in one process on the whole batch.

Setups: ``ddp_outside`` (the balancer outside the DDP-wrapped model), ``ddp_inside`` (the
balancer inside the wrapped module, its total computed in ``forward``, as Lightning does),
``fsdp2`` (trunk and root sharded with ``fully_shard``), ``mismatch`` (ranks that built
different balancers), ``edge_cases`` (what a rank does differently from the others),
``lightning_auto`` / ``lightning_manual`` (``strategy="ddp"``).
"""

from __future__ import annotations

import gc
import math
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import fused_mtl
from fused_mtl import DTP, DWA, MGDA, EqualWeighting, GradNorm, UncertaintyWeighting
from fused_mtl.app import demo
from fused_mtl.app.demo import TRUNK_METHODS
from fused_mtl.compat import AutomaticWeightedLoss, MultiNoiseLoss

NUM_TASKS = 3
LOCAL_BATCH = 8
STEPS = 6
LR = 0.05
METHODS = [
    "uw",
    "awl",
    "equal",
    "dwa",
    "dtp",
    "gradnorm",
    "mgda",
    "mgda_ub",
    "pcgrad",
    "upgrad",
    "famo",
    "rlw",
    "gls",
    "imtl_l",
    "moco",
    "sdmgrad",
    "excess_mtl",
    "db_mtl",
    "cr_mogm",
    "trimmed_mean",
    "pbi",
    "go4align",
    "ntkmtl",
    "auto_lambda",
]
#: The methods built on the trunk by the names the tests use. Of the Gram family the
#: distributed tests run PCGrad (a random draw shared by the ranks), UPGrad (a deterministic
#: solver), SDMGrad (state across steps) and CR-MOGM (another method's weights, smoothed):
#: every Gram method shares their code path (GramBalancer; MoDo's is SDMGrad's; Krum's is
#: UPGrad's). MoCo, ExcessMTL, DB-MTL and the trimmed mean stand for the methods that need
#: the K x P gradients themselves.
GRAM_METHODS = {key: name for key, name in TRUNK_METHODS.items() if key != "graddrop"}
#: The loss-level methods; FAMO, RLW, GLS (whose path STCH, COSMOS and UW-SO share), PBI
#: and IMTL-L (UW's op) run in the distributed tests.
LOSS_METHODS = dict(demo.LOSS_METHODS)
#: Methods that refuse FSDP2-sharded shared parameters (tested on their own).
NOT_SHARDED = ("moco", "db_mtl", "trimmed_mean", "auto_lambda", "krum")


class Net(nn.Module):
    """A shared trunk and one linear head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh())
        self.heads = nn.Linear(12, NUM_TASKS)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(inputs)
        return features, self.heads(features)


def task_losses(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-task means over the batch: task 0 squared error, 1 absolute error, 2 log-cosh."""
    errors = outputs - targets
    return torch.stack(
        [
            errors[:, 0].square().mean(),
            errors[:, 1].abs().mean(),
            torch.log(torch.cosh(errors[:, 2])).mean(),
        ]
    )


def global_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    inputs = torch.randn(world * LOCAL_BATCH, 6, generator=gen)
    targets = torch.randn(world * LOCAL_BATCH, NUM_TASKS, generator=gen) * torch.tensor(
        [3.0, 1.0, 0.3]
    )
    return inputs, targets


def make_balancer(method: str, net: Net, num_tasks: int = NUM_TASKS, **sync) -> nn.Module:
    """``sync``: the ``sync`` / ``process_group`` keywords, when a test sets them."""
    if method == "uw":
        return UncertaintyWeighting(num_tasks, **sync)
    if method == "awl":
        return AutomaticWeightedLoss(num_tasks, **sync)
    if method == "equal":
        return EqualWeighting(num_tasks, **sync)
    if method == "dwa":
        return DWA(num_tasks, period_steps=2, **sync)
    if method == "dtp":
        return DTP(num_tasks, gamma=1.0, decay=0.5, **sync)
    # GradNorm, MGDA and UPGrad are given modules: their Gram comes one layer at a time
    # (fused_mtl.ops.layer_gram); the other Gram methods are given the parameters.
    if method == "gradnorm":
        return GradNorm(net.trunk[2], num_tasks, **sync)
    if method == "mgda":
        return MGDA(net.trunk, num_tasks, **sync)
    if method == "upgrad":
        return fused_mtl.UPGrad(net.trunk, num_tasks, **sync)
    if method == "mgda_ub":
        return MGDA(num_tasks=num_tasks, **sync)
    if method in LOSS_METHODS:
        return getattr(fused_mtl, LOSS_METHODS[method])(num_tasks, **sync)
    if method == "cr_mogm":  # MGDA normalised by the losses: the whole batch's, on every rank
        options = {"normalization": "loss+"}
        return fused_mtl.CRMOGM(net.trunk.parameters(), num_tasks, method_options=options, **sync)
    if method in GRAM_METHODS:
        return getattr(fused_mtl, GRAM_METHODS[method])(net.trunk.parameters(), num_tasks, **sync)
    if method == "cr_mogm_pcgrad":  # CR-MOGM over a method with a random draw
        return fused_mtl.CRMOGM(net.trunk.parameters(), num_tasks, method=fused_mtl.PCGrad, **sync)
    if method == "graddrop":
        return fused_mtl.GradDrop(net.trunk.parameters(), num_tasks)
    raise ValueError(method)


def kpis(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A KPI in (0, 1] per task: a mean over the samples, like an accuracy, so that the mean of
    the ranks' KPIs is the KPI of the whole batch."""
    return (1 / (1 + (outputs.detach() - targets).abs())).mean(dim=0)


def balanced_total(
    balancer: nn.Module,
    method: str,
    features: torch.Tensor,
    outputs: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """One step's call of the balancer: DTP gets this step's KPIs first, MGDA-UB the features."""
    losses = task_losses(outputs, targets)
    if method == "dtp":
        balancer.update_kpis(kpis(outputs, targets))
    if method == "mgda_ub":
        return balancer(losses, features=features)
    return balancer(losses)


class Wrapped(nn.Module):
    """Model and balancer in one module, the total computed in ``forward``, as Lightning does."""

    def __init__(self, net: Net, balancer: nn.Module, method: str) -> None:
        super().__init__()
        self.net, self.balancer, self.method = net, balancer, method

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        features, outputs = self.net(inputs)
        return balanced_total(self.balancer, self.method, features, outputs, targets)


def full_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, gathered whole when FSDP2 shards it."""
    result = {}
    for name, parameter in module.named_parameters():
        tensor = parameter.detach()
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        result[name] = tensor.clone()
    return result


def train(setup: str, method: str, rank: int, world: int, **sync: object) -> dict[str, object]:
    torch.manual_seed(0)
    net = Net()
    inputs, targets = global_batch(world)
    if setup != "single":
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        inputs, targets = inputs[rows], targets[rows]
    if setup == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        fully_shard(net.trunk, mesh=mesh)
        fully_shard(net, mesh=mesh)
    balancer = make_balancer(method, net, **sync)
    if setup == "ddp_inside":
        model = nn.parallel.DistributedDataParallel(Wrapped(net, balancer, method))
    elif setup == "ddp_outside":
        model = nn.parallel.DistributedDataParallel(net)
    else:
        model = net
    parameters = [*net.parameters(), *balancer.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=LR)
    weights = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        if setup == "ddp_inside":
            total = model(inputs, targets)
        else:
            features, outputs = model(inputs)
            total = balanced_total(balancer, method, features, outputs, targets)
        total.backward()
        optimizer.step()
        weights.append(balancer.weights.detach().clone())
    return {
        "weights": torch.stack(weights),
        "parameters": full_parameters(net),
        "balancer": {k: v.detach().clone() for k, v in balancer.named_parameters()},
    }


def run_mismatch(rank: int) -> dict[str, object]:
    """Rank 1 builds a balancer with one task more, then one with another task's name: every
    rank must raise, none may hang."""
    errors: dict[str, str | None] = {}
    names = ["depth", "seg"] if rank == 0 else ["depth", "normals"]
    cases = {
        "count": (UncertaintyWeighting(NUM_TASKS + rank), NUM_TASKS + rank),
        "names": (DWA(tasks=names), 2),
    }
    for case, (balancer, num_tasks) in cases.items():
        losses = torch.ones(num_tasks, requires_grad=True)
        errors[case] = None
        try:
            balancer(losses).backward()
        except RuntimeError as error:
            errors[case] = str(error)
    # A gradient method built before fully_shard holds parameters that FSDP2 replaced.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    net = Net()
    balancer = MGDA(net.trunk.parameters(), NUM_TASKS)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(net.trunk, mesh=mesh)
    fully_shard(net, mesh=mesh)
    inputs, targets = global_batch(dist.get_world_size())
    _, outputs = net(inputs)
    errors["fsdp_before"] = None
    try:
        balancer(task_losses(outputs, targets))
    except ValueError as error:
        errors["fsdp_before"] = str(error)
    return errors


def run_groups(method: str, rank: int) -> dict[str, object]:
    """Three ranks: 0 and 1 balance over their own group, rank 2 with ``sync=False``.

    Every rank calls ``new_group`` (a collective); only 0 and 1 use the group. The model is not
    wrapped, so each rank's model sees only its own batch: ranks 0 and 1 agree on the weights
    through the balancer's group alone, and rank 2 is one process on its own slice."""
    group = dist.new_group([0, 1])
    if rank < 2:
        return train("plain", method, rank, 3, process_group=group)
    return train("plain", method, rank, 3, sync=False)


# Each collective a balancer may issue, under every spelling torch has had, by what it does.
def run_edge_cases(rank: int) -> dict[str, object]:
    """Ranks that differ in their data or their starting state, and copies of a balancer."""
    import copy
    import io

    world = dist.get_world_size()
    inputs, targets = global_batch(world)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results: dict[str, object] = {}

    # Task 1's gradient is zero on rank 1 only (its loss ignores the model there): the global
    # gradient is not zero, so no rank may raise, and the weights agree.
    torch.manual_seed(0)
    net = Net()
    mgda = MGDA(net.trunk.parameters(), NUM_TASKS)
    _, outputs = net(inputs[rows])
    losses = task_losses(outputs, targets[rows])
    if rank == 1:
        losses = torch.stack([losses[0], losses[1].detach() + 0 * outputs.sum(), losses[2]])
    mgda(losses).backward()
    results["zero_on_one_rank"] = mgda.weights.clone()

    # PCGrad's random task orders with a different seed on each rank (as data augmentation
    # often has): every rank uses rank 0's orders, so the weights agree. The tasks conflict
    # (task 1's loss falls as task 0's rises), so that the order matters.
    torch.manual_seed(0)
    net = Net()
    pcgrad = fused_mtl.PCGrad(net.trunk.parameters(), NUM_TASKS)
    torch.manual_seed(200 + rank)
    weights = []
    for _ in range(4):
        _, outputs = net(inputs[rows])
        losses = task_losses(outputs, targets[rows])
        conflicting = torch.stack([losses[0], losses[1] - 0.9 * losses[0], losses[2] - losses[1]])
        pcgrad(conflicting).backward()
        weights.append(pcgrad.weights.clone())
    results["pcgrad_rank_seeds"] = torch.stack(weights)

    # Different starting state on each rank: unseeded parameters (MultiNoiseLoss draws them
    # with torch.rand), GradNorm's initial losses. The first sync gives every rank rank 0's.
    torch.manual_seed(100 + rank)
    noise = MultiNoiseLoss(NUM_TASKS)
    noise(torch.ones(NUM_TASKS, requires_grad=True)).backward()
    results["multi_noise"] = noise.noise_params.detach().clone()
    torch.manual_seed(0)
    net = Net()
    gradnorm = GradNorm(net.trunk[2].parameters(), NUM_TASKS, initial_losses=[1.0 + rank] * 3)
    _, outputs = net(inputs[rows])
    gradnorm(task_losses(outputs, targets[rows])).backward()
    results["initial_losses"] = gradnorm.initial_losses.clone()
    results["gradnorm_grad"] = gradnorm.learned_weights.grad.clone()

    # DWA counts training-mode calls made without grad too (logging a total, say).
    dwa = DWA(NUM_TASKS, period_steps=1)
    with torch.no_grad():
        for step in range(3):
            dwa(torch.tensor([1.0 + rank * step, 2.0, 3.0 - step * 0.5]))
    results["dwa_no_grad"] = dwa.weights.clone()

    # A deep copy (an EMA model) syncs over the same group; a balancer pickled whole with a
    # process group refuses to sync until it is given one again.
    group = dist.new_group(list(range(world)))
    uw = UncertaintyWeighting(NUM_TASKS, process_group=group)
    uw(torch.ones(NUM_TASKS) * (1 + rank)).backward()
    twin = copy.deepcopy(uw)
    twin.log_vars.grad = None
    twin(torch.ones(NUM_TASKS, requires_grad=True) * (1 + rank)).backward()
    results["deepcopy_grad"] = twin.log_vars.grad.clone()
    buffer = io.BytesIO()
    torch.save(uw, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    try:
        loaded(torch.ones(NUM_TASKS, requires_grad=True)).backward()
        results["pickled"] = None
    except RuntimeError as error:
        results["pickled"] = str(error)
    loaded.set_process_group(group)
    loaded.log_vars.grad = None
    loaded(torch.ones(NUM_TASKS, requires_grad=True) * (1 + rank)).backward()
    results["pickled_grad"] = loaded.log_vars.grad.clone()

    # The first call compiled: the first sync's object collectives stay out of the graph.
    compiled_uw = UncertaintyWeighting(NUM_TASKS)
    compiled = torch.compile(compiled_uw, backend="aot_eager")
    compiled(torch.ones(NUM_TASKS, requires_grad=True) * (1 + rank)).backward()
    results["compiled_grad"] = compiled_uw.log_vars.grad.clone()

    # A balancer inside a module sharded with FSDP2: its checkpoint entries are DTensors, which
    # the load checks gather, so that every rank loads its own state and refuses a NaN alike.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))

    # The layers' Gram of an FSDP2-sharded trunk with a LayerNorm and a layer without a rule of
    # its own (PReLU: differentiated through its unsharded copy), batched (first call) and one
    # task at a time (second call): the Gram of the whole batch's per-task gradients.
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.PReLU(8), nn.Linear(8, 5))
    heads = nn.Linear(5, NUM_TASKS)
    whole = copy.deepcopy(trunk)
    fully_shard(trunk, mesh=mesh)
    upgrad = fused_mtl.UPGrad(trunk, NUM_TASKS)
    grams = []
    for _ in range(2):
        upgrad(task_losses(heads(trunk(inputs[rows])), targets[rows])).backward()
        grams.append(upgrad.gram.clone())
    results["fsdp2_layers_grams"] = grams
    results["fsdp2_layers_mode"] = upgrad.gradient_mode
    shared = list(whole.parameters())
    per_task = [
        torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
        for loss in task_losses(heads(whole(inputs)), targets)
    ]
    jacobian = torch.stack(per_task).double()
    results["fsdp2_layers_reference"] = jacobian @ jacobian.T

    holder = nn.Module()
    holder.trunk = nn.Linear(4, 4)
    holder.uw = UncertaintyWeighting(tasks=["a", "b", "c"], init_log_var=[0.5, -0.5, 1.0])
    fully_shard(holder, mesh=mesh)
    state = holder.state_dict()
    holder.load_state_dict(state)
    results["fsdp2_round_trip"] = holder.uw.log_vars.full_tensor().clone()
    state["uw.log_vars"] = distribute_tensor(torch.tensor([0.0, math.nan, 0.0]), mesh, [Shard(0)])
    try:
        holder.load_state_dict(state)
        results["fsdp2_nan"] = "loaded"
    except RuntimeError as error:
        results["fsdp2_nan"] = str(error)
    results["fsdp2_after"] = holder.uw.log_vars.full_tensor().clone()
    del holder
    return results


COUNTED = {
    "all_reduce": "all_reduce",
    "reduce_scatter_single": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "all_gather_single": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "all_gather_object": "all_gather_object",
    "broadcast_object_list": "broadcast_object_list",
    "broadcast": "broadcast",
}


def run_count(method: str, rank: int, world: int) -> dict[str, object]:
    """The collectives the balancer itself issues in each step (DDP's own are in C++ and not
    seen here): a list per step of ``(collective, elements put in, bytes put in)``."""
    calls: list[tuple[str, int, int]] = []
    originals = {name: getattr(dist, name) for name in COUNTED if hasattr(dist, name)}

    def counting(name):
        def collective(*args, **kwargs):
            # The tensor a rank puts in: the input of the *_single / *_tensor forms.
            tensor = args[1] if COUNTED[name] in ("reduce_scatter", "all_gather") else args[0]
            if isinstance(tensor, torch.Tensor):
                calls.append(
                    (COUNTED[name], tensor.numel(), tensor.numel() * tensor.element_size())
                )
            else:
                calls.append((COUNTED[name], 0, 0))
            return originals[name](*args, **kwargs)

        return collective

    steps = []
    try:
        for name in originals:
            setattr(dist, name, counting(name))
        torch.manual_seed(0)
        net = Net()
        model = nn.parallel.DistributedDataParallel(net)
        balancer = make_balancer(method, net)
        inputs, targets = global_batch(world)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for _ in range(3):
            calls.clear()
            features, outputs = model(inputs[rows])
            balanced_total(balancer, method, features, outputs, targets[rows]).backward()
            steps.append(list(calls))
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return {"steps": steps}


def run_lightning(setup: str, method: str, rank: int, world: int) -> dict[str, object]:
    import lightning as L

    inputs, targets = global_batch(world)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    local_inputs, local_targets = inputs[rows], targets[rows]
    automatic = setup == "lightning_auto"

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = Net()
            self.balancer = make_balancer(method, self.net)
            self.automatic_optimization = automatic
            self.weights: list[torch.Tensor] = []
            # The single process draws its random weights (RLW, PCGrad) from here on; the
            # trainer's data loader takes a seed from the same RNG first.
            self.rng_state = torch.get_rng_state()

        def on_train_start(self):
            torch.set_rng_state(self.rng_state)

        def training_step(self, batch, batch_index):
            features, outputs = self.net(local_inputs)
            total = balanced_total(self.balancer, method, features, outputs, local_targets)
            if automatic:
                return total
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(total)
            optimizer.step()
            return None

        def on_train_batch_end(self, outputs, batch, batch_index):
            self.weights.append(self.balancer.weights.detach().clone())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    # Every rank sees the same number of batches; the batch content is ignored (each rank
    # trains on its own slice, as a DistributedSampler would give it).
    loader = torch.utils.data.DataLoader(torch.zeros(STEPS, 1), batch_size=1)
    module = Module()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, loader)
    return {
        "weights": torch.stack(module.weights),
        "parameters": full_parameters(module.net),
        "balancer": {k: v.detach().clone() for k, v in module.balancer.named_parameters()},
    }


def main() -> None:
    setup, out_dir = sys.argv[1], sys.argv[2]
    methods = sys.argv[3].split(",") if len(sys.argv) > 3 else METHODS
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    results: dict[str, object] = {}
    if setup.startswith("lightning"):
        for method in methods:
            results[method] = run_lightning(setup, method, rank, world)
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        try:
            if setup == "mismatch":
                results["mismatch"] = run_mismatch(rank)
            elif setup == "edge_cases":
                results["edge_cases"] = run_edge_cases(rank)
            elif setup == "count":
                for method in methods:
                    results[method] = run_count(method, rank, world)
            elif setup == "groups":
                for method in methods:
                    results[method] = run_groups(method, rank)
            else:
                for method in methods:
                    if setup == "fsdp2" and method in NOT_SHARDED:
                        continue
                    results[method] = train(setup, method, rank, world)
        finally:
            # Every rank done with every collective, and the wrapped models freed, before the
            # group goes: a group destroyed under a live DDP or FSDP module can abort at exit.
            gc.collect()
            dist.barrier()
            dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
