"""The Gram one shared layer at a time (``fused_mtl.ops.layer_gram``) on real trunks: each
layer rule against the Gram of the per-task gradients from ``torch.autograd.grad`` in float64,
and what the first call does with a model whose parameters the layers do not cover."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fused_mtl
from fused_mtl import MGDA, UPGrad
from fused_mtl.ops.layer_gram.linear import ghost_is_cheaper

NUM_TASKS = 3


class Residual(nn.Module):
    """A ResNet-style block: two 3 x 3 convolutions with BatchNorm and a skip connection."""

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=groups, bias=False)
        self.norm2 = nn.BatchNorm2d(channels)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.norm1(self.conv1(inputs)))
        return torch.relu(inputs + self.norm2(self.conv2(hidden)))


class ConvTrunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Residual(8, groups=2)
        self.reflect = nn.Conv2d(8, 6, 3, stride=2, padding=1, padding_mode="reflect")
        self.same = nn.Conv2d(6, 6, 2, padding="same")
        self.group_norm = nn.GroupNorm(3, 6)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.block(torch.relu(self.stem(inputs)))
        return self.group_norm(self.same(torch.relu(self.reflect(hidden)))).mean((2, 3))


class SequenceTrunk(nn.Module):
    """Token embedding (with a padding index), a 2-layer transformer encoder, RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 8, padding_idx=0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.RMSNorm(8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.encoder(self.embed(tokens))).mean(1)


class SignalTrunk(nn.Module):
    """Conv1d, Conv3d on an unbatched input, a big vocabulary seen sparsely, PReLU (no rule
    of its own: the generic one), an Embedding scaled by frequency."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3)
        self.volume = nn.Conv3d(2, 6, 2)
        self.prelu = nn.PReLU(6)
        self.words = nn.Embedding(1000, 6, scale_grad_by_freq=True)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        signal, volume, words = inputs
        unbatched = self.volume(volume).mean((1, 2, 3))  # (C, D, H, W) -> (6,)
        return self.prelu(self.conv(signal)).mean(2) + unbatched + self.words(words).mean(1)


class TiedTrunk(nn.Module):
    """A layer called twice, and a weight tied between two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 6)
        self.second.weight = self.first.weight
        self.norm = nn.LayerNorm(6)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.first(torch.tanh(self.first(inputs))))
        return self.norm(self.second(hidden))


def _mlp() -> tuple[nn.Module, object, int]:
    trunk = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh())
    return trunk, torch.randn(12, 5), 16


def _tall_mlp() -> tuple[nn.Module, object, int]:
    # 64 rows against 3 x 4 features: the per-task gradients, not the rows' products.
    trunk = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 6))
    return trunk, torch.randn(64, 3), 6


def _conv() -> tuple[nn.Module, object, int]:
    return ConvTrunk(), torch.randn(4, 3, 8, 8), 6


def _sequence() -> tuple[nn.Module, object, int]:
    tokens = torch.randint(0, 40, (3, 7))
    tokens[0, -2:] = 0  # padding
    return SequenceTrunk(), tokens, 8


def _signal() -> tuple[nn.Module, object, int]:
    inputs = (torch.randn(5, 4, 9), torch.randn(2, 3, 3, 3), torch.randint(0, 30, (5, 4)))
    inputs[2][0, :2] = 7  # a repeated word: its row is scaled by 1 / count
    return SignalTrunk(), inputs, 6


def _tied() -> tuple[nn.Module, object, int]:
    return TiedTrunk(), torch.randn(7, 6), 6


TRUNKS = {
    "mlp": _mlp,
    "tall_mlp": _tall_mlp,
    "conv_batchnorm": _conv,
    "transformer": _sequence,
    "conv1d_conv3d_embedding": _signal,
    "tied_and_reused": _tied,
}


def _cast(inputs: object, dtype: torch.dtype) -> object:
    if isinstance(inputs, tuple):
        return tuple(_cast(value, dtype) for value in inputs)
    assert isinstance(inputs, torch.Tensor)
    return inputs.to(dtype) if inputs.is_floating_point() else inputs


def _task_losses(trunk: nn.Module, heads: nn.ModuleList, inputs: object) -> list[torch.Tensor]:
    features = trunk(inputs)
    return [(head(features) - index).square().mean() for index, head in enumerate(heads)]


def _reference_gram(trunk: nn.Module, heads: nn.ModuleList, inputs: object) -> torch.Tensor:
    """The Gram of the per-task gradients of every trunk parameter, from ``torch.autograd``
    in float64 on a float64 copy."""
    trunk, heads = copy.deepcopy(trunk).double(), copy.deepcopy(heads).double()
    losses = _task_losses(trunk, heads, _cast(inputs, torch.float64))
    shared = list(trunk.parameters())
    rows = [
        torch.cat([grad.flatten() for grad in torch.autograd.grad(loss, shared, retain_graph=True)])
        for loss in losses
    ]
    jacobian = torch.stack(rows)
    return jacobian @ jacobian.T


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(TRUNKS))
def test_the_layers_gram_is_the_gram_of_the_per_task_gradients(name, dtype, training):
    """Every rule, on every trunk, in training and in eval mode (BatchNorm's batch statistics,
    then its running ones): the Gram equals the per-task gradients' to float64 rounding in
    float64, and to float32 rounding (relative 1e-5) in float32."""
    torch.manual_seed(3)
    trunk, inputs, width = TRUNKS[name]()
    heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(NUM_TASKS))
    trunk.train(training)
    if not training and name == "conv_batchnorm":
        trunk.train()
        for _ in range(3):  # running statistics that are not the defaults
            trunk(inputs * 2 + 1)
        trunk.eval()
    expected = _reference_gram(trunk, heads, inputs)
    trunk, heads = trunk.to(dtype), heads.to(dtype)
    mgda = MGDA(trunk, NUM_TASKS)
    for _ in range(2):  # the first call (checked) and a later one
        mgda(_task_losses(trunk, heads, _cast(inputs, dtype)))
        assert mgda.gradient_mode == "layers", mgda.gradient_mode_reason
        rtol = 1e-10 if dtype == torch.float64 else 1e-5
        scale = float(expected.abs().max())
        torch.testing.assert_close(mgda.gram, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize(
    ("rows", "inputs", "outputs", "ghost"),
    [(128, 1024, 1024, True), (2048, 256, 1024, False), (64, 3, 4, False)],
)
def test_the_linear_rule_takes_the_cheaper_way(rows, inputs, outputs, ghost):
    """The rows' products at batch 128 on a 1024 x 1024 layer; the per-task gradients when
    the rows outnumber the features (a transformer's batch x sequence)."""
    assert ghost_is_cheaper(rows, inputs, outputs, 8) is ghost


class _HeadReadsTrunkWeight(nn.Module):
    """A head that multiplies by the trunk's weight directly, outside the layer's call."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 4), nn.Tanh())

    def losses(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        features = self.trunk(inputs)
        tied = features @ self.trunk[0].weight  # a share no hook sees
        return [features.square().mean(), tied[:, 0].mean(), (tied + features).mean()]


def test_a_weight_used_outside_its_layer_takes_the_per_task_gradients():
    """The first call's check sees the missing share: ``"auto"`` takes the per-task gradients
    from then on (the exact Gram, and says why); ``"layers"`` refuses, naming the fault."""
    torch.manual_seed(4)
    net = _HeadReadsTrunkWeight().double()
    inputs = torch.randn(6, 4, dtype=torch.float64)
    shared = list(net.trunk.parameters())
    upgrad = UPGrad(net.trunk, 3)
    losses = net.losses(inputs)
    rows = [
        torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
        for loss in losses
    ]
    expected = torch.stack(rows) @ torch.stack(rows).T
    upgrad(losses)
    assert upgrad.gradient_mode == "batched"
    assert "used outside its layer's call" in upgrad.gradient_mode_reason
    torch.testing.assert_close(upgrad.gram, expected, rtol=1e-10, atol=1e-12)
    assert not upgrad._layer_gram.engine._hooks  # taken off the layers

    strict = UPGrad(net.trunk, 3, per_task_gradients="layers")
    with pytest.raises(
        RuntimeError, match=r"per_task_gradients=.layers. cannot be used .* outside"
    ):
        strict(net.losses(inputs))


def test_a_task_that_does_not_reach_the_trunk_is_named():
    trunk = nn.Linear(3, 3)
    mgda = MGDA(trunk, tasks=["a", "b"])
    features = trunk(torch.randn(4, 3))
    with pytest.raises(ValueError, match="task 'b': its loss does not depend on the shared"):
        mgda([features.square().mean(), torch.randn(2, requires_grad=True).sum()])


def test_a_compiled_model_takes_the_per_task_gradients():
    """torch.compile runs no hooks inside its graph: no layer call is recorded, and ``"auto"``
    takes the per-task gradients, saying why."""
    torch.manual_seed(5)
    trunk = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(2))
    mgda = MGDA(trunk, 2)
    compiled = torch.compile(trunk, backend="eager")
    features = compiled(torch.randn(5, 4))
    mgda([head(features).mean() for head in heads])
    assert mgda.gradient_mode == "batched"
    assert "torch.compile" in mgda.gradient_mode_reason


def test_autocast_keeps_the_layers_gram_within_bfloat16_rounding():
    """Under autocast the layers run in bfloat16: the first call's check allows bfloat16's
    rounding, and the Gram is the float32 one to that rounding."""
    torch.manual_seed(6)
    trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(NUM_TASKS))
    inputs = torch.randn(10, 8)
    expected = _reference_gram(trunk, heads, inputs)
    mgda = MGDA(trunk, NUM_TASKS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _task_losses(trunk, heads, inputs)
    mgda([loss.float() for loss in losses])
    assert mgda.gradient_mode == "layers", mgda.gradient_mode_reason
    scale = float(expected.abs().max())
    torch.testing.assert_close(mgda.gram, expected, rtol=0.05, atol=0.05 * scale)


def test_methods_that_need_the_gradients_themselves_refuse_the_layers():
    with pytest.raises(ValueError, match="needs the per-task gradients themselves"):
        fused_mtl.MoCo(nn.Linear(3, 3), 2, per_task_gradients="layers")
    assert fused_mtl.MoCo(nn.Linear(3, 3), 2)._layer_gram is None


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one_task_per_pass"])
@pytest.mark.parametrize("name", ["mlp", "conv_batchnorm", "transformer", "tied_and_reused"])
def test_both_ways_of_running_the_backward_give_the_gram(name, batched):
    """The K tasks in one vmapped backward, or one backward per task (each call's rows held
    until the last): the same Gram, the per-task gradients' (float64)."""
    from fused_mtl.ops.layer_gram import LayerGram

    torch.manual_seed(9)
    trunk, inputs, width = TRUNKS[name]()
    heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(NUM_TASKS))
    expected = _reference_gram(trunk, heads, inputs)
    trunk, heads = trunk.double(), heads.double()
    engine = LayerGram(trunk, batched=batched)
    gram = engine(torch.stack(_task_losses(trunk, heads, _cast(inputs, torch.float64))))
    scale = float(expected.abs().max())
    torch.testing.assert_close(gram, expected, rtol=1e-10, atol=1e-10 * scale)


def test_off_cuda_the_faster_way_is_kept_after_two_calls(monkeypatch):
    """The first call runs the backward batched, the second one task at a time; the faster of
    the two is kept from the third call on."""
    from fused_mtl.ops.layer_gram import choice

    clock = iter([0.0, 5.0, 10.0, 11.0])  # batched: 5 s, one task at a time: 1 s
    monkeypatch.setattr(choice.time, "perf_counter", lambda: next(clock))
    trunk = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(2))
    mgda = MGDA(trunk, 2)
    engine = mgda._layer_gram.engine
    seen = []
    original = type(engine).__call__

    def spy(self, *args, **kwargs):
        seen.append(self.batched)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(engine), "__call__", spy)
    for _ in range(3):
        features = trunk(torch.randn(5, 4))
        mgda([head(features).mean() for head in heads])
    assert seen == [True, False, False]
    assert engine.batched is False


class _ScaledByItsMean(torch.autograd.Function):
    """``x * mean(x)`` with the mean held constant, whose backward reads its gradient on the
    host: functorch cannot batch it."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor) -> torch.Tensor:
        ctx.scale = float(inputs.mean())
        return inputs * ctx.scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        finite = bool(torch.isfinite(grad).all())  # a host read of the gradient
        return grad * ctx.scale if finite else grad


class _HostReadingTrunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 6), nn.Linear(6, 5)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(_ScaledByItsMean.apply(self.first(inputs)) + 1))


def test_a_backward_that_cannot_be_batched_runs_one_task_at_a_time():
    """The first call's batched backward fails (an operation functorch cannot batch): the
    layers' Gram is taken one task at a time instead, from then on, and says so."""
    torch.manual_seed(10)
    trunk = _HostReadingTrunk().double()
    heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(NUM_TASKS)).double()
    inputs = torch.randn(7, 4, dtype=torch.float64)
    expected = _reference_gram(trunk, heads, inputs)
    mgda = MGDA(trunk, NUM_TASKS)
    for _ in range(2):
        mgda(_task_losses(trunk, heads, inputs))
        assert mgda.gradient_mode == "layers", mgda.gradient_mode_reason
        assert "one task at a time: the batched backward failed" in mgda.gradient_mode_reason
        assert mgda._layer_gram.engine.batched is False
        scale = float(expected.abs().max())
        torch.testing.assert_close(mgda.gram, expected, rtol=1e-10, atol=1e-10 * scale)


def _per_task_gram(losses: list[torch.Tensor], shared: list[torch.Tensor]) -> torch.Tensor:
    rows = [
        torch.cat([g.flatten() for g in torch.autograd.grad(loss, shared, retain_graph=True)])
        for loss in losses
    ]
    return torch.stack(rows) @ torch.stack(rows).T


def _assert_gram(gram: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(gram, expected, rtol=1e-10, atol=1e-10 * scale)


def test_the_calls_are_those_of_the_losses_graph():
    """The losses' own forward pass, found in their graph: not a later forward pass with grad
    (validation, logging), and again for a second combination of the same outputs."""
    torch.manual_seed(11)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8)).double()
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3)).double()
    inputs = torch.randn(6, 4, dtype=torch.float64)
    mgda = MGDA(trunk, 3)
    for _ in range(3):  # batched, one task at a time, then the faster
        features = trunk(inputs)
        first = [head(features).square().mean() for head in heads]
        trunk(torch.randn(5, 4, dtype=torch.float64))  # another forward pass with grad
        mgda(first)
        _assert_gram(mgda.gram, _per_task_gram(first, list(trunk.parameters())))
        second = [head(features).abs().mean() for head in heads]
        mgda(second)
        assert mgda.gradient_mode == "layers", mgda.gradient_mode_reason
        _assert_gram(mgda.gram, _per_task_gram(second, list(trunk.parameters())))


class _LoRALinear(nn.Linear):
    """A linear layer with a low-rank adapter: extra parameters and its own forward."""

    def __init__(self, width: int) -> None:
        super().__init__(width, width)
        self.down = nn.Parameter(torch.randn(2, width) * 0.3)
        self.up = nn.Parameter(torch.randn(width, 2) * 0.3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return super().forward(inputs) + inputs @ self.down.T @ self.up.T


def test_layers_that_are_not_torch_s_own_take_the_generic_rule():
    """A parametrized layer (weight_norm: its weight is computed from two parameters), a
    subclass with its own forward and parameters (LoRA), called twice, and a module registered
    under two parents (hooked once): the Gram of their parameters' per-task gradients."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(12)
    block = nn.Linear(6, 6)
    trunk = nn.ModuleDict(
        {
            "normed": weight_norm(nn.Linear(6, 6)),
            "adapted": _LoRALinear(6),
            "first": nn.Sequential(block, nn.Tanh()),
            "second": nn.Sequential(block),
        }
    ).double()

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(trunk["normed"](inputs))
        hidden = trunk["adapted"](torch.tanh(trunk["adapted"](hidden)))
        return trunk["second"](trunk["first"](hidden))

    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(3)).double()
    inputs = torch.randn(4, 6, dtype=torch.float64)
    upgrad = UPGrad(trunk, 3)
    for _ in range(3):
        features = forward(inputs)
        losses = [(head(features) - index).square().mean() for index, head in enumerate(heads)]
        expected = _per_task_gram(losses, list(trunk.parameters()))
        upgrad(losses)
        assert upgrad.gradient_mode == "layers", upgrad.gradient_mode_reason
        _assert_gram(upgrad.gram, expected)


def test_the_first_call_checks_each_task_against_its_own_norm():
    """A task whose loss is 2000 times smaller than another's and that uses a trunk weight
    outside its layer's call: the check sees its share missing, and the Gram is exact."""
    torch.manual_seed(13)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh()).double()
    head = nn.Linear(8, 1).double()
    mgda = MGDA(trunk, 2)
    features = trunk(torch.randn(6, 4, dtype=torch.float64))
    losses = [
        (head(features) - 3).square().mean() * 100,
        (features @ trunk[0].weight).square().mean() * 0.05,
    ]
    expected = _per_task_gram(losses, list(trunk.parameters()))
    mgda(losses)
    assert mgda.gradient_mode == "batched"
    assert "task 1" in mgda.gradient_mode_reason
    _assert_gram(mgda.gram, expected)


def test_a_copy_of_the_model_and_its_balancer_takes_the_layers_gram_and_torch_func_works():
    """copy.deepcopy of model and balancer together: the copy hooks its own layers. The hooks
    leave torch.func transforms of the model alone (per-sample gradients)."""
    torch.manual_seed(14)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8)).double()
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(2)).double()
    whole = nn.ModuleDict({"trunk": trunk, "heads": heads, "mgda": MGDA(trunk, 2)})
    inputs = torch.randn(5, 4, dtype=torch.float64)
    copied = copy.deepcopy(whole)
    for model in (whole, copied):
        features = model["trunk"](inputs)
        losses = [head(features).square().mean() for head in model["heads"]]
        expected = _per_task_gram(losses, list(model["trunk"].parameters()))
        model["mgda"](losses)
        assert model["mgda"].gradient_mode == "layers", model["mgda"].gradient_mode_reason
        _assert_gram(model["mgda"].gram, expected)

    parameters = dict(trunk.named_parameters())

    def summed(values, sample):
        return torch.func.functional_call(trunk, values, (sample,)).sum()

    per_sample = torch.func.vmap(torch.func.grad(summed), in_dims=(None, 0))(parameters, inputs)
    for name, parameter in parameters.items():
        expected = torch.stack(
            [torch.autograd.grad(trunk(sample).sum(), parameter)[0] for sample in inputs]
        )
        torch.testing.assert_close(per_sample[name], expected)
