"""The training loops people write beside the plain step: half-precision models, validation
passes in training mode, a logging call, gradient accumulation (``step_with``), Lightning's
``accumulate_grad_batches``.

Every method runs on the distributed tests' network (``distributed_worker.Net``); the
references are the same method on one whole batch, or a run without the extra calls.
"""

import copy

import distributed_worker as worker
import pytest
import torch
from test_callable_contract import METHODS, MORE_METHODS
from torch import nn

import fused_mtl
from fused_mtl import DWA, FAMO, MoCo

ALL_METHODS = METHODS + MORE_METHODS
#: The methods whose shared-parameter update under ``step_with`` equals the whole batch's:
#: every method built on the trunk's per-task gradients, and MGDA. GradNorm (a gradient rule
#: of its own weights), GradDrop (a random mask per element) and MGDA-UB (the features differ
#: per micro-batch) weight each micro-batch by itself.
EXACT_GRADIENT_METHODS = ["mgda", *worker.GRAM_METHODS, "cr_mogm_pcgrad"]
#: Loss-level methods linear in the losses with weights fixed during a step: accumulation is
#: exact for every parameter.
LINEAR_LOSS_METHODS = ["uw", "awl", "equal", "dwa", "imtl_l", "multi_noise", "rlw"]
MICRO_BATCHES = 4


def make(method):
    torch.manual_seed(0)
    net = worker.Net()
    if method == "multi_noise":
        return net, fused_mtl.compat.MultiNoiseLoss(worker.NUM_TASKS)
    return net, worker.make_balancer(method, net)


def call(balancer, method, net, inputs, targets):
    features, outputs = net(inputs)
    return worker.balanced_total(balancer, method, features, outputs, targets)


def floating_state(module):
    return {
        name: tensor
        for name, tensor in [*module.named_buffers(), *module.named_parameters()]
        if tensor is not None and tensor.is_floating_point()
    }


# --- half precision ------------------------------------------------------------------------


@pytest.mark.parametrize("cast", ["to_bfloat16", "half", "bfloat16"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_half_precision_casts_keep_the_balancer_state(method, cast):
    net, balancer = make(method)
    inputs, targets = worker.global_batch(1)
    call(balancer, method, net, inputs, targets).backward()
    before = {name: tensor.clone() for name, tensor in floating_state(balancer).items()}
    model = nn.ModuleDict({"net": net, "balancer": balancer})
    if cast == "to_bfloat16":
        model.to(torch.bfloat16)
    else:
        getattr(model, cast)()
    assert net.trunk[0].weight.dtype in (torch.bfloat16, torch.float16)  # the model is cast
    after = floating_state(balancer)
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        assert tensor.dtype == before[name].dtype, f"{method}: {name} became {tensor.dtype}"
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, equal_nan=True)


def test_double_raises_the_balancer_state():
    _, balancer = make("moco")
    balancer.double()
    assert balancer.tracked_gradients.dtype == torch.float64
    assert balancer.lambdas.dtype == torch.float64


def test_dwa_period_means_in_a_bfloat16_model_are_exact():
    """1000 calls of losses [1, 3]: a bfloat16 running sum stops at 256 (the means read
    [0.256, 1.02])."""
    dwa = DWA(2, period_steps=1000).to(torch.bfloat16)
    losses = torch.tensor([1.0, 3.0], dtype=torch.bfloat16)
    for _ in range(1000):
        dwa(losses)
    assert dwa.periods_finished == 1
    torch.testing.assert_close(dwa.period_means[0], torch.tensor([1.0, 3.0]), rtol=0, atol=0)


def test_moco_counts_steps_past_256_in_a_bfloat16_model():
    trunk, head = nn.Linear(2, 2), nn.Linear(2, 2)
    moco = MoCo(trunk.parameters(), 2)
    nn.ModuleList([trunk, head, moco]).to(torch.bfloat16)
    inputs = torch.randn(4, 2, dtype=torch.bfloat16)
    for _ in range(300):
        out = head(torch.tanh(trunk(inputs)))
        moco.backward([out[:, 0].square().mean(), out[:, 1].square().mean()])
    assert float(moco.steps) == 300


@pytest.mark.parametrize(
    "method",
    ["famo", "rlw", "gls", "stch", "dwa", "uw", "imtl_l", "pbi", "cosmos", "uw_so", "go4align"],
)
def test_loss_methods_in_a_bfloat16_model_weight_as_in_float32(method):
    """Fed the same losses, a balancer cast with its bfloat16 model gives the float32 one's
    weights, bit for bit (FAMO's shares stayed uniform: its logits rounded to bfloat16)."""
    balancers = [make(method)[1] for _ in range(2)]
    balancers[1].to(torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        losses = torch.rand(worker.NUM_TASKS, generator=generator) + 0.5
        seen = []
        for balancer in balancers:
            torch.manual_seed(step)
            graph_losses = losses.clone().requires_grad_()
            balancer(graph_losses).backward()
            seen.append(balancer.weights.detach().float().clone())
        torch.testing.assert_close(seen[1], seen[0], rtol=0, atol=0)
    if method == "famo":
        shares = balancers[1].task_shares
        assert float(shares.max() - shares.min()) > 1e-4


# --- calls that are not a step -------------------------------------------------------------


def test_dwa_does_not_count_validation_calls_without_grad():
    """A validation pass in training mode under torch.no_grad() (the balancer outside the
    model that model.eval() switched) is not a step: 3 periods, not 6."""
    counted, plain = DWA(2, period_steps=2), DWA(2, period_steps=2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        losses = torch.rand(2, generator=generator) + 0.1
        counted(losses)
        plain(losses)
        with torch.no_grad():
            counted(torch.rand(2, generator=generator) * 10)
    assert counted.periods_finished == plain.periods_finished == 3
    torch.testing.assert_close(counted.weights, plain.weights, rtol=0, atol=0)


def logged_step(balancer, method, net, inputs, targets, log):
    features, outputs = net(inputs)
    losses = worker.task_losses(outputs, targets)
    if method == "dtp":
        balancer.update_kpis(worker.kpis(outputs, targets))
    extra = {"features": features} if method == "mgda_ub" else {}
    total = balancer(losses, **extra)
    if log:
        logged = balancer(losses, **extra)  # e.g. self.log("total", balancer(losses))
        assert float(logged) == float(total)
    total.backward()


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_logging_call_changes_nothing(method):
    """A second call with the step's losses (logging the total) is not a step: MoCo's t and
    Y, GradVac's targets, ExcessMTL's sums and MoDo's lambdas advanced with it."""
    runs = []
    inputs, targets = worker.global_batch(1)
    for log in (False, True):
        net, balancer = make(method)
        optimizer = torch.optim.SGD([*net.parameters(), *balancer.parameters()], lr=0.05)
        for step in range(3):
            torch.manual_seed(step)
            optimizer.zero_grad()
            logged_step(balancer, method, net, inputs, targets, log)
            optimizer.step()
        runs.append((net, balancer))
    (net, balancer), (logged_net, logged_balancer) = runs
    for name, tensor in balancer.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            other = logged_balancer.state_dict()[name]
            torch.testing.assert_close(other, tensor, rtol=0, atol=0, equal_nan=True, msg=name)
    for mine, theirs in zip(net.parameters(), logged_net.parameters(), strict=True):
        torch.testing.assert_close(theirs, mine, rtol=0, atol=0)


# --- gradient accumulation -----------------------------------------------------------------


def accumulated_run(method, micro_batches, steps=3):
    """``steps`` optimizer steps, each on a batch of its own in ``micro_batches`` parts (1: the
    whole batch, without step_with); the gradients and weights of the last step, and the
    balancer. The learning rate is 0: the runs compare the same model on the same batches,
    whatever the task-specific parameters' gradients (weighted per micro-batch) would do."""
    net, balancer = make(method)
    optimizer = torch.optim.SGD([*net.parameters(), *balancer.parameters()], lr=0.0)
    if micro_batches > 1:
        balancer.step_with(optimizer)
    inputs, targets = worker.global_batch(MICRO_BATCHES)
    for step in range(steps):
        optimizer.zero_grad()
        torch.manual_seed(step)  # the random methods draw once per step
        step_inputs, step_targets = inputs + 0.3 * step, targets * (1 + step)
        for part_inputs, part_targets in zip(
            step_inputs.chunk(micro_batches), step_targets.chunk(micro_batches), strict=True
        ):
            total = call(balancer, method, net, part_inputs, part_targets)
            (total / micro_batches).backward()
        gradients = {name: p.grad.clone() for name, p in net.named_parameters()}
        weights = balancer.weights.detach().clone()
        optimizer.step()
    return gradients, weights, balancer


def assert_same_state(balancer, other, rtol, atol):
    for name, tensor in balancer.state_dict().items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            theirs = other.state_dict()[name]
            torch.testing.assert_close(
                theirs, tensor, rtol=rtol, atol=atol, equal_nan=True, msg=name
            )


@pytest.mark.parametrize("method", EXACT_GRADIENT_METHODS)
def test_accumulated_gram_update_equals_the_whole_batch(method):
    """Four micro-batches under step_with give the shared parameters the whole batch's
    update, with its weights and state, at every optimizer step."""
    whole, whole_weights, whole_balancer = accumulated_run(method, 1)
    parts, part_weights, part_balancer = accumulated_run(method, MICRO_BATCHES)
    torch.testing.assert_close(part_weights, whole_weights, rtol=1e-4, atol=1e-6)
    for name, gradient in whole.items():
        if name.startswith("trunk"):
            torch.testing.assert_close(parts[name], gradient, rtol=1e-4, atol=1e-7, msg=name)
    assert_same_state(whole_balancer, part_balancer, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", LINEAR_LOSS_METHODS)
def test_accumulated_linear_loss_methods_equal_the_whole_batch(method):
    whole, whole_weights, whole_balancer = accumulated_run(method, 1)
    parts, part_weights, part_balancer = accumulated_run(method, MICRO_BATCHES)
    torch.testing.assert_close(part_weights, whole_weights, rtol=1e-5, atol=1e-7)
    for name, gradient in whole.items():
        torch.testing.assert_close(parts[name], gradient, rtol=1e-4, atol=1e-7, msg=name)
    assert_same_state(whole_balancer, part_balancer, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["famo", "gls", "stch", "pbi", "cosmos", "uw_so", "go4align"])
def test_accumulated_loss_objectives_end_at_the_whole_batch_weights_and_state(method):
    """A nonlinear objective weights each micro-batch at the mean losses of the step so far:
    the step's last weights and the state are the whole batch's (the earlier micro-batches'
    gradients are weighted at their partial means: the documented approximation)."""
    _, whole_weights, whole_balancer = accumulated_run(method, 1)
    _, part_weights, part_balancer = accumulated_run(method, MICRO_BATCHES)
    torch.testing.assert_close(part_weights, whole_weights, rtol=1e-5, atol=1e-7)
    assert_same_state(whole_balancer, part_balancer, rtol=1e-5, atol=1e-7)


class ConvTrunk(nn.Module):
    """Two convolutions (no batch norm: its statistics are the micro-batch's by design)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 3, stride=2), nn.GELU()
        )

    def forward(self, images):
        return self.layers(images).flatten(1)


class TransformerTrunk(nn.Module):
    """One encoder layer over 5 tokens, mean-pooled."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, tokens):
        return self.layer(tokens).mean(1)


TRUNKS = {
    "conv": (ConvTrunk, (3, 8, 8), 72),
    "transformer": (TransformerTrunk, (5, 16), 16),
}


@pytest.mark.parametrize(
    "method",
    [
        fused_mtl.UPGrad,
        fused_mtl.MGDA,
        fused_mtl.CAGrad,
        fused_mtl.NTKMTL,
        fused_mtl.TrimmedMean,
        fused_mtl.DBMTL,
        fused_mtl.CRMOGM,
    ],
)
@pytest.mark.parametrize("trunk_kind", TRUNKS)
def test_accumulated_update_of_a_conv_or_transformer_trunk_is_the_whole_batch(trunk_kind, method):
    """Two optimizer steps of 4 micro-batches of 8 under step_with: at each, the trunk's
    gradient is the one a call on the 32 samples' mean losses gives.

    DB-MTL runs in float64: it rescales every task's log-loss gradient to the largest norm, and
    on the conv trunk those cancel in the sum, so float32 rounding of the two ways of summing
    the batch reaches 5e-6 of the update's largest entry (float64: 1e-17)."""
    make_trunk, sample_shape, features = TRUNKS[trunk_kind]
    dtype = torch.float64 if method is fused_mtl.DBMTL else torch.float32
    relative = 1e-12 if dtype == torch.float64 else 1e-6
    generator = torch.Generator().manual_seed(3)
    batches = [
        (
            torch.randn(32, *sample_shape, generator=generator, dtype=dtype),
            torch.randn(32, 3, generator=generator, dtype=dtype),
        )
        for _ in range(2)
    ]
    runs = []
    for micro_batches in (1, MICRO_BATCHES):
        torch.manual_seed(0)
        trunk, heads = make_trunk().to(dtype), nn.Linear(features, 3).to(dtype)
        balancer = method(trunk.parameters(), 3)
        # The trunk alone is stepped: its update is exact, the heads' is the documented
        # approximation (each micro-batch at the weights of the step so far).
        optimizer = torch.optim.SGD(trunk.parameters(), lr=0.05)
        if micro_batches > 1:
            balancer.step_with(optimizer)
        gradients = []
        for inputs, targets in batches:
            optimizer.zero_grad()
            for part_inputs, part_targets in zip(
                inputs.chunk(micro_batches), targets.chunk(micro_batches), strict=True
            ):
                losses = (heads(trunk(part_inputs)) - part_targets).square().mean(0)
                (balancer(losses) / micro_batches).backward()
            gradients.append([p.grad.clone() for p in trunk.parameters()])
            optimizer.step()
        runs.append(gradients)
    whole, accumulated = runs
    for step, (expected, got) in enumerate(zip(whole, accumulated, strict=True)):
        for index, (e, g) in enumerate(zip(expected, got, strict=True)):
            scale = float(e.abs().max())
            torch.testing.assert_close(
                g,
                e,
                rtol=100 * relative,
                atol=relative * scale,
                msg=f"step {step}, trunk tensor {index}",
            )


def test_famo_takes_one_logit_step_per_optimizer_step():
    _, _, famo = accumulated_run("famo", MICRO_BATCHES, steps=4)
    assert float(famo.logit_steps) == 3  # the first step has nothing to compare with


def test_step_with_ends_with_its_handle_and_is_not_copied():
    net, moco = make("moco")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    inputs, targets = worker.global_batch(2)
    handle = moco.step_with(optimizer)
    for part in range(2):
        call(moco, "moco", net, inputs[part::2], targets[part::2]).backward()
    assert float(moco.steps) == 1  # two micro-batches of one optimizer step
    copies = copy.deepcopy(nn.ModuleDict({"net": net, "moco": moco}))
    for part in range(2):
        call(copies.moco, "moco", copies.net, inputs[part::2], targets[part::2]).backward()
    assert float(copies.moco.steps) == 3  # a copy is tied to no optimizer
    handle.remove()
    for part in range(2):
        call(moco, "moco", net, inputs[part::2], targets[part::2]).backward()
    assert float(moco.steps) == 3


def test_a_skipped_optimizer_step_is_dropped_by_the_gradient_methods():
    """A GradScaler that skips a step for an overflow calls no optimizer step; zero_grad then
    sets the gradients to None: the next micro-batch starts a step from the same state, and
    its update is its own (the dropped step's gradients are not completed into it)."""
    inputs, targets = worker.global_batch(2)
    results = []
    for skipped in (True, False):
        net, moco = make("moco")
        optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
        moco.step_with(optimizer)
        if skipped:
            call(moco, "moco", net, inputs[::2], targets[::2]).backward()
            optimizer.zero_grad()  # the scaler found an inf: no optimizer.step()
        call(moco, "moco", net, inputs[1::2], targets[1::2]).backward()
        results.append((float(moco.steps), [p.grad.clone() for p in net.trunk.parameters()]))
    (steps, gradients), (fresh_steps, fresh) = results
    assert steps == fresh_steps == 1
    for mine, theirs in zip(gradients, fresh, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_lightning_accumulate_grad_batches_steps_the_state_once_per_optimizer_step():
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = worker.Net()
            self.moco = MoCo(self.net.trunk.parameters(), worker.NUM_TASKS)
            self.famo = FAMO(worker.NUM_TASKS)

        def training_step(self, batch, _):
            inputs, targets = batch
            _, outputs = self.net(inputs)
            losses = worker.task_losses(outputs, targets)
            return self.moco(losses) + self.famo(losses)

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.net.parameters(), lr=0.01)
            self.moco.step_with(optimizer)
            self.famo.step_with(optimizer)
            return optimizer

    inputs, targets = worker.global_batch(4)
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, targets), batch_size=LOCAL
    )
    module = Module()
    trainer = lightning.Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    assert trainer.global_step == 2  # 4 micro-batches, 2 optimizer steps
    assert float(module.moco.steps) == 2
    assert float(module.famo.logit_steps) == 1


LOCAL = worker.LOCAL_BATCH
