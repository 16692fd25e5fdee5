"""benchmarks/gpu_validation.py, the one-call GPU validation, run on a CPU with small cases: the
stages' commands run, their files land in the output folder and the summary records them."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from checks import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_validation.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )


def test_bench_and_profile_stages_write_their_files_and_the_summary(tmp_path):
    done = run_script(
        str(tmp_path), "--device", "cpu", "--quick", "--stages", "bench,profile", "--revision", "r1"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    names = sorted(path.name for path in tmp_path.iterdir())
    expected = ["bench.json", "bench.log", "bench.md", "profile.txt", "summary.md"]
    assert names == [f"cpu-{name}" for name in expected]
    assert len(names) <= 8  # what one device call can bring back
    summary = (tmp_path / "cpu-summary.md").read_text()
    assert "- git revision r1" in summary
    assert summary.count("exit status 0") == 2 and "## bench (" in summary
    assert summary.index("## bench (") < summary.index("## profile (")
    assert (
        "| uncertainty K=8, (K,) tensor | fused_auto |" in (tmp_path / "cpu-bench.md").read_text()
    )
    profile = (tmp_path / "cpu-profile.txt").read_text()
    assert "### uncertainty K=2: fused_auto" in profile
    assert "### gram K=16 P=65536: fused_auto" in profile

    again = run_script(str(tmp_path), "--device", "cpu", "--quick", "--stages", "profile")
    assert again.returncode == 0, again.stdout + again.stderr
    summary = (tmp_path / "cpu-summary.md").read_text()
    assert summary.count("# GPU validation") == 1 and summary.count("## profile (") == 2


def test_unknown_stage_is_an_error(tmp_path):
    done = run_script(str(tmp_path), "--stages", "tests,benchmark")
    assert done.returncode == 2
    assert "unknown stages ['benchmark']" in done.stderr
    assert not any(tmp_path.iterdir())


def test_a_stage_past_its_time_is_killed_with_its_children(tmp_path):
    script = load_script(SCRIPT)
    # A parent that prints, then waits on a child that sleeps: both must be gone after the limit.
    command = [
        sys.executable,
        "-c",
        "import subprocess, sys; print('started', flush=True); "
        "subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])",
    ]
    log = tmp_path / "stage.log"
    started = time.monotonic()
    assert script._run(command, log, dict(os.environ), timeout=2) == 124
    assert time.monotonic() - started < 8  # the sleeping child held the pipe open: it is gone too
    assert log.read_text() == "started\n"


def test_measured_times_are_put_beside_the_predictions(tmp_path):
    """The bench stage's summary gives each fused-op group's median next to the static
    roofline's prediction, the group's launches summed, and no ratio where launches dominate."""
    script = load_script(SCRIPT)
    bench = tmp_path / "bench.json"
    bench.write_text(
        json.dumps(
            {
                "results": [
                    {"group": "gram K=8 P=16", "implementation": "fused_auto", "median_s": 3e-6},
                    {"group": "gram K=8 P=16", "implementation": "matmul", "median_s": 1e-6},
                    {"group": "uncertainty K=2", "implementation": "fused_auto", "median_s": 8e-6},
                ]
            }
        )
    )
    resources = tmp_path / "resources.json"
    rows = [
        {"group": "gram K=8 P=16", "predicted_s": 1e-6, "bound": "memory"},
        {"group": "gram K=8 P=16", "predicted_s": 0.5e-6, "bound": "memory"},
        {"group": "uncertainty K=2", "predicted_s": 1e-11, "bound": "launch"},
        {"group": "norms K=8 P=16", "predicted_s": 1e-6, "bound": "memory"},
    ]
    resources.write_text(json.dumps({"roofline": rows}))
    lines = script.against_predictions(bench, resources)
    assert "| gram K=8 P=16 | 3.0 µs | 1.5 µs | 2.00× |" in lines
    assert "| uncertainty K=2 | 8.0 µs | 1e-05 µs | launch-bound |" in lines
    assert not any("norms" in line for line in lines)  # not measured: no row
