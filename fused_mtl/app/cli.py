"""The ``fused-mtl`` command (also ``python -m fused_mtl``): a thin shell over the package.

- ``fused-mtl demo`` trains one network with each balancing method on two synthetic problems
  (:mod:`fused_mtl.app.demo`) and shows what each did: a progress bar (a line every 500 steps
  when the output is not a terminal), a table per problem, PNG plots.
- ``fused-mtl bench`` times the benchmark cases (:mod:`fused_mtl.app.benchmark_cases`, the ones
  ``pytest benchmarks/`` times) and prints them with their ratios; ``--json`` / ``--markdown``
  write them to files.

Both need the ``demo`` extra (rich for progress and tables, matplotlib for the plots):
``pip install "fused-mtl[demo]"``. Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import stat
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from fused_mtl import __version__
from fused_mtl.app.compare import DEFAULT_METHODS as COMPARE_DEFAULT_METHODS
from fused_mtl.app.compare import resolve_methods as compare_resolve_methods
from fused_mtl.app.demo import DEFAULT_METHODS, METHODS, resolve_methods

USAGE_ERROR = 2
DEFAULT_STEPS = 1000
# The demo keeps each step's numbers for the plots. Its default (6 methods x 2 problems x 1000
# steps) takes about a minute on a 2-core CPU; every method at 100,000 steps would take hours.
MAX_STEPS = 100_000
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when present, else cpu)"


class UsageError(Exception):
    """Input the command cannot run with; reported as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _steps(text: str) -> int:
    value = _positive(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_STEPS} steps, got {value} (the demo keeps every step for its plots; "
            f"its default of {DEFAULT_STEPS} takes about a minute on a CPU)"
        )
    return value


def _method_names(resolve: Callable[[str], list[str]]) -> Callable[[str], list[str]]:
    """An argparse type from a resolver of method names: its ValueError as a usage error."""

    def method_names(text: str) -> list[str]:
        try:
            return resolve(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return method_names


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:  # what torch.Generator.manual_seed takes
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {value}")
    return value


def _device(text: str) -> str:
    """A device torch can run here: "cpu", "cuda" or "cuda:N"."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r} was asked for, but torch {torch.__version__} sees no CUDA device"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    return text


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _writable_directory(path: Path, option: str = "--out") -> Path:
    """``path``, created if needed; a UsageError naming ``option`` if files cannot go there."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise UsageError(f"{option} {str(path)!r} is not a writable directory: {reason}") from None
    return path


def _writable_file(path: Path | None, option: str) -> Path | None:
    """``path`` if a file can be written there, checked before any work. A regular file (or a
    new one) gets a byte written and flushed, then taken back: a full disk fails on the flush,
    not when the file is opened. A device (``/dev/full``, ``/dev/null``) gets a newline. A pipe
    is only opened: what is written to it cannot be taken back."""
    if path is None:
        return None
    if path.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a directory, not a file")
    # What the probe creates it removes: a new file, or the missing target of a symlink.
    created = not path.exists()
    if created:
        _writable_directory(path.resolve().parent, option)
    try:
        mode = path.stat().st_mode if path.exists() else stat.S_IFREG
        with open(path, "ab") as handle:
            if stat.S_ISREG(mode):
                size = handle.tell()
                handle.write(b"\n")
                handle.flush()
                handle.truncate(size)
            elif stat.S_ISCHR(mode):
                handle.write(b"\n")
                handle.flush()
    except OSError as error:
        reason = error.strerror or str(error)
        raise UsageError(f"{option} {str(path)!r} cannot be written: {reason}") from None
    finally:
        if created and path.is_file():
            path.resolve().unlink()
    return path


def _missing_extra(package: str) -> UsageError:
    return UsageError(
        f'this command needs the demo extra: pip install "fused-mtl[demo]" ({package} is missing)'
    )


def _rich() -> tuple[Any, Any]:
    """A rich console for this output and rich's Table class."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        raise _missing_extra("rich") from None
    # Tables keep their columns when the output is a file or a pipe instead of a terminal. No
    # markup: what is printed is plain text, and "[peers]" in a note is not a style tag.
    return Console(width=None if sys.stdout.isatty() else 150, markup=False), Table


def _progress(console: Any) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        # The description as plain text, like everything this console prints (no markup).
        TextColumn("{task.description}", style="progress.description", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


# --- fused-mtl demo --------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    console, table_class = _rich()
    try:
        from fused_mtl.app import plots
    except ImportError:
        raise _missing_extra("matplotlib") from None

    out = _writable_directory(Path(args.out))
    threads = torch.get_num_threads()
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        return _demo_in(out, args, console, table_class, plots)
    finally:
        torch.set_num_threads(threads)


def _demo_in(
    out: Path, args: argparse.Namespace, console: Any, table_class: Any, plots: Any
) -> int:
    from fused_mtl.app import benchmark_cases, demo

    methods = args.method
    console.print(
        f"fused-mtl demo: {len(methods)} method(s) x {len(demo.PROBLEMS)} problems, "
        f"{args.steps} steps each, device {args.device}, seed {args.seed}"
    )
    problems = [demo.make_problem(name, args.seed, args.device) for name in demo.PROBLEMS]
    runs: dict[str, list[demo.MethodRun]] = {problem.name: [] for problem in problems}
    summary: dict[str, Any] = {
        "command": " ".join(["fused-mtl demo", *args.argv]),
        "steps": args.steps,
        "seed": args.seed,
        "device": args.device,
        "methods": methods,
        "environment": benchmark_cases.environment(args.device),
        "complete": False,
    }
    summary["environment"]["date"] = datetime.date.today().isoformat()
    summary_path = out / "summary.json"
    started = args.started

    def record() -> None:
        """summary.json with every finished run, rewritten after each method: an interrupt
        keeps what is done. Its wall time runs from the command's start (Python's and torch's
        imports aside)."""
        summary["wall_seconds"] = round(time.perf_counter() - started, 1)
        summary["problems"] = {
            problem.name: _demo_summary(problem, runs[problem.name]) for problem in problems
        }
        _write_atomically(summary_path, json.dumps(summary, indent=1) + "\n")

    run_all = _demo_runs_with_bar if console.is_terminal else _demo_runs_with_lines
    try:
        run_all(console, problems, methods, args, runs, record)
        summary["complete"] = True
    finally:  # also on Ctrl-C: the tables, plots and summary of the finished runs
        record()
        for problem in problems:
            if not runs[problem.name]:
                continue
            console.print(_demo_table(table_class, problem, runs[problem.name]))
            noise_table = _noise_table(table_class, problem, runs[problem.name])
            if noise_table is not None:
                console.print(noise_table)
            for quantity in plots.QUANTITIES:
                path = out / f"{problem.name}_{quantity}.png"
                plots.plot(problem, runs[problem.name], quantity, path)
                console.print(f"wrote {path}")
        record()  # the wall time up to the last plot
        console.print(f"wrote {summary_path} ({summary['wall_seconds']:.0f} s in all)")
    return 0


def _write_atomically(path: Path, text: str) -> None:
    """``path`` holds either its old text or ``text``, never a part of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _remaining(seconds_per_method: Sequence[float], left: int) -> str:
    """The estimate of the time left: the mean time of the finished methods times those left."""
    if not left:
        return "all done"
    estimate = sum(seconds_per_method) / len(seconds_per_method) * left
    return f"{left} left, about {estimate:.0f} s"


def _demo_runs_with_lines(
    console: Any,
    problems: Sequence[Any],
    methods: Sequence[str],
    args: Any,
    runs: dict,
    record: Callable[[], None],
) -> None:
    """Without a terminal: a line every ``PROGRESS_LINE_STEPS`` steps, one per finished run and
    one per finished method, with an estimate of the time left."""
    from fused_mtl.app import demo

    seconds_per_method: list[float] = []
    for number, method in enumerate(methods, start=1):
        started = time.perf_counter()
        for problem in problems:
            done = [0]

            def report(method: str = method, problem: Any = problem, done: list = done) -> None:
                done[0] += 1
                if done[0] % PROGRESS_LINE_STEPS == 0 and done[0] < args.steps:
                    print(f"{problem.name}: {method}: step {done[0]}/{args.steps}", flush=True)

            run = demo.train(problem, method, args.steps, args.seed, on_step=report)
            print(
                f"{problem.name}: {method}: done, {run.seconds_per_step * 1e3:.2f} ms/step",
                flush=True,
            )
            runs[problem.name].append(run)
        seconds_per_method.append(time.perf_counter() - started)
        record()
        left = _remaining(seconds_per_method, len(methods) - number)
        print(
            f"method {number}/{len(methods)} {method}: done in {seconds_per_method[-1]:.1f} s; "
            f"{left}",
            flush=True,
        )


def _demo_runs_with_bar(
    console: Any,
    problems: Sequence[Any],
    methods: Sequence[str],
    args: Any,
    runs: dict,
    record: Callable[[], None],
) -> None:
    """In a terminal: one bar over every step of every run, with the time left."""
    from fused_mtl.app import demo

    with _progress(console) as progress:
        total = len(methods) * len(problems) * args.steps
        bar = progress.add_task("demo", total=total)
        advance = functools.partial(progress.advance, bar)
        for number, method in enumerate(methods, start=1):
            started = time.perf_counter()
            for problem in problems:
                progress.update(bar, description=f"{method}: {problem.name}")
                run = demo.train(problem, method, args.steps, args.seed, on_step=advance)
                runs[problem.name].append(run)
            record()
            console.print(
                f"method {number}/{len(methods)} {method}: done in "
                f"{time.perf_counter() - started:.1f} s"
            )


def _task_labels(problem: Any) -> list[str]:
    noise = problem.train.noise_variances
    if noise is not None:
        return [f"{i} (noise {float(v):g})" for i, v in enumerate(noise)]
    return [f"{i} (scale {float(s):.3g})" for i, s in enumerate(problem.train.sigmas)]


def _lines(values: Any, spec: str = ".3g") -> str:
    return "\n".join(format(float(v), spec) for v in values)


def _demo_table(table_class: Any, problem: Any, runs: Sequence[Any]) -> Any:
    table = table_class(title=problem.description, show_lines=True)
    for column in ("method", "task", "test loss", "L(t)/L(0)", "final weight"):
        table.add_column(column, justify="left" if column in ("method", "task") else "right")
    table.add_column("spread of L(t)/L(0)", justify="right")
    table.add_column("ms / step", justify="right")
    labels = "\n".join(_task_labels(problem))
    for run in runs:
        table.add_row(
            METHODS[run.method],
            labels,
            _lines(run.test_losses),
            _lines(run.loss_ratios[-1]),
            _lines(run.weights[-1]),
            f"{run.rate_spread:.3f}",
            f"{run.seconds_per_step * 1e3:.2f}",
        )
    return table


def _noise_table(table_class: Any, problem: Any, runs: Sequence[Any]) -> Any | None:
    """Uncertainty weighting's learned sigma^2 next to the true noise variances."""
    learned = [run.learned_variances for run in runs if run.learned_variances is not None]
    noise = problem.train.noise_variances
    if not learned or noise is None:
        return None
    table = table_class(title="uncertainty weighting: learned sigma^2 vs the true noise variance")
    for column in ("task", "true noise variance", "learned sigma^2"):
        table.add_column(column, justify="right")
    for task, (true, found) in enumerate(zip(noise.tolist(), learned[0].tolist(), strict=True)):
        table.add_row(str(task), f"{true:.3g}", f"{found:.3g}")
    return table


def _demo_summary(problem: Any, runs: Sequence[Any]) -> dict[str, Any]:
    from fused_mtl.app import demo

    noise = problem.train.noise_variances
    return {
        "description": problem.description,
        "noise_variances": None if noise is None else noise.tolist(),
        "methods": {
            run.method: {
                "test_losses": run.test_losses.tolist(),
                "final_loss_ratios": run.loss_ratios[-1].tolist(),
                "rate_spread": run.rate_spread,
                "final_weights": run.weights[-1].tolist(),
                "first_weights": run.weights[: demo.FIRST_STEPS].tolist(),
                "first_batch_losses": run.batch_losses[: demo.FIRST_STEPS].tolist(),
                "learned_variances": None
                if run.learned_variances is None
                else run.learned_variances.tolist(),
                "ms_per_step": run.seconds_per_step * 1e3,
            }
            for run in runs
        },
    }


# --- fused-mtl bench -------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    console, table_class = _rich()
    from fused_mtl.app import benchmark_cases, benchmark_report

    json_path = _writable_file(args.json, "--json")
    markdown_path = _writable_file(args.markdown, "--markdown")
    factories = list(benchmark_cases.suite(args.device, quick=args.quick))
    min_run_time = 0.05 if args.quick else 0.5
    results: list[benchmark_report.Result | None] = []
    # The cases of one group (consecutive in the suite) are built, then timed together in
    # interleaved rounds. A group's cases are known once the next group's first is built; no
    # group starts with a compiled case, whose build resets dynamo.
    group: list[tuple[int, benchmark_cases.Case]] = []
    with _progress(console) as progress:
        bar = progress.add_task("benchmark cases", total=len(factories))

        def time_group() -> None:
            progress.update(bar, description=f"{group[0][1].group}: timing")
            cases = [case for _, case in group]
            for (index, _), result in zip(
                group, benchmark_report.measure_group(cases, min_run_time), strict=True
            ):
                results[index] = result
            progress.advance(bar, len(group))
            group.clear()

        for make in factories:
            try:
                case = make()
            except benchmark_cases.Unavailable as missing:
                results.append(
                    benchmark_report.Result(
                        missing.group, missing.implementation, "", None, skipped=missing.reason
                    )
                )
                progress.advance(bar)
                continue
            if group and group[0][1].group != case.group:
                time_group()
            progress.update(bar, description=f"{case.group}: {case.implementation}")
            results.append(None)
            group.append((len(results) - 1, case))
        if group:
            time_group()
    results = [result for result in results if result is not None]  # every one is set by now
    environment = benchmark_cases.environment(args.device)
    environment["date"] = datetime.date.today().isoformat()
    command = "fused-mtl bench " + " ".join(args.argv)
    table = table_class(title=f"fused-mtl bench on {environment['device_name']}")
    for column in benchmark_report.COLUMNS:
        table.add_column(
            column, justify="left" if column in ("group", "implementation") else "right"
        )
    for row in benchmark_report.table_rows(results):
        table.add_row(*row.values())
    console.print(table)
    for note in benchmark_report.notes_under_the_table(results):
        console.print(note)
    checks = benchmark_report.target_checks(results, args.device)
    if checks:
        targets = table_class(title="targets")
        for column in ("target", "measured", "met"):
            targets.add_column(column, justify="left" if column == "target" else "right")
        for check in checks:
            targets.add_row(check.target, check.measured, benchmark_report.verdict(check.met))
        console.print(targets)
    if json_path is not None:
        document = {
            "environment": environment,
            "command": command,
            "min_run_time_s": min_run_time,
            "results": [result.to_json() for result in results],
        }
        json_path.write_text(json.dumps(document, indent=1) + "\n")
        console.print(f"wrote {json_path}")
    if markdown_path is not None:
        markdown_path.write_text(benchmark_report.markdown(results, environment, command))
        console.print(f"wrote {markdown_path}")
    return 0


# --- fused-mtl compare -----------------------------------------------------------------------


def _problems(text: str) -> list[str]:
    from fused_mtl.app.compare_problems import PROBLEMS

    names = [name.strip() for name in text.split(",")]
    if names == ["all"]:
        return list(PROBLEMS)
    for name in names:
        if name not in PROBLEMS:
            raise argparse.ArgumentTypeError(
                f"unknown problem {name!r}; expected all or comma-separated names among "
                f"{', '.join(PROBLEMS)}"
            )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError("a problem is named twice")
    return names


def _default_jobs() -> int:
    """One process per core this process may use, at most ``MAX_DEFAULT_JOBS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_JOBS))


def _check_something_runs(
    problems: list[Any], methods: list[str], skipped: dict[str, dict[str, str]]
) -> None:
    """A usage error, before any training, when a problem has no method that can be built for
    its tasks (the others' rows say why they were not run)."""
    for problem in problems:
        if len(skipped[problem.name]) == len(methods):
            reasons = "; ".join(skipped[problem.name].values())
            raise UsageError(
                f"no method given can run on {problem.name} ({len(problem.tasks)} tasks): "
                f"{reasons}; add another method or leave the problem out (--problem)"
            )


def _compare(args: argparse.Namespace) -> int:
    console, table_class = _rich()
    try:
        from fused_mtl.app import plots
    except ImportError:
        raise _missing_extra("matplotlib") from None
    from fused_mtl.app import benchmark_cases, compare_problems, compare_report, datasets

    out = _writable_directory(Path(args.out))
    try:  # every data set read before any training: a missing package fails at once
        problems = [compare_problems.make_problem(name) for name in args.problem]
    except datasets.MissingData as missing:
        raise UsageError(str(missing)) from None
    jobs = args.jobs or (1 if torch.device(args.device).type == "cuda" else _default_jobs())
    seeds = list(range(args.seeds))
    methods = args.method
    skipped = compare_problems.not_run(problems, methods, args.device)
    _check_something_runs(problems, methods, skipped)
    total = sum(args.seeds * (len(p.tasks) + len(methods) - len(skipped[p.name])) for p in problems)
    epochs = {p.name: args.epochs or p.epochs for p in problems}
    console.print(
        f"fused-mtl compare: {len(methods)} method(s) and single-task models on "
        f"{len(problems)} problem(s) ({', '.join(f'{n}: {e} epochs' for n, e in epochs.items())}), "
        f"{args.seeds} seed(s), {total} runs on {jobs} process(es), device {args.device}"
    )
    for name, reasons in skipped.items():
        for method, reason in reasons.items():
            console.print(f"{method} is not run on {name}: {reason}")
    descriptions = {p.name: p.description for p in problems}
    started = args.started
    progress_done = [0]

    def line(job: Any, result: Any) -> str:
        progress_done[0] += 1
        what = job.method if job.task is None else f"single-task {job.task}"
        if result.diverged:
            state = f"diverged: {result.diverged}"
        else:
            state = f"epoch {result.selected_epoch} kept, {result.seconds_per_epoch:.2f} s/epoch"
        return f"{job.problem}: {what}, seed {job.seed}: {state}"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each run's: in every worker process, and here with one job
    environment = benchmark_cases.environment(args.device)
    environment["date"] = datetime.date.today().isoformat()
    environment["data_packages"] = datasets.versions()
    try:
        if console.is_terminal:
            with _progress(console) as progress:
                bar = progress.add_task("compare", total=total)

                def on_run(job: Any, result: Any) -> None:
                    progress.update(bar, description=line(job, result)[:60])
                    progress.advance(bar)

                comparisons = compare_problems.run_jobs(
                    problems, methods, seeds, args.device, jobs, args.epochs, on_run, skipped
                )
        else:

            def on_run(job: Any, result: Any) -> None:
                text = line(job, result)
                elapsed = time.perf_counter() - started
                left = elapsed / progress_done[0] * (total - progress_done[0])
                print(f"[{progress_done[0]}/{total}, ~{left:.0f} s left] {text}", flush=True)

            comparisons = compare_problems.run_jobs(
                problems, methods, seeds, args.device, jobs, args.epochs, on_run, skipped
            )
        complete = True
    except compare_problems.Interrupted as interrupted:  # Ctrl-C: what finished is kept
        comparisons, complete = interrupted.comparisons, False
    except FloatingPointError as error:
        raise UsageError(str(error)) from None
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - started
    if not complete:
        console.print(
            "interrupted: the tables, files and plot below hold the problems and methods whose "
            "runs all finished"
        )
    for name, comparison in comparisons.items():
        header, rows = compare_report.summary_table(comparison)
        table = table_class(title=f"{name}: {descriptions[name]}")
        for column in header:
            table.add_column(column, justify="left" if column == "method" else "right")
        for cells in rows:
            table.add_row(*cells)
        console.print(table)
        for line in compare_report.not_run_lines(comparison):
            console.print(line)
    command = " ".join(["fused-mtl compare", *args.argv])
    summary = {
        "command": command,
        "seeds": seeds,
        "methods": methods,
        "jobs": jobs,
        "device": args.device,
        "environment": environment,
        "wall_seconds": round(wall, 1),
        "complete": complete,
        "problems": {
            name: {"description": descriptions[name], **comparison.to_json()}
            for name, comparison in comparisons.items()
        },
    }
    json_path, markdown_path, plot_path = (
        out / "comparison.json",
        out / "comparison.md",
        out / "delta_m.png",
    )
    _write_atomically(json_path, json.dumps(summary, indent=1) + "\n")
    header_lines = [
        "# fused-mtl compare",
        "",
        f"`{command}` on {environment['device_name']}, torch {environment['torch']}, "
        f"{jobs} process(es), {wall:.0f} s in all, {environment['date']}.",
    ]
    markdown_path.write_text(
        compare_report.markdown(comparisons, descriptions, seeds, header_lines)
    )
    written = [json_path, markdown_path]
    if comparisons:
        plots.plot_delta_m(comparisons, descriptions, plot_path)
        written.append(plot_path)
    for path in written:
        console.print(f"wrote {path}")
    console.print(f"{wall:.0f} s in all")
    if not complete:
        print("fused-mtl compare: interrupted", file=sys.stderr)
        return 130  # the shell's status for SIGINT
    return 0


# --- entry points ----------------------------------------------------------------------------


DEMO_EXAMPLES = f"""\
  fused-mtl demo                         one method of each family, both problems, ~1 min on CPU
  fused-mtl demo --method all            all {len(METHODS)} methods
  fused-mtl demo --methods mgda,NashMTL,famo --steps 500
  fused-mtl demo --device cuda --out runs/demo
"""
COMPARE_EXAMPLES = """\
  fused-mtl compare                      12 methods, 3 real data sets, 3 seeds, ~8 min
  fused-mtl compare --method all --seeds 5
  fused-mtl compare --problem penguins --method equal,uw --epochs 20
"""
BENCH_EXAMPLES = """\
  fused-mtl bench --quick                a few small cases, short timings
  fused-mtl bench --json bench.json --markdown bench.md
"""
#: Without a terminal (a pipe, a file, CI) the demo prints a line every this many steps of a
#: method instead of a progress bar, which only a terminal redraws.
PROGRESS_LINE_STEPS = 500
#: ``fused-mtl compare`` runs one process per core by default, up to this many.
MAX_DEFAULT_JOBS = 8


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The examples' layout kept, and every option's default shown."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        shown = default is not None and default is not False and default != argparse.SUPPRESS
        if shown and "%(default)" not in help_text:
            help_text += " (default: %(default)s)"
        return help_text


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fused-mtl",
        description="fused-mtl: train with each loss-balancing method (demo), compare them on "
        "real data (compare) or time the fused ops (bench).",
        epilog="examples:\n" + DEMO_EXAMPLES + COMPARE_EXAMPLES + BENCH_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fused-mtl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,compare,bench}")

    demo = commands.add_parser(
        "demo",
        help="train a multi-task network with each balancing method and compare them",
        description=textwrap.fill(
            "Train the same network with each balancing method on the GradNorm paper's toy "
            "regression and on tasks with known noise; print a table per problem and write PNG "
            "plots (weights and loss ratios over the steps) and summary.json to --out.",
            width=78,
        ),
        epilog="examples:\n" + DEMO_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    demo.add_argument(
        "--method",
        "--methods",
        dest="method",
        type=_method_names(resolve_methods),
        default=",".join(DEFAULT_METHODS),
        metavar="METHODS",
        help="comma-separated methods, by key or class name (MGDA, NashMTL), or all: "
        f"{', '.join(METHODS)}",
    )
    demo.add_argument(
        "--threads",
        type=_positive,
        default=1,
        help="CPU threads for torch: the demo's small layers gain little from more, and more "
        "threads than free cores slow every step down many times over",
    )
    demo.add_argument(
        "--steps",
        type=_steps,
        default=DEFAULT_STEPS,
        help=f"training steps per method and problem, 1 to {MAX_STEPS:,}",
    )
    demo.add_argument("--device", type=_device, default=None, help=DEVICE_HELP)
    demo.add_argument("--seed", type=_seed, default=0, help="seed of the data and the network")
    demo.add_argument(
        "--out", default="fused-mtl-demo", help="folder for the plots and summary.json (created)"
    )
    demo.set_defaults(run=_demo)

    compare = commands.add_parser(
        "compare",
        help="which method helps on real data: each method against single-task models (Δm%%)",
        description=textwrap.fill(
            "Train a fixed small network with each balancing method and single-task models on "
            "real multi-task data that ships with common packages (scikit-learn's digits as "
            "MultiMNIST, river's yeast, palmerpenguins), several seeds, the epoch selected on "
            "validation; print Δm% against the single-task models and each task's test "
            "metric; write comparison.json, comparison.md and delta_m.png to --out. Needs the "
            'demo and data extras: pip install "fused-mtl[demo,data]".',
            width=78,
        ),
        epilog="examples:\n" + COMPARE_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    compare.add_argument(
        "--problem",
        "--problems",
        dest="problem",
        type=_problems,
        default="all",
        metavar="PROBLEMS",
        help="comma-separated problems, or all: multi_digits, yeast, penguins",
    )
    compare.add_argument(
        "--method",
        "--methods",
        dest="method",
        type=_method_names(compare_resolve_methods),
        default="default",
        metavar="METHODS",
        help="comma-separated methods (keys or class names, as for demo), all, or default: "
        f"{', '.join(COMPARE_DEFAULT_METHODS)}",
    )
    compare.add_argument(
        "--seeds", type=_positive, default=3, help="runs per method: seeds 0 to SEEDS-1"
    )
    compare.add_argument(
        "--epochs",
        type=_positive,
        default=None,
        help="epochs of every run (default: each problem's own: 18, 30, 150)",
    )
    compare.add_argument(
        "--jobs",
        type=_positive,
        default=None,
        help="processes running at once, one torch thread each (default: one per core, at "
        f"most {MAX_DEFAULT_JOBS}; 1 on CUDA)",
    )
    compare.add_argument("--device", type=_device, default=None, help=DEVICE_HELP)
    compare.add_argument(
        "--out",
        default="fused-mtl-compare",
        help="folder for comparison.json, comparison.md and delta_m.png (created)",
    )
    compare.set_defaults(run=_compare)

    bench = commands.add_parser(
        "bench",
        help="time the fused ops against eager PyTorch and torch.compile",
        description=textwrap.fill(
            "Time the fused ops and the balancing methods against what users run today "
            "(per-task loops, vectorised eager, torch.compile of the loop) on this machine.",
            width=78,
        ),
        epilog="examples:\n" + BENCH_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    bench.add_argument("--device", type=_device, default=None, help=DEVICE_HELP)
    bench.add_argument("--quick", action="store_true", help="a few small cases, short timings")
    bench.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON"
    )
    bench.add_argument(
        "--markdown",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the results as a markdown table",
    )
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.started = started
    args.argv = argv[1:]
    args.device = args.device or _default_device()
    try:
        return args.run(args)
    except UsageError as error:
        print(f"fused-mtl {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"fused-mtl {args.command}: interrupted", file=sys.stderr)
        return 130  # the shell's status for SIGINT


def run() -> NoReturn:
    """The console script."""
    sys.exit(main())
