"""The whole GPU validation in one script: the test suite on CUDA, both benchmark runners with the
targets table, and a profile of the cases the targets are about, written to one folder.

Usage (from the repository root, on a machine with a CUDA GPU)::

    python benchmarks/gpu_validation.py OUT_DIR [--stages tests,bench,pytest-bench,profile]
                                                [--device cuda] [--quick] [--revision REV]

Each stage is a subprocess; a failing stage is recorded and the next one still runs. Files, named
after the GPU (``nvidia-h100-80gb-hbm3`` below is ``GPU``), all directly in ``OUT_DIR``:

====================  =========================================================================
``GPU-summary.md``    the machine (``nvidia-smi``), versions, revision, date; each stage's
                      command, exit status and duration; the tests' summary line; the targets;
                      the fused ops' times beside the static roofline's predictions
``GPU-tests.log``     ``FUSED_MTL_TEST_DEVICE=cuda python -m pytest -ra``: every test and doctest
``GPU-bench.json``    ``fused-mtl bench --device cuda`` (and ``GPU-bench.md``, its table)
``GPU.json``          ``pytest benchmarks/ --benchmark-json`` (and ``GPU.md``, its table)
``GPU-profile.txt``   torch profiler tables (kernels per step, device time per kernel) of the
                      targets' cases, and Nsight Compute's memory throughput of the kernels
====================  =========================================================================

A summary that already exists in ``OUT_DIR`` gets the new stages appended, so the stages can run
in separate calls (each under ten minutes on an H100: ``tests,profile``, then ``bench``, then
``pytest-bench``). ``--device cpu --quick`` runs every stage on a CPU as a smoke test of the
script itself (its figures mean nothing).

The package is installed from this checkout (``pip install --no-deps --no-build-isolation -e .``,
no network needed) when ``fused_mtl`` does not import; the summary says where it imports from.
The revision is ``--revision``, else ``git rev-parse``; a copy of the tree without ``.git``
should pass it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESOURCES = REPO / "benchmarks" / "results" / "kernel-resources.json"
STAGES = ("tests", "bench", "pytest-bench", "profile")
# Each stage's own limit, so that one stuck stage leaves time for the others and the summary.
STAGE_TIMEOUT_S = 540
NCU_METRICS = (
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "launch__grid_size",
    "launch__block_size",
    "launch__registers_per_thread",
)


def _run(command: list[str], log: Path, env: dict[str, str], timeout: float) -> int:
    """Run ``command`` from the repository root, its output to the terminal and appended to
    ``log``; return its exit status (124 when it ran out of time and was killed)."""
    print("$", shlex.join(command), flush=True)
    with log.open("a") as sink:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: a timeout ends its workers too
        )

        def copy_output() -> None:
            for line in process.stdout:
                sys.stdout.write(line)
                sink.write(line)

        reader = threading.Thread(target=copy_output, daemon=True)
        reader.start()
        try:
            status = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = 124
        reader.join(timeout=10)
        return status


def _git_revision() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
    except OSError:  # no git on the machine
        return "unknown"
    return done.stdout.strip() or "unknown"


def _machine() -> list[str]:
    """What nvidia-smi says about the GPU (name, driver, memory, clocks, power limit)."""
    if shutil.which("nvidia-smi") is None:
        return ["nvidia-smi: not found"]
    fields = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit"
    query = ["nvidia-smi", f"--query-gpu={fields}", "--format=csv"]
    output = subprocess.run(query, capture_output=True, text=True, check=False).stdout
    return [line for line in output.splitlines() if line.strip()]


def _ensure_installed(env: dict[str, str]) -> None:
    if importlib.util.find_spec("fused_mtl") is not None:
        return
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    command += ["--no-build-isolation", "--no-index", "-e", str(REPO)]
    print("$", shlex.join(command), flush=True)
    if subprocess.run(command, cwd=REPO, env=env, check=False).returncode != 0:
        sys.exit("gpu_validation: installing fused_mtl from this checkout failed (see above)")


def _device_slug(device: str) -> str:
    import torch

    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _stage_commands(
    stage: str, args: argparse.Namespace, out: Path, gpu: str
) -> list[tuple[list[str], Path]]:
    """The commands of a stage, each with the file its output is appended to."""
    python = sys.executable
    if stage == "tests":
        command = [python, "-m", "pytest", "-ra", "-p", "no:cacheprovider"]
        if importlib.util.find_spec("xdist") is not None and not args.quick:
            command += ["-n", "8"]  # compiling the kernels' variants is CPU work: spread it
        if args.quick:
            command += ["tests/test_cuda.py", "tests/test_compile.py"]
        return [(command, out / f"{gpu}-tests.log")]
    log = out / f"{gpu}-bench.log"  # both runners' console output
    if stage == "bench":
        command = [python, "-m", "fused_mtl", "bench", "--device", args.device]
        command += ["--json", str(out / f"{gpu}-bench.json")]
        command += ["--markdown", str(out / f"{gpu}-bench.md")]
        return [(command + (["--quick"] if args.quick else []), log)]
    if stage == "pytest-bench":
        json_path, table = out / f"{gpu}.json", out / f"{gpu}.md"
        table.unlink(missing_ok=True)
        command = [python, "-m", "pytest", "benchmarks/", "-p", "no:cacheprovider", "-q"]
        command += ["--benchmark-json", str(json_path)]
        if args.quick:
            command += ["-k", "launch_floor or copy or forward_backward and 8-"]
        summarize = [python, "benchmarks/summarize.py", str(json_path), "--compact"]
        return [(command, log), (summarize, table)]
    if stage == "profile":
        log = out / f"{gpu}-profile.txt"
        worker = [python, __file__, "--profile-worker", "--device", args.device]
        commands = [(worker + (["--quick"] if args.quick else []), log)]
        if shutil.which("ncu") and args.device.startswith("cuda"):
            # --clock-control none: measure the card at the clocks it runs at, never set them.
            ncu = ["ncu", "--clock-control", "none", "--metrics", ",".join(NCU_METRICS)]
            ncu += ["--kernel-name", "regex:_task_gram|_reduce_partials|_uncertainty"]
            ncu += ["--launch-count", "40"]  # every launch of the four cases below
            commands.append(
                ([*ncu, python, __file__, "--ncu-worker", "--device", args.device], log)
            )
        return commands
    raise ValueError(f"unknown stage {stage!r}")


def _tests_summary(log: Path) -> str:
    """pytest's last line ("== 512 passed, 11 skipped in 160.2s ==")."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("=")]
    return lines[-1].strip("= ") if lines else "no pytest summary line"


def _targets(markdown: Path) -> list[str]:
    text = markdown.read_text() if markdown.exists() else ""
    return text[text.index("Targets") :].splitlines() if "Targets" in text else []


def against_predictions(bench_json: Path, resources_json: Path = RESOURCES) -> list[str]:
    """The fused ops' measured medians beside the static roofline's H100 SXM prediction for
    the same benchmark group (its launches summed), from ``kernel_resources.py``."""
    if not bench_json.exists() or not resources_json.exists():
        return []
    measured = {
        result["group"]: result["median_s"]
        for result in json.loads(bench_json.read_text())["results"]
        if result["implementation"] == "fused_auto" and result["median_s"]
    }
    predicted: dict[str, list[dict]] = {}
    for row in json.loads(resources_json.read_text())["roofline"]:
        predicted.setdefault(row["group"], []).append(row)
    lines = [
        "Measured beside the static roofline's prediction for an H100 SXM (85% of 3.35 TB/s "
        "or 67 TFLOP/s; launches not included): `benchmarks/results/kernel-resources.json`.",
        "",
        "| group | measured | predicted | measured / predicted |",
        "|---|---|---|---|",
    ]
    for group, rows in predicted.items():
        if group not in measured:
            continue
        seconds = sum(row["predicted_s"] for row in rows)
        if any(row["bound"] == "launch" for row in rows):
            ratio = "launch-bound"
        else:
            ratio = f"{measured[group] / seconds:.2f}×"
        lines.append(
            f"| {group} | {measured[group] * 1e6:.1f} µs | {seconds * 1e6:.3g} µs | {ratio} |"
        )
    return lines if len(lines) > 4 else []


# --- the profile worker: run in its own process by the profile stage -------------------------


def _profiled_cases(device: str, quick: bool):
    from fused_mtl.app import benchmark_cases as cases

    width = 1 << 16 if quick else 1 << 24
    many = 64 if quick else 4096
    yield lambda: cases.uncertainty_case("fused_auto", 2, device)
    yield lambda: cases.uncertainty_case("fused_auto", many, device)
    yield lambda: cases.uncertainty_case("fused_auto", many, device, "vector")
    yield lambda: cases.uncertainty_case("per_task_loop", 64, device, "vector")
    yield lambda: cases.copy_case(8, width, device)
    yield lambda: cases.gram_case("norms", "fused_auto", 8, width, device)
    yield lambda: cases.gram_case("gram", "fused_auto", 8, width, device)
    yield lambda: cases.gram_case("gram", "matmul", 8, width, device)
    yield lambda: cases.gram_case("gram", "fused_auto", 16, width, device)
    yield lambda: cases.gradient_step_case("gradnorm", "fused_auto", 8, device)


def _profile_worker(device: str, quick: bool) -> None:
    """For each case: device kernels per step and the top of torch's profiler table."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    sort_by = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    steps = 10
    for make in _profiled_cases(device, quick):
        case = make()
        with profile(activities=activities) as profiler:
            for _ in range(steps):
                case.step()
        events = profiler.key_averages()
        print(f"\n### {case.group}: {case.implementation}")
        if on_cuda:
            kernels = sum(e.count for e in events if e.device_type == DeviceType.CUDA)
            print(f"device kernels per step: {kernels / steps:g}")
        print(events.table(sort_by=sort_by, row_limit=12))
        del case
        if on_cuda:
            torch.cuda.empty_cache()


def _ncu_worker(device: str) -> None:
    """A few launches of each kernel for Nsight Compute to measure, at sizes that fill the GPU."""
    import torch

    from fused_mtl.app.benchmark_cases import gram_case, uncertainty_case

    for case in (
        gram_case("norms", "fused_auto", 8, 1 << 24, device),
        gram_case("gram", "fused_auto", 8, 1 << 24, device),
        gram_case("gram", "fused_auto", 16, 1 << 24, device),
        uncertainty_case("fused_auto", 4096, device, "vector"),
    ):
        case.step()
        torch.cuda.synchronize()


# --- main ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, help="folder for the results")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in order")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small cases: a smoke test")
    parser.add_argument("--revision", help="git revision to record (default: git rev-parse)")
    parser.add_argument("--profile-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ncu-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile_worker:
        _profile_worker(args.device, args.quick)
        return 0
    if args.ncu_worker:
        _ncu_worker(args.device)
        return 0
    if args.out is None:
        parser.error("OUT_DIR is required")
    stages = [stage for stage in args.stages.split(",") if stage]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # compiled kernels on the GPU, not the interpreter
    env.pop("FUSED_MTL_BACKEND", None)
    env["FUSED_MTL_TEST_DEVICE"] = env["FUSED_MTL_BENCH_DEVICE"] = args.device
    env["FUSED_MTL_GIT_REVISION"] = args.revision or _git_revision()
    _ensure_installed(env)
    import torch
    import triton

    import fused_mtl

    args.out.mkdir(parents=True, exist_ok=True)
    gpu = _device_slug(args.device)
    summary = args.out / f"{gpu}-summary.md"
    if not summary.exists():
        summary.write_text(
            "\n".join(
                [
                    f"# GPU validation: {gpu}",
                    "",
                    "```text",
                    *_machine(),
                    "```",
                    "",
                    f"- torch {torch.__version__}, triton {triton.__version__}, "
                    f"python {sys.version.split()[0]}",
                    f"- fused_mtl {fused_mtl.__version__} from {Path(fused_mtl.__file__).parent}",
                    f"- git revision {env['FUSED_MTL_GIT_REVISION']}",
                    "",
                    "",
                ]
            )
        )
    failed = 0
    for stage in stages:
        commands = _stage_commands(stage, args, args.out, gpu)
        started = time.monotonic()
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lines = [f"## {stage} ({date})", ""]
        for command, log in commands:
            remaining = STAGE_TIMEOUT_S - (time.monotonic() - started)
            status = _run(command, log, env, remaining)
            failed += status != 0
            lines.append(f"- `{shlex.join(command)}`: exit status {status}, output in `{log.name}`")
        lines.append(f"- {time.monotonic() - started:.0f} s")
        if stage == "tests":
            lines.append(f"- pytest: {_tests_summary(commands[0][1])}")
        elif stage == "bench":
            lines += ["", *_targets(args.out / f"{gpu}-bench.md")]
            lines += ["", *against_predictions(args.out / f"{gpu}-bench.json")]
        elif stage == "pytest-bench":
            lines += ["", *_targets(args.out / f"{gpu}.md")]
        with summary.open("a") as file:
            file.write("\n".join([*lines, ""]) + "\n")
    print(summary.read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
