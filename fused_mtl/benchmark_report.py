"""Timing a benchmark case and reporting the results: the table rows, the JSON file and the
markdown table of ``fused-mtl bench``, and ``benchmarks/summarize.py`` for pytest-benchmark's
JSON (the same table for the same cases).

A result's ratios are against its group's baseline (what users run today) and, in groups that
have one, against ``torch.compile`` of the loop: above 1 means this implementation is faster.

Example:
    >>> from fused_mtl.benchmark_cases import uncertainty_case
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

from fused_mtl.benchmark_cases import Case

__all__ = ["COLUMNS", "Result", "markdown", "measure", "notes_under_the_table", "table_rows"]

COMPILED = "compiled_loop"
COLUMNS = (
    "group",
    "implementation",
    "time per call",
    "baseline / this",
    "torch.compile / this",
    "GB/s",
)


@dataclass(frozen=True)
class Result:
    """One case's timing (``median_s`` is None when the case could not run: see ``skipped``)."""

    group: str
    implementation: str
    baseline: str
    median_s: float | None
    iqr_s: float | None = None
    runs: int = 0
    bytes_read: int | None = None
    compile_seconds: float | None = None
    skipped: str | None = None

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def measure(case: Case, min_run_time: float) -> Result:
    """Time ``case.step`` with ``torch.utils.benchmark`` (blocks of calls for at least
    ``min_run_time`` seconds; the median per call) on as many threads as torch uses."""
    timer = Timer("step()", globals={"step": case.step}, num_threads=torch.get_num_threads())
    with case.timing_guard():
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return Result(
        group=case.group,
        implementation=case.implementation,
        baseline=case.baseline,
        median_s=measurement.median,
        iqr_s=measurement.iqr,
        runs=measurement.number_per_run * len(measurement.times),
        bytes_read=case.bytes_read,
        compile_seconds=case.compile_seconds,
    )


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
                "GB/s": f"{result.bytes_read / result.median_s / 1e9:.1f}"
                if result.bytes_read
                else "",
            }
        )
    return rows


def markdown(results: Sequence[Result], environment: dict[str, object], command: str) -> str:
    """The results as a markdown table, headed by where and how they were measured."""
    threads = environment.get("cpu_threads")
    lines = [
        f"Device: {environment.get('device_name')} ({threads} CPU threads), "
        f"torch {environment.get('torch')}, triton {environment.get('triton')}, "
        f"git {environment.get('git_revision')}, {environment.get('date', '')}. "
        f"Command: `{command}`. Median time per call; a ratio above 1 means this row is faster "
        f"than the group's baseline (what users run today) or than `torch.compile` of the loop.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(row.values()) + " |" for row in table_rows(results)]
    notes = notes_under_the_table(results)
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


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
