"""The problems behind ``fused-mtl compare``: each real data set of :mod:`fused_mtl.app.datasets`
with a fixed small network, its tasks' losses and metrics, and how long it trains.

- ``multi_digits``: a small CNN trunk (two 3×3 convolutions of 16 and 32 channels, a 2×2 max
  pool, a 64-unit layer) and a 10-way head per digit; accuracy.
- ``yeast``: a two-layer MLP trunk (128 units) and a logistic head per functional class;
  accuracy of each class.
- ``penguins``: a two-layer MLP trunk (32 units); species by cross-entropy, sex by logistic
  loss, body mass by squared error **in grams** (the head predicts grams through the training
  set's mean and deviation, fixed): losses near 1, 0.7 and 10⁵, the setting uncertainty weighting
  was made for. Accuracy, accuracy, mean absolute error in grams.

Every network trains with Adam at ``lr`` in batches of ``batch_size``, for ``epochs`` epochs,
chosen (on seed 0) so that the single-task models and equal weighting pass their best
validation metrics well before the end: the digits' at epochs 10 to 13 of 18 (lr 3e-3), yeast's
at 5 to 20 of 30, the penguins' at 18 to 50 of 150 (lr 3e-3). Methods that adapt slowly may
still be improving at the end (GradNorm on the penguins, whose weights have to fall by orders
of magnitude); that is part of what the comparison shows.
"""

from __future__ import annotations

import functools
import multiprocessing
import signal
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fused_mtl.app import datasets
from fused_mtl.app.compare import (
    SINGLE_TASK,
    Comparison,
    MultiHeadNet,
    Run,
    Task,
    TaskRun,
    TensorBatches,
    Trainer,
    accuracy_task,
    binary_task,
    check_baseline,
    regression_task,
    single_task_run,
)

__all__ = [
    "PROBLEMS",
    "ComparisonProblem",
    "Interrupted",
    "Job",
    "make_problem",
    "not_run",
    "run_job",
    "run_jobs",
]

PROBLEMS = ("multi_digits", "yeast", "penguins")


@dataclass(frozen=True)
class ComparisonProblem:
    """A data set, split, with the network, tasks and training of its comparison."""

    name: str
    description: str
    data: datasets.MultiTaskData
    tasks: tuple[Task, ...]
    model_factory: Callable[[], nn.Module]
    epochs: int
    lr: float
    batch_size: int

    def batches(self, part: str) -> TensorBatches:
        """The ``part`` ("train", "validation", "test") in batches; only training shuffles."""
        split = getattr(self.data, part)
        return TensorBatches(split.inputs, split.targets, self.batch_size, shuffle=part == "train")


class Rescale(nn.Module):
    """``mean + deviation * x``, both fixed: a head that predicts in the target's own unit."""

    def __init__(self, mean: float, deviation: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("deviation", torch.tensor(deviation))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.mean + self.deviation * inputs


def _digits_network() -> MultiHeadNet:
    pooled = 32 * (datasets.CANVAS_SIZE // 2) ** 2
    trunk = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(pooled, 64),
        nn.ReLU(),
    )
    return MultiHeadNet(trunk, [nn.Linear(64, 10), nn.Linear(64, 10)])


def _mlp_trunk(inputs: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())


def make_problem(name: str, device: torch.device | str = "cpu") -> ComparisonProblem:
    """The problem ``name`` (one of :data:`PROBLEMS`), its data on ``device``."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; expected one of {', '.join(PROBLEMS)}")
    data = datasets.load(name).to(device)
    if name == "multi_digits":
        tasks = tuple(accuracy_task(task) for task in data.task_names)
        return ComparisonProblem(
            name,
            "MultiMNIST-style pairs of scikit-learn's 8×8 digits: left and right digit",
            data,
            tasks,
            _digits_network,
            epochs=18,
            lr=3e-3,
            batch_size=64,
        )
    if name == "yeast":
        tasks = tuple(binary_task(task) for task in data.task_names)
        features = data.train.inputs.shape[1]

        def yeast_network() -> MultiHeadNet:
            heads = [nn.Linear(128, 1) for _ in tasks]
            return MultiHeadNet(_mlp_trunk(features, 128), heads)

        return ComparisonProblem(
            name,
            "yeast gene functions (river): 14 binary classes from 103 features",
            data,
            tasks,
            yeast_network,
            epochs=30,
            lr=1e-3,
            batch_size=64,
        )
    mass = data.train.targets[2]
    mass_mean, mass_deviation = float(mass.mean()), float(mass.std())
    features = data.train.inputs.shape[1]

    def penguins_network() -> MultiHeadNet:
        heads = [
            nn.Linear(32, 3),
            nn.Linear(32, 1),
            nn.Sequential(nn.Linear(32, 1), Rescale(mass_mean, mass_deviation)),
        ]
        return MultiHeadNet(_mlp_trunk(features, 32), heads)

    tasks = (accuracy_task("species"), binary_task("sex"), regression_task("body mass", "g"))
    return ComparisonProblem(
        name,
        "Palmer penguins: species (3 classes), sex, body mass in grams",
        data,
        tasks,
        penguins_network,
        epochs=150,
        lr=3e-3,
        batch_size=32,
    )


# --- the comparison's runs, each a job that a worker process can take ------------------------


@dataclass(frozen=True)
class Job:
    """One run of ``fused-mtl compare``: a single-task model (``task`` set) or a method (its
    seed's single-task validation metrics as ``reference``)."""

    problem: str
    method: str  # compare.SINGLE_TASK for a single-task model
    seed: int
    epochs: int
    device: str
    task: int | None = None
    reference: tuple[float, ...] | None = None


@functools.lru_cache(maxsize=len(PROBLEMS))
def _trainer(problem: str, epochs: int, device: str) -> Trainer:
    return _trainer_of(make_problem(problem, device), epochs, device)


def _trainer_of(made: ComparisonProblem, epochs: int, device: str) -> Trainer:
    return Trainer(
        made.model_factory,
        made.tasks,
        made.batches("train"),
        made.batches("validation"),
        made.batches("test"),
        epochs=epochs,
        lr=made.lr,
        device=device,
    )


def run_job(job: Job) -> Run | TaskRun:
    """Train the run ``job`` describes (its problem's data read once per process)."""
    trainer = _trainer(job.problem, job.epochs, job.device)
    if job.task is not None:
        return trainer.single_task(job.seed, job.task)
    if job.reference is None:
        raise ValueError(f"{job.method} needs its seed's single-task validation metrics")
    return trainer.method(job.method, job.seed, job.reference)


def _worker_start(threads: int) -> None:
    torch.set_num_threads(threads)
    # Ctrl-C reaches the whole process group: the main process alone handles it (keeps what
    # finished, then ends the workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def not_run(
    problems: Sequence[ComparisonProblem], methods: Sequence[str], device: str
) -> dict[str, dict[str, str]]:
    """Per problem, the methods that cannot be built for its tasks, each with the error it
    raises (Krum and the trimmed mean need 3 tasks; ``multi_digits`` has 2)."""
    found = {}
    for problem in problems:
        trainer = _trainer_of(problem, problem.epochs, device)  # its data already read
        reasons = {method: trainer.not_applicable(method) for method in methods}
        found[problem.name] = {m: reason for m, reason in reasons.items() if reason is not None}
    return found


def run_jobs(
    problems: Sequence[ComparisonProblem],
    methods: Sequence[str],
    seeds: Sequence[int],
    device: str,
    jobs: int,
    epochs: int | None,
    on_run: Callable[[Job, Run | TaskRun], None],
    skipped: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Comparison]:
    """Every run of the comparison of ``methods`` on ``problems``, on ``jobs`` processes of one
    torch thread each (in this process when 1): first the single-task models, then, once a
    problem's are done, its methods (whose epochs are selected against them). A run's numbers
    do not depend on ``jobs``: each is seeded on its own (the Gram methods' up to float32
    rounding, see docs/compare.md). ``on_run`` sees every finished run. A method in
    ``skipped[problem]`` (default: :func:`not_run`'s) is not trained on that problem: its row
    gives the reason."""
    if skipped is None:
        skipped = not_run(problems, methods, device)
    comparisons = {
        problem.name: Comparison(
            problem.name,
            tuple(task.name for task in problem.tasks),
            tuple(task.metric_name for task in problem.tasks),
            tuple(task.higher_is_better for task in problem.tasks),
            epochs or problem.epochs,
        )
        for problem in problems
    }
    task_runs: dict[str, dict[int, list[TaskRun]]] = {
        p.name: {s: [] for s in seeds} for p in problems
    }
    method_runs: dict[tuple[str, str, int], Run] = {}
    pending_tasks = {p.name: len(seeds) * len(p.tasks) for p in problems}
    queue = [
        Job(p.name, SINGLE_TASK, seed, epochs or p.epochs, device, task=task)
        for p in problems
        for seed in seeds
        for task in range(len(p.tasks))
    ]

    def finished(job: Job, result: Run | TaskRun) -> list[Job]:
        """Records ``result``; the jobs it makes ready (a problem's methods)."""
        on_run(job, result)
        if isinstance(result, Run):
            method_runs[job.problem, job.method, job.seed] = result
            return []
        task_runs[job.problem][job.seed].append(result)
        pending_tasks[job.problem] -= 1
        if pending_tasks[job.problem]:
            return []
        comparison = comparisons[job.problem]
        for seed in seeds:
            comparison.runs.setdefault(SINGLE_TASK, []).append(
                single_task_run(seed, task_runs[job.problem][seed])
            )
        check_baseline(comparison)
        references = {run.seed: run.validation for run in comparison.runs[SINGLE_TASK]}
        return [
            Job(job.problem, method, seed, job.epochs, device, reference=references[seed])
            for method in methods
            if method not in skipped[job.problem]
            for seed in seeds
        ]

    def assembled() -> dict[str, Comparison]:
        """The comparisons of the problems whose single-task models are done, with every method
        whose seeds all finished (all of them once every job ran)."""
        done = {}
        for name, comparison in comparisons.items():
            if SINGLE_TASK not in comparison.runs:
                continue
            for method in methods:
                if method in skipped[name]:
                    comparison.skip(method, skipped[name][method])
                elif all((name, method, seed) in method_runs for seed in seeds):
                    comparison.runs[method] = [method_runs[name, method, seed] for seed in seeds]
            done[name] = comparison
        return done

    threads = torch.get_num_threads()
    try:
        if jobs == 1:  # in this process, with the workers' one thread
            torch.set_num_threads(1)
            while queue:
                job = queue.pop(0)
                queue.extend(finished(job, run_job(job)))
        else:
            _run_in_processes(queue, jobs, finished)
    except KeyboardInterrupt as interrupt:
        raise Interrupted(assembled()) from interrupt
    finally:
        torch.set_num_threads(threads)
    return assembled()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_jobs`: ``comparisons`` holds what had finished."""

    def __init__(self, comparisons: dict[str, Comparison]) -> None:
        super().__init__()
        self.comparisons = comparisons


def _run_in_processes(
    queue: list[Job], jobs: int, finished: Callable[[Job, Run | TaskRun], list[Job]]
) -> None:
    """Run ``queue`` on ``jobs`` worker processes, submitting what each finished job makes
    ready; on any error or interrupt the queued jobs are cancelled, not waited for."""
    context = multiprocessing.get_context("spawn")  # no fork of a process holding threads
    pool = ProcessPoolExecutor(jobs, context, _worker_start, (1,))
    completed = False
    try:
        running = {pool.submit(run_job, job): job for job in queue}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                for ready in finished(job, future.result()):
                    running[pool.submit(run_job, ready)] = ready
        completed = True
    finally:
        if not completed:  # an error or Ctrl-C: no job left should hold the command up
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
        pool.shutdown(wait=completed, cancel_futures=True)
