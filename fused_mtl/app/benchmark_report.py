"""Timing a benchmark case and reporting the results: the table rows, the JSON file and the
markdown table of ``fused-mtl bench``, and ``benchmarks/summarize.py`` for pytest-benchmark's
JSON (the same table for the same cases).

A result's ratios are against its group's baseline (what users run today) and, in groups that
have one, against ``torch.compile`` of the loop: above 1 means this implementation is faster.

Example:
    >>> from fused_mtl.app.benchmark_cases import uncertainty_case
    >>> result = measure(uncertainty_case("per_task_loop", 2, "cpu"), min_run_time=0.01)
    >>> result.implementation, result.median_s > 0
    ('per_task_loop', True)
    >>> rows = table_rows([result])
    >>> rows[0]["baseline / this"]
    '1.00×'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch.utils.benchmark import Timer

from fused_mtl.app.benchmark_cases import (
    LAUNCH_FLOOR,
    LAUNCH_FLOOR_IMPLEMENTATIONS,
    Case,
    copy_group,
)

__all__ = [
    "COLUMNS",
    "Result",
    "TargetCheck",
    "markdown",
    "measure",
    "notes_under_the_table",
    "table_rows",
    "target_checks",
    "verdict",
]

COMPILED = "compiled_loop"
COLUMNS = (
    "group",
    "implementation",
    "time per call",
    "baseline / this",
    "torch.compile / this",
    "GB/s",
    "peak memory",
)

# The GPU speed targets the fused ops are held to (checked on CUDA results only).
# Uncertainty weighting, forward + backward against the per-task loop, by K.
UNCERTAINTY_SPEEDUP_TARGETS = {2: 5.0, 64: 50.0, 4096: 300.0}
# CUDA-graph replay of the fused forward + backward against one empty Triton kernel's replay.
GRAPH_REPLAY_MAX_RATIO = 1.5
# Norms / Gram from this many gradient elements per task: a fraction of the copy bandwidth, and
# a speed-up over the per-task vector norms / G @ G.T.
BANDWIDTH_TARGET_MIN_WIDTH = 1 << 24
COPY_BANDWIDTH_FRACTION = 0.85
GRAM_SPEEDUP_TARGET = 1.5


@dataclass(frozen=True)
class Result:
    """One case's timing (``median_s`` is None when the case could not run: see ``skipped``)."""

    group: str
    implementation: str
    baseline: str
    median_s: float | None
    iqr_s: float | None = None
    runs: int = 0
    bytes_moved: int | None = None  # bytes read + written (each once): the GB/s column
    compile_seconds: float | None = None
    skipped: str | None = None
    peak_bytes: int | None = None  # one step's peak allocation above what was there before

    def to_json(self) -> dict[str, object]:
        return asdict(self)


#: Rounds over a group's cases: each round times every case of the group once, for
#: ``min_run_time / ROUNDS`` seconds, and a case's time is the median of its rounds. Timed one
#: after another, cases of one group drifted apart by 20-50% on a shared 2-core machine (the
#: 4 x 1024 trunk step: 5.1x and 7.3x the plain sum in two runs); interleaved, a drift of the
#: machine moves every case of the round alike and their ratio stays.
ROUNDS = 5


def measure(case: Case, min_run_time: float) -> Result:
    """Time one case alone (see ``measure_group``)."""
    return measure_group([case], min_run_time)[0]


def measure_group(cases: Sequence[Case], min_run_time: float, rounds: int = ROUNDS) -> list[Result]:
    """Time ``case.step`` of each case with ``torch.utils.benchmark`` in ``rounds`` interleaved
    rounds (blocks of calls for ``min_run_time / ROUNDS`` seconds per case and round, on as
    many threads as torch uses); each case's time is the median of its rounds' medians, and its
    spread the interquartile range of those."""
    threads = torch.get_num_threads()
    timers = [Timer("step()", globals={"step": case.step}, num_threads=threads) for case in cases]
    medians: list[list[float]] = [[] for _ in cases]
    runs = [0 for _ in cases]
    for _ in range(rounds):
        for index, (case, timer) in enumerate(zip(cases, timers, strict=True)):
            with case.timing_guard():
                measurement = timer.blocked_autorange(min_run_time=min_run_time / rounds)
            medians[index].append(measurement.median)
            runs[index] += measurement.number_per_run * len(measurement.times)
    results = []
    for case, times, count in zip(cases, medians, runs, strict=True):
        rounds = torch.tensor(times, dtype=torch.float64)
        spread = torch.quantile(rounds, 0.75) - torch.quantile(rounds, 0.25)
        results.append(
            Result(
                group=case.group,
                implementation=case.implementation,
                baseline=case.baseline,
                median_s=float(rounds.quantile(0.5)),
                iqr_s=float(spread),
                runs=count,
                bytes_moved=case.bytes_moved,
                compile_seconds=case.compile_seconds,
                peak_bytes=case.peak_bytes,
            )
        )
    return results


def _time(seconds: float) -> str:
    if seconds >= 1e-2:
        return f"{seconds * 1e3:.1f} ms"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def table_rows(results: Sequence[Result]) -> list[dict[str, str]]:
    """The rows of the results table (keys :data:`COLUMNS`), for the cases that ran."""
    medians = {(r.group, r.implementation): r.median_s for r in results if r.median_s}
    rows = []
    for result in results:
        if result.median_s is None:
            continue
        baseline = medians.get((result.group, result.baseline))
        compiled = medians.get((result.group, COMPILED))
        rows.append(
            {
                "group": result.group,
                "implementation": result.implementation,
                "time per call": _time(result.median_s),
                "baseline / this": f"{baseline / result.median_s:.2f}×" if baseline else "",
                "torch.compile / this": f"{compiled / result.median_s:.2f}×" if compiled else "",
                "GB/s": f"{result.bytes_moved / result.median_s / 1e9:.1f}"
                if result.bytes_moved
                else "",
                "peak memory": f"{result.peak_bytes / 2**20:.1f} MiB"
                if result.peak_bytes is not None
                else "",
            }
        )
    return rows


def markdown(results: Sequence[Result], environment: dict[str, object], command: str) -> str:
    """The results as a markdown table, headed by where and how they were measured."""
    threads = environment.get("cpu_threads")
    driver = f", driver {environment['driver']}" if environment.get("driver") else ""
    lines = [
        f"Device: {environment.get('device_name')}{driver} ({threads} CPU threads), "
        f"torch {environment.get('torch')}, triton {environment.get('triton')}, "
        f"git {environment.get('git_revision')}, {environment.get('date', '')}. "
        f"Command: `{command}`. Median time per call over {ROUNDS} rounds that interleave "
        "the cases of a group; a ratio above 1 means this row is faster "
        f"than the group's baseline (what users run today) or than `torch.compile` of the loop.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(row.values()) + " |" for row in table_rows(results)]
    notes = notes_under_the_table(results)
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    checks = target_checks(results, str(environment.get("device")))
    if checks:
        lines += [
            "",
            "Targets, from the rows above:",
            "",
            "| target | measured | met |",
            "|---|---|---|",
        ]
        lines += [f"| {c.target} | {c.measured} | {verdict(c.met)} |" for c in checks]
    return "\n".join(lines) + "\n"


def verdict(met: bool | None) -> str:
    """How a target check's outcome is written in the tables."""
    return "reported" if met is None else ("yes" if met else "**no**")


def notes_under_the_table(results: Sequence[Result]) -> list[str]:
    """The compile times (excluded from the timings) and the cases that did not run."""
    notes = [
        f"{r.group} {r.implementation}: first call (compiling; shorter when torch's on-disk "
        f"compile cache is warm) {r.compile_seconds:.1f} s, not timed; the timed calls ran under "
        f"`fail_on_recompile`: no recompiles"
        for r in results
        if r.compile_seconds is not None
    ]
    notes += [f"not run: {r.group} {r.implementation}: {r.skipped}" for r in results if r.skipped]
    return notes


@dataclass(frozen=True)
class TargetCheck:
    """One speed target, what was measured against it, and whether it was met (None: a figure
    that is reported without a target)."""

    target: str
    measured: str
    met: bool | None


def _size(group: str, name: str) -> int | None:
    """The ``K`` or ``P`` written in a group's name (``"gram K=8 P=1024"``), else None."""
    for word in group.replace(",", " ").split():
        if word.startswith(f"{name}="):
            return int(word[len(name) + 1 :])
    return None


def target_checks(results: Sequence[Result], device: str) -> list[TargetCheck]:
    """The speed targets that the results allow to check, in the order of the results. They are
    GPU targets: on another device there are none."""
    if not device.startswith("cuda"):
        return []
    ran = {(r.group, r.implementation): r for r in results if r.median_s}

    def median(group: str, implementation: str) -> float | None:
        result = ran.get((group, implementation))
        return result.median_s if result else None

    def speedup(target: str, slower: float, faster: float, wanted: float | None) -> TargetCheck:
        ratio = slower / faster
        return TargetCheck(target, f"{ratio:.2f}×", None if wanted is None else ratio >= wanted)

    checks: list[TargetCheck] = []
    floor = median(LAUNCH_FLOOR, LAUNCH_FLOOR_IMPLEMENTATIONS[1])  # the graph replay
    for group in dict.fromkeys(r.group for r in results):
        num_tasks, width = _size(group, "K"), _size(group, "P")
        fused_result = ran.get((group, "fused_auto"))
        fused = fused_result.median_s if fused_result else None
        if group.startswith("uncertainty") and fused:
            loop, compiled = median(group, "per_task_loop"), median(group, "compiled_loop")
            wanted = UNCERTAINTY_SPEEDUP_TARGETS.get(num_tasks)
            if loop and wanted:
                checks.append(
                    speedup(f"{group}: fused ≥ {wanted:g}× the loop", loop, fused, wanted)
                )
            if compiled:
                checks.append(
                    speedup(f"{group}: fused no slower than compiled loop", compiled, fused, 1.0)
                )
            graph = median(group, "cuda_graph")
            if graph and floor:
                ratio = graph / floor
                checks.append(
                    TargetCheck(
                        f"{group}: graph replay ≤ {GRAPH_REPLAY_MAX_RATIO:g}× an empty kernel's",
                        f"{ratio:.2f}× ({_time(graph)} vs {_time(floor)})",
                        ratio <= GRAPH_REPLAY_MAX_RATIO,
                    )
                )
        elif group.startswith(("norms", "gram")) and fused and width >= BANDWIDTH_TARGET_MIN_WIDTH:
            baseline = median(group, fused_result.baseline)
            copy = ran.get((copy_group(num_tasks, width), "copy"))
            if copy and copy.bytes_moved and fused_result.bytes_moved:
                copy_rate = copy.bytes_moved / copy.median_s
                rate = fused_result.bytes_moved / fused
                checks.append(
                    TargetCheck(
                        f"{group}: fused ≥ {COPY_BANDWIDTH_FRACTION:.0%} of copy bandwidth",
                        f"{rate / copy_rate:.0%} ({rate / 1e9:.0f} vs {copy_rate / 1e9:.0f} GB/s)",
                        rate >= COPY_BANDWIDTH_FRACTION * copy_rate,
                    )
                )
            if baseline:
                checks.append(
                    speedup(
                        f"{group}: fused ≥ {GRAM_SPEEDUP_TARGET:g}× the baseline",
                        baseline,
                        fused,
                        GRAM_SPEEDUP_TARGET,
                    )
                )
        elif group.startswith("gradnorm step") and fused:
            loop = median(group, "per_task_loop")
            if loop:
                checks.append(
                    speedup(f"{group}: fused against the per-task loop", loop, fused, None)
                )
    return checks
