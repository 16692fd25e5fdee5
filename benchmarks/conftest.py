"""pytest-benchmark glue: the cases come from ``fused_mtl.app.benchmark_cases``, the source that
``fused-mtl bench`` times as well."""

from collections.abc import Callable

import pytest

from fused_mtl.app.benchmark_cases import Case, Unavailable, default_device, environment


@pytest.fixture
def bench_device() -> str:
    """CUDA when available, else CPU; ``FUSED_MTL_BENCH_DEVICE`` chooses."""
    return default_device()


@pytest.fixture
def run_case(benchmark, bench_device) -> Callable[[Callable[[str], Case]], None]:
    """Build a case for the device (skipping it, with the reason, where it cannot run here),
    time it, and record where and against what it was measured in ``extra_info``."""

    def run(make: Callable[[str], Case]) -> None:
        try:
            case = make(bench_device)
        except Unavailable as missing:
            pytest.skip(missing.reason)
        benchmark.group = case.group
        benchmark.extra_info.update(
            environment(bench_device),
            implementation=case.implementation,
            baseline=case.baseline,
            compile_seconds=case.compile_seconds,
            bytes_moved=case.bytes_moved,
            peak_bytes=case.peak_bytes,
        )
        with case.timing_guard():
            benchmark(case.step)
        if case.bytes_moved and benchmark.stats is not None:  # None under --benchmark-disable
            benchmark.extra_info["gb_per_s"] = case.bytes_moved / benchmark.stats.stats.median / 1e9

    return run
