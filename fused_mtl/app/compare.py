r"""Which balancing method helps on a problem: each method trained the same way as single-task
models, compared by the relative multi-task performance :math:`\Delta m\%` over several seeds.

For a method :math:`m` with test metrics :math:`M_{m,k}` on tasks :math:`k = 1..K`, against the
single-task models' :math:`M_{b,k}` (Maninis et al., 2019; Vandenhende et al., 2021):

.. math::

    \Delta m\% = \frac{100}{K} \sum_{k=1}^{K} (-1)^{l_k}\,\frac{M_{m,k} - M_{b,k}}{M_{b,k}}

with :math:`l_k = 1` when a lower :math:`M_k` is better (an error), 0 when a higher one is (an
accuracy): positive is better than training each task alone. :math:`M_{b,k}` is the mean over the
seeds of the single-task models' test metric; each seed's :math:`\Delta m\%` is reported as the
mean ± the standard deviation over seeds, and the single-task row's own spread around 0 is the
noise floor a method's difference has to clear.

How each run is trained, for every method alike:

- **The same start.** ``torch.manual_seed(seed)`` before the model is built: at a seed, every
  method and every single-task model starts from the same weights.
- **The same batches.** The global generator is reseeded from ``(seed, epoch)`` at the start of
  every epoch, so a loader that shuffles with it (``TensorBatches``, a ``DataLoader`` without a
  generator of its own) gives every method the same batch order, whatever random numbers the
  method draws itself (RLW's weights, GradDrop's masks).
- **Adam** with the problem's learning rate; the balancer's own parameters (uncertainty
  weighting's log-variances, GradNorm's weights) learn at ``balancer_lr``.
- **Selection on validation.** After every epoch the validation metrics are measured; the run
  keeps the epoch with the best validation :math:`\Delta m\%` against the same seed's
  single-task validation metrics (a single-task model: its own metric), and its test metrics
  are measured once, from that epoch's weights.
- **Single-task models** are the same network trained on one task's loss alone (the other heads
  get no gradient), one model per task and seed.
- **Methods' settings** are :func:`fused_mtl.app.demo.build_balancer`'s (the demo's): defaults
  from each paper, DWA's period one epoch, DTP's KPI of a task
  ``clamp(1 - L_val(t) / L_val(0), 0, 1)`` reported after every epoch, GradNorm on the last
  shared layer, MGDA with ``"l2"`` normalisation. Methods given the shared layers as a module
  take the per-task Gram layer by layer (:mod:`fused_mtl.ops.layer_gram`).
- A run whose losses turn non-finite (``FloatingPointError``) is recorded as diverged, with the
  epoch and the message, and the comparison goes on; any other error stops it.

Example (a toy problem, two seeds, two methods):
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> inputs = torch.randn(96, 4)
    >>> targets = (inputs[:, 0] * 2, inputs[:, 1] - inputs[:, 2])
    >>> def split(rows):
    ...     return TensorBatches(inputs[rows], [t[rows] for t in targets], batch_size=16)
    >>> def factory():
    ...     trunk = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    ...     return MultiHeadNet(trunk, [torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)])
    >>> tasks = [regression_task("a"), regression_task("b")]
    >>> result = compare(factory, tasks, split(slice(0, 64)), split(slice(64, 80)),
    ...                  split(slice(80, 96)), methods=["equal", "uw"], seeds=[0, 1], epochs=3)
    >>> [row["method"] for row in result.rows()]
    ['single_task', 'equal', 'uw']
    >>> len(result.delta_m("uw"))  # one per seed
    2
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fused_mtl import DTP
from fused_mtl._losses import raise_if_not_finite
from fused_mtl.balancer import Balancer

__all__ = [
    "DEFAULT_METHODS",
    "SINGLE_TASK",
    "Comparison",
    "MultiHeadNet",
    "Run",
    "Task",
    "TaskRun",
    "TensorBatches",
    "Trainer",
    "accuracy_task",
    "binary_task",
    "compare",
    "regression_task",
    "resolve_methods",
    "single_task_run",
]

#: The name of the single-task models' row.
SINGLE_TASK = "single_task"
#: What ``fused-mtl compare`` runs by default: equal weighting, and methods of every family:
#: loss weighting (uncertainty weighting, DWA), random weights (RLW, the baseline of Lin et
#: al.'s finding that many methods do not beat random weighting), loss-level (FAMO), gradient
#: norms (GradNorm), the Gram family (MGDA, PCGrad, CAGrad, UPGrad, Nash-MTL) and a stochastic
#: gradient method (MoCo).
DEFAULT_METHODS = (
    "equal",
    "uw",
    "dwa",
    "rlw",
    "famo",
    "gradnorm",
    "mgda",
    "pcgrad",
    "cagrad",
    "upgrad",
    "nash_mtl",
    "moco",
)
# As in the demo: the balancers' own parameters (uncertainty weighting's s_i, which travels to
# log L_i, 12 for a loss in grams squared) learn faster than the network.
BALANCER_LR = 2.5e-2


@dataclass(frozen=True)
class Task:
    """One task: its loss, the metric it is judged by, and which way that metric is better.

    ``loss(output, target)`` is the scalar training loss of a batch. ``metric(output, target)``
    gives per-example values (a tensor of any shape), averaged over every element of a split:
    an accuracy (``1.0`` per right answer), an absolute error. A metric that is not a mean of
    per-example values (mIoU, AUC) does not fit this form.
    """

    name: str
    loss: Callable[[Tensor, Tensor], Tensor]
    metric: Callable[[Tensor, Tensor], Tensor]
    metric_name: str
    higher_is_better: bool


def accuracy_task(name: str) -> Task:
    """A classification task: cross-entropy of ``(N, C)`` logits, judged by accuracy."""
    return Task(name, F.cross_entropy, _right_class, "accuracy", higher_is_better=True)


def binary_task(name: str) -> Task:
    """A binary task: logistic loss of ``(N, 1)`` logits against 0/1 targets, judged by
    accuracy at probability 0.5."""
    return Task(name, _logistic_loss, _right_side, "accuracy", higher_is_better=True)


def regression_task(name: str, unit: str = "") -> Task:
    """A regression task: mean squared error of ``(N, 1)`` outputs, judged by the mean absolute
    error (in ``unit``)."""
    metric_name = f"MAE ({unit})" if unit else "MAE"
    return Task(name, _squared_error, _absolute_error, metric_name, higher_is_better=False)


def _right_class(output: Tensor, target: Tensor) -> Tensor:
    if target.shape != output.shape[:1] + output.shape[2:]:
        raise ValueError(
            f"class indices of shape {tuple(target.shape)} do not match logits of shape "
            f"{tuple(output.shape)} (the accuracy takes class indices, not one-hot targets)"
        )
    return (output.argmax(dim=1) == target).float()


def _one_per_target(output: Tensor, target: Tensor) -> Tensor:
    """``output`` shaped as ``target``: ``(N, 1)`` outputs for ``(N,)`` targets lose their last
    dimension; any other mismatch is an error (broadcasting would silently pair every output
    with every target)."""
    if output.shape == target.shape:
        return output
    if output.shape[-1:] == (1,) and output.shape[:-1] == target.shape:
        return output.squeeze(-1)
    raise ValueError(
        f"outputs of shape {tuple(output.shape)} do not match targets of shape "
        f"{tuple(target.shape)}"
    )


def _logistic_loss(output: Tensor, target: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(_one_per_target(output, target), target.float())


def _right_side(output: Tensor, target: Tensor) -> Tensor:
    return ((_one_per_target(output, target) > 0) == (target > 0.5)).float()


def _squared_error(output: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(_one_per_target(output, target), target.float())


def _absolute_error(output: Tensor, target: Tensor) -> Tensor:
    return (_one_per_target(output, target) - target).abs()


class MultiHeadNet(nn.Module):
    """A shared ``trunk`` and one head per task: ``forward`` returns the K heads' outputs."""

    def __init__(self, trunk: nn.Module, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)

    def forward(self, inputs: Tensor) -> list[Tensor]:
        features = self.trunk(inputs)
        return [head(features) for head in self.heads]


class TensorBatches:
    """Batches of ``(inputs, targets)`` from tensors held in memory, reshuffled at every pass
    (by the global generator) when ``shuffle``; a ``DataLoader`` over a ``TensorDataset`` without
    its per-example indexing. ``targets`` holds one tensor per task, rows aligned with
    ``inputs``."""

    def __init__(
        self, inputs: Tensor, targets: Sequence[Tensor], batch_size: int, shuffle: bool = True
    ) -> None:
        for task, target in enumerate(targets):
            if target.shape[0] != inputs.shape[0]:
                raise ValueError(
                    f"task {task}: {target.shape[0]} target rows for {inputs.shape[0]} inputs"
                )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.inputs, self.targets = inputs, tuple(targets)
        self.batch_size, self.shuffle = batch_size, shuffle

    def __len__(self) -> int:
        return -(-self.inputs.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, tuple[Tensor, ...]]]:
        count = self.inputs.shape[0]
        order = torch.randperm(count) if self.shuffle else torch.arange(count)
        order = order.to(self.inputs.device)
        for start in range(0, count, self.batch_size):
            rows = order[start : start + self.batch_size]
            yield self.inputs[rows], tuple(target[rows] for target in self.targets)


@dataclass(frozen=True)
class Run:
    """One method (or the single-task models) at one seed: the metrics of its selected epoch."""

    method: str
    seed: int
    validation: tuple[float, ...]  # per task, at the selected epoch
    test: tuple[float, ...]  # per task, from the selected epoch's weights
    selected_epoch: int  # 1-based (the single-task models': the median over the tasks)
    seconds_per_epoch: float  # median training time of an epoch (evaluation excluded)
    diverged: str | None = None  # why the run stopped early, if it did


@dataclass(frozen=True)
class TaskRun:
    """One single-task model: task ``task`` at one seed."""

    seed: int
    task: int
    validation: float
    test: float
    selected_epoch: int
    seconds_per_epoch: float
    diverged: str | None = None


def single_task_run(seed: int, task_runs: Sequence[TaskRun]) -> Run:
    """The single-task models of one seed as one row: task k's metrics from model k, the median
    of their selected epochs, the seconds of an epoch of all of them together."""
    ordered = sorted(task_runs, key=lambda run: run.task)
    diverged = [f"task {run.task}: {run.diverged}" for run in ordered if run.diverged]
    return Run(
        SINGLE_TASK,
        seed,
        tuple(run.validation for run in ordered),
        tuple(run.test for run in ordered),
        round(statistics.median(run.selected_epoch for run in ordered)),
        sum(run.seconds_per_epoch for run in ordered),
        "; ".join(diverged) or None,
    )


@dataclass
class Comparison:
    """Every run of a comparison, and :math:`\\Delta m\\%` from them."""

    problem: str
    task_names: tuple[str, ...]
    metric_names: tuple[str, ...]
    higher_is_better: tuple[bool, ...]
    epochs: int
    runs: dict[str, list[Run]] = field(default_factory=dict)  # by method, one per seed
    #: The methods that cannot be built for this problem (Krum and the trimmed mean need 3
    #: tasks), each with the error it raised; their ``runs`` are empty.
    not_run: dict[str, str] = field(default_factory=dict)

    def baseline(self) -> tuple[float, ...]:
        """The single-task models' test metrics, mean over seeds: :math:`M_{b,k}`."""
        return _mean_over(self.runs[SINGLE_TASK], "test")

    def delta_m(self, method: str) -> list[float]:
        """:math:`\\Delta m\\%` of each seed's run of ``method`` (diverged runs left out)."""
        baseline = self.baseline()
        return [
            delta_m(run.test, baseline, self.higher_is_better)
            for run in self.runs[method]
            if run.diverged is None
        ]

    def rows(self) -> list[dict[str, Any]]:
        """One row per method: Δm% and each task's test metric (mean, standard deviation over
        seeds), the median seconds per epoch, the seeds that diverged."""
        rows = []
        for method, runs in self.runs.items():
            finished = [run for run in runs if run.diverged is None]
            deltas = self.delta_m(method)
            per_task = list(zip(*(run.test for run in finished), strict=True)) if finished else []
            rows.append(
                {
                    "method": method,
                    "delta_m": _mean(deltas),
                    "delta_m_std": _std(deltas),
                    "delta_m_per_seed": deltas,
                    "test": [_mean(values) for values in per_task],
                    "test_std": [_std(values) for values in per_task],
                    "seconds_per_epoch": _median([run.seconds_per_epoch for run in finished]),
                    "seeds": len(runs),
                    "not_run": self.not_run.get(method),
                    "diverged": [
                        {"seed": run.seed, "reason": run.diverged}
                        for run in runs
                        if run.diverged is not None
                    ],
                }
            )
        return rows

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Comparison:
        """The comparison :meth:`to_json` wrote (``comparison.json``'s entry of a problem)."""
        tasks = record["tasks"]
        runs = {
            method: [
                Run(**{**run, "validation": tuple(run["validation"]), "test": tuple(run["test"])})
                for run in method_runs
            ]
            for method, method_runs in record["runs"].items()
        }
        return cls(
            record["problem"],
            tuple(task["name"] for task in tasks),
            tuple(task["metric"] for task in tasks),
            tuple(task["higher_is_better"] for task in tasks),
            record["epochs"],
            runs,
            dict(record.get("not_run", {})),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "problem": self.problem,
            "tasks": [
                {"name": name, "metric": metric, "higher_is_better": higher}
                for name, metric, higher in zip(
                    self.task_names, self.metric_names, self.higher_is_better, strict=True
                )
            ],
            "epochs": self.epochs,
            "baseline": list(self.baseline()),
            "rows": self.rows(),
            "runs": {method: [asdict(run) for run in runs] for method, runs in self.runs.items()},
            "not_run": self.not_run,
        }

    def skip(self, method: str, reason: str) -> None:
        """Record ``method`` as not run on this problem, for ``reason``: a row of its own."""
        self.runs[method], self.not_run[method] = [], reason


def resolve_methods(text: str) -> list[str]:
    """The methods ``text`` names, as ``fused-mtl demo --method`` takes them, ``"default"`` being
    :data:`DEFAULT_METHODS` here.

    Example:
        >>> resolve_methods("default")[:3]
        ['equal', 'uw', 'dwa']
    """
    from fused_mtl.app import demo

    if text.strip() == "default":
        return list(DEFAULT_METHODS)
    return demo.resolve_methods(text)


def delta_m(
    metrics: Sequence[float], baseline: Sequence[float], higher_is_better: Sequence[bool]
) -> float:
    """:math:`\\Delta m\\%` of ``metrics`` against ``baseline``, sign by each metric's direction.

    Example:
        >>> round(delta_m([0.9, 110.0], [0.8, 100.0], [True, False]), 6)  # +12.5%, -10%
        1.25
    """
    if not len(metrics) == len(baseline) == len(higher_is_better):
        raise ValueError("metrics, baseline and higher_is_better need one entry per task")
    total = 0.0
    for value, base, higher in zip(metrics, baseline, higher_is_better, strict=True):
        if base == 0:
            raise ValueError("a baseline metric of 0 has no relative change; pick another metric")
        change = (value - base) / abs(base)
        total += change if higher else -change
    return 100.0 * total / len(metrics)


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _std(values: Sequence[float]) -> float:
    """The sample standard deviation; NaN for fewer than two values (no spread measured)."""
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _mean_over(runs: Sequence[Run], part: str) -> tuple[float, ...]:
    finished = [getattr(run, part) for run in runs if run.diverged is None]
    return tuple(statistics.fmean(values) for values in zip(*finished, strict=True))


# --- training --------------------------------------------------------------------------------


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(item, device) for item in value)
    return value


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**63


class Trainer:
    """What every run of a comparison shares: the model and tasks, the data, the optimiser's
    settings. ``single_task`` and ``method`` each train one run."""

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        tasks: Sequence[Task],
        train: Iterable[Any],
        validation: Iterable[Any],
        test: Iterable[Any],
        *,
        epochs: int,
        lr: float = 1e-3,
        balancer_lr: float = BALANCER_LR,
        device: torch.device | str = "cpu",
        shared: str | Callable[[nn.Module], nn.Module] = "trunk",
        last_shared: Callable[[nn.Module], nn.Module] | None = None,
        on_epoch: Callable[[str, int, int, list[float]], None] | None = None,
    ) -> None:
        if not tasks:
            raise ValueError("a comparison needs at least one task")
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        for part, data in (("train", train), ("validation", validation), ("test", test)):
            if iter(data) is data:
                raise ValueError(
                    f"the {part} data is an iterator, used up after one pass; pass something "
                    "that iterates anew each time (a DataLoader, a list of batches)"
                )
        self.model_factory, self.tasks = model_factory, tuple(tasks)
        self.train, self.validation, self.test = train, validation, test
        self.epochs, self.lr, self.balancer_lr = epochs, lr, balancer_lr
        self.device = torch.device(device)
        self.shared = _attribute(shared) if isinstance(shared, str) else shared
        self.last_shared = last_shared or (
            lambda model: _module_with_parameters_last(self.shared(model))
        )
        self.on_epoch = on_epoch
        self.period_steps = _count_batches(train)

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return self.model_factory().to(self.device)

    def balancer(self, method: str, model: nn.Module) -> Balancer:
        """``method`` with the demo's settings on ``model``'s shared layers."""
        from fused_mtl.app.demo import build_balancer

        return build_balancer(
            method,
            self.shared(model),
            self.last_shared(model).parameters(),
            len(self.tasks),
            self.period_steps,
        ).to(self.device)

    def not_applicable(self, method: str) -> str | None:
        """Why ``method`` cannot be built for these tasks (the error its balancer raises: Krum
        needs 3 tasks), or None; the global generator is left as it was."""
        with torch.random.fork_rng(devices=[]):
            model = self.model_factory().to(self.device)
        try:
            self.balancer(method, model)
        except ValueError as error:
            return str(error)
        return None

    def unpack(self, batch: Any) -> tuple[Any, Any]:
        """A batch's inputs and its K targets, on the device: ``(inputs, targets)`` with
        ``targets`` a list or tuple of K tensors, or ``(inputs, target_1, ..., target_K)`` as a
        ``DataLoader`` over a ``TensorDataset(inputs, target_1, ...)`` gives it."""
        count = len(self.tasks)
        if isinstance(batch, (list, tuple)):
            if len(batch) == 2 and isinstance(batch[1], (list, tuple)):
                return _to(batch[0], self.device), _to(batch[1], self.device)
            if len(batch) == count + 1:
                return _to(batch[0], self.device), _to(list(batch[1:]), self.device)
        shape = (
            f"{type(batch).__name__} of {len(batch)}"
            if isinstance(batch, (list, tuple))
            else type(batch).__name__
        )
        raise ValueError(
            f"a batch must be (inputs, [one target per task]) or (inputs, target_1, ..., "
            f"target_{count}) for {count} tasks; got a {shape}"
        )

    def outputs(self, model: nn.Module, inputs: Any, targets: Any) -> tuple[list, list]:
        outputs = model(inputs)
        count = len(self.tasks)
        if not isinstance(outputs, (list, tuple)) or len(outputs) != count:
            got = f"{len(outputs)} outputs" if isinstance(outputs, (list, tuple)) else "a tensor"
            raise ValueError(f"the model returned {got} for {count} tasks; return one per task")
        if len(targets) != count:
            raise ValueError(f"a batch holds {len(targets)} targets for {count} tasks")
        return list(outputs), list(targets)

    def losses(self, model: nn.Module, batch: Any) -> Tensor:
        inputs, targets = self.unpack(batch)
        outputs, targets = self.outputs(model, inputs, targets)
        return torch.stack(
            [
                _of_task(task, "loss", output, target)
                for task, output, target in zip(self.tasks, outputs, targets, strict=True)
            ]
        )

    def evaluate(self, model: nn.Module, data: Iterable[Any]) -> tuple[Tensor, Tensor]:
        """Each task's metric (mean over the split's elements) and loss (mean over examples)."""
        count = len(self.tasks)
        metric_sums = torch.zeros(count, dtype=torch.float64)
        metric_counts = torch.zeros(count, dtype=torch.float64)
        loss_sums, examples = torch.zeros(count, dtype=torch.float64), 0
        model.eval()
        with torch.no_grad():
            for batch in data:
                inputs, targets = self.unpack(batch)
                outputs, targets = self.outputs(model, inputs, targets)
                size = len(targets[0])
                for k, (task, output, target) in enumerate(
                    zip(self.tasks, outputs, targets, strict=True)
                ):
                    values = _of_task(task, "metric", output, target).double()
                    metric_sums[k] += values.sum().cpu()
                    metric_counts[k] += values.numel()
                    loss_sums[k] += float(_of_task(task, "loss", output, target)) * size
                examples += size
        model.train()
        if not examples:
            raise ValueError("a validation or test loader gave no batch")
        return metric_sums / metric_counts, loss_sums / examples

    def run(
        self,
        label: str,
        seed: int,
        train_step: Callable[[Tensor], None],
        score: Callable[[Tensor], float],
        model: nn.Module,
        after_epoch: Callable[[Tensor], None] | None = None,
    ) -> tuple[Tensor, Tensor, int, float, str | None]:
        """Train ``model`` for the epochs, ``train_step(losses)`` doing each step's backward and
        update; keep the weights of the epoch of best ``score(validation
        metrics)``. Returns the validation and test metrics of that epoch, the epoch, the median
        seconds of an epoch's training and why it diverged (or None)."""
        best_score, best_state, best_validation, best_epoch = -float("inf"), None, None, 0
        seconds, diverged = [], None
        for epoch in range(1, self.epochs + 1):
            torch.manual_seed(_epoch_seed(seed, epoch))
            started = time.perf_counter()
            batches = 0
            try:
                for batch in self.train:
                    train_step(self.losses(model, batch))
                    batches += 1
            except FloatingPointError as error:
                diverged = f"epoch {epoch}: {error}"
                break
            if not batches:
                raise ValueError("the train data gave no batch")
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds.append(time.perf_counter() - started)
            validation, validation_losses = self.evaluate(model, self.validation)
            if after_epoch is not None:
                after_epoch(validation_losses)
            current = score(validation)
            if current > best_score or best_state is None:
                best_score, best_validation, best_epoch = current, validation, epoch
                best_state = copy.deepcopy(model.state_dict())
            if self.on_epoch is not None:
                self.on_epoch(label, seed, epoch, validation.tolist())
        if best_state is None:  # diverged in the first epoch
            nan = torch.full((len(self.tasks),), float("nan"), dtype=torch.float64)
            return nan, nan, 0, _median(seconds), diverged
        model.load_state_dict(best_state)
        test, _ = self.evaluate(model, self.test)
        return best_validation, test, best_epoch, _median(seconds), diverged

    def single_task(self, seed: int, task: int) -> TaskRun:
        """A model trained on task ``task``'s loss alone, its epoch selected by that task's
        validation metric."""
        model = self.model(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        name = self.tasks[task].name

        def step(losses: Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            raise_if_not_finite(losses[task : task + 1], [name])
            losses[task].backward()
            optimizer.step()

        sign = 1.0 if self.tasks[task].higher_is_better else -1.0
        validation, test, epoch, seconds, diverged = self.run(
            f"{SINGLE_TASK} ({name})",
            seed,
            step,
            lambda metrics: sign * float(metrics[task]),
            model,
        )
        return TaskRun(
            seed, task, float(validation[task]), float(test[task]), epoch, seconds, diverged
        )

    def method(self, method: str, seed: int, reference: Sequence[float]) -> Run:
        """``method`` trained on every task; epochs selected by validation Δm% against
        ``reference`` (the same seed's single-task validation metrics)."""
        model = self.model(seed)
        names = [task.name for task in self.tasks]
        balancer = self.balancer(method, model)
        optimizer = torch.optim.Adam(
            [
                {"params": model.parameters()},
                {"params": balancer.parameters(), "lr": self.balancer_lr},
            ],
            lr=self.lr,
        )

        def step(losses: Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            raise_if_not_finite(losses, names)
            balancer.backward(losses)
            optimizer.step()

        after_epoch = None
        if isinstance(balancer, DTP):  # its KPIs: the share of the initial validation loss gone
            _, initial_losses = self.evaluate(model, self.validation)

            def report_kpis(validation_losses: Tensor) -> None:
                kpis = (1 - validation_losses / initial_losses).clamp(0, 1)
                balancer.update_kpis(kpis.float().to(self.device))

            after_epoch = report_kpis

        higher = [task.higher_is_better for task in self.tasks]
        result = self.run(
            method,
            seed,
            step,
            lambda metrics: delta_m(metrics.tolist(), reference, higher),
            model,
            after_epoch,
        )
        validation, test, epoch, seconds, diverged = result
        return Run(
            method, seed, tuple(validation.tolist()), tuple(test.tolist()), epoch, seconds, diverged
        )


def _of_task(task: Task, part: str, output: Tensor, target: Tensor) -> Tensor:
    """``task.loss`` or ``task.metric`` of a batch, a failure named by the task; a loss must be
    one number."""
    try:
        value = getattr(task, part)(output, target)
    except (ValueError, RuntimeError, TypeError) as error:
        raise ValueError(f"task {task.name!r}: its {part} failed: {error}") from error
    if part == "loss" and value.dim() != 0:
        raise ValueError(
            f"task {task.name!r}: its loss has shape {tuple(value.shape)}; it must be one number "
            "(a mean over the batch)"
        )
    return value


def _count_batches(data: Iterable[Any]) -> int:
    """The batches of one pass over ``data`` (re-iterable: checked before)."""
    try:
        return max(1, len(data))  # type: ignore[arg-type]
    except TypeError:
        return max(1, sum(1 for _ in data))


def _module_with_parameters_last(module: nn.Module) -> nn.Module:
    """The last sub-module of ``module`` (in registration order) that owns parameters."""
    owners = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
    if not owners:
        raise ValueError("the shared layers own no parameters")
    return owners[-1]


def _attribute(name: str) -> Callable[[nn.Module], nn.Module]:
    def get(model: nn.Module) -> nn.Module:
        found = getattr(model, name, None)
        if not isinstance(found, nn.Module):
            raise ValueError(
                f"the model has no sub-module {name!r}: pass shared=<attribute name or "
                "function of the model> giving the layers every task shares"
            )
        return found

    return get


def compare(
    model_factory: Callable[[], nn.Module],
    tasks: Sequence[Task],
    train: Iterable[Any],
    validation: Iterable[Any],
    test: Iterable[Any],
    *,
    methods: Sequence[str] | str = "default",
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 10,
    lr: float = 1e-3,
    balancer_lr: float = BALANCER_LR,
    shared: str | Callable[[nn.Module], nn.Module] = "trunk",
    last_shared: Callable[[nn.Module], nn.Module] | None = None,
    device: torch.device | str = "cpu",
    problem: str = "problem",
    on_epoch: Callable[[str, int, int, list[float]], None] | None = None,
    on_run: Callable[[Run], None] | None = None,
) -> Comparison:
    """Train single-task models and each of ``methods`` on the same problem; see the module's
    docstring for how.

    Args:
        model_factory: builds a fresh network whose ``forward(inputs)`` returns one output per
            task, in the order of ``tasks``.
        tasks: the tasks' losses and metrics (:class:`Task`, or :func:`accuracy_task`,
            :func:`binary_task`, :func:`regression_task`).
        train: an iterable of batches, ``(inputs, [target per task])`` or ``(inputs,
            target_1, ..., target_K)`` (a ``DataLoader`` over a ``TensorDataset``), iterated
            once per epoch, shuffled by the global generator or by its own.
        validation: batches of the same form, for selecting each run's epoch.
        test: batches of the same form, measured once per run, at its selected epoch.
        methods: method names as ``fused-mtl demo --method`` takes them (keys, class names,
            ``"default"``, ``"all"``), as a list or one comma-separated string. One that
            cannot be built for these tasks (Krum needs 3) is not run: its row says why
            (``Comparison.not_run``); when none can, ``ValueError`` before any training.
        seeds: one run of each method (and K single-task models) per seed.
        shared: the layers every task shares (a sub-module's attribute name, or a function of
            the model): the Gram methods' per-task gradients and GradNorm's last layer.
        last_shared: GradNorm's layer (default: the last layer of ``shared`` with parameters).
        on_epoch: called after every epoch of every run with ``(run label, seed, epoch,
            validation metrics)``: learning curves, or a progress bar.
        on_run: called with every finished :class:`Run`.
    """
    methods = resolve_methods(methods if isinstance(methods, str) else ",".join(methods))
    if not seeds:
        raise ValueError("compare needs at least one seed")
    trainer = Trainer(
        model_factory,
        tasks,
        train,
        validation,
        test,
        epochs=epochs,
        lr=lr,
        balancer_lr=balancer_lr,
        device=device,
        shared=shared,
        last_shared=last_shared,
        on_epoch=on_epoch,
    )
    comparison = Comparison(
        problem,
        tuple(task.name for task in tasks),
        tuple(task.metric_name for task in tasks),
        tuple(task.higher_is_better for task in tasks),
        epochs,
    )

    def record(run: Run) -> Run:
        comparison.runs.setdefault(run.method, []).append(run)
        if on_run is not None:
            on_run(run)
        return run

    not_run = {method: trainer.not_applicable(method) for method in methods}
    runnable = [method for method in methods if not_run[method] is None]
    if not runnable:
        reasons = [reason for reason in not_run.values() if reason is not None]
        raise ValueError("no method can be built for these tasks: " + "; ".join(reasons))
    references = {}
    for seed in seeds:
        task_runs = [trainer.single_task(seed, task) for task in range(len(tasks))]
        references[seed] = record(single_task_run(seed, task_runs)).validation
    check_baseline(comparison)
    for method in methods:
        if method not in runnable:
            comparison.skip(method, not_run[method])
        for seed in seeds if method in runnable else ():
            record(trainer.method(method, seed, references[seed]))
    return comparison


def check_baseline(comparison: Comparison) -> None:
    """A ``FloatingPointError`` when a single-task model diverged: no Δm% without it."""
    for run in comparison.runs[SINGLE_TASK]:
        if run.diverged is not None:
            raise FloatingPointError(
                f"seed {run.seed}: a single-task model diverged ({run.diverged}); Δm% needs "
                "every one: lower the learning rate"
            )
