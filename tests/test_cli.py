"""The ``fused-mtl`` command: demo and bench run, write what they say, and turn bad input into one
line on stderr with exit status 2. Most tests call ``cli.main`` in-process (no torch start-up per
run); the console script and ``python -m fused_mtl`` are run as processes."""

import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from formulas import log_variance
from PIL import Image

import fused_mtl
import fused_mtl.app
from fused_mtl import __version__
from fused_mtl.app import cli, demo
from fused_mtl.app.benchmark_cases import per_task_loop, vectorized_eager
from fused_mtl.app.benchmark_report import Result, markdown, table_rows, target_checks

THREADS = torch.get_num_threads()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = [
    f"{problem}_{quantity}.png"
    for problem in demo.PROBLEMS
    for quantity in ("weights", "loss_ratios")
]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()  # parses every chunk and checks the CRCs
    with Image.open(path) as image:
        width, height = image.size
        assert image.format == "PNG" and width >= 300 and height >= 200, (path, image.size)
        darkest, lightest = image.convert("L").getextrema()
        assert darkest < 100 < lightest  # lines and text drawn on a light background


# --- demo ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(demo.METHODS))
def test_demo_runs_each_method(capsys, tmp_path, method):
    status, out, err = run_cli(
        capsys,
        "demo",
        "--method",
        method,
        "--steps",
        "4",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    )
    assert status == 0, err
    for problem in demo.PROBLEMS:
        assert demo.make_problem(problem).description in out
    assert demo.METHODS[method] in out
    for header in ("test loss", "L(t)/L(0)", "final weight", "spread of L(t)/L(0)", "ms / step"):
        assert header in out
    for name in PLOTS:
        assert_valid_png(tmp_path / name)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 4
    for problem, num_tasks in (("gradnorm_toy", 4), ("known_noise", 3)):
        record = summary["problems"][problem]["methods"][method]
        assert set(summary["problems"][problem]["methods"]) == {method}
        for key in ("test_losses", "final_loss_ratios", "final_weights"):
            assert len(record[key]) == num_tasks and all(math.isfinite(v) for v in record[key])
        # The table prints what the summary holds: each final test loss, to 3 digits.
        for loss in record["test_losses"]:
            assert format(loss, ".3g") in out
        for key in ("first_weights", "first_batch_losses"):
            assert len(record[key]) == min(summary["steps"], demo.FIRST_STEPS)
            assert all(len(row) == num_tasks for row in record[key])
        assert record["ms_per_step"] > 0
        assert (record["learned_variances"] is not None) == (method == "uw")
    assert ("learned sigma^2" in out) == (method == "uw")


HELP_OPTIONS = {
    "demo": ("--method", "--threads", "--steps", "--device", "--seed", "--out"),
    "bench": ("--device", "--quick", "--json", "--markdown"),
}


@pytest.mark.parametrize("command", list(HELP_OPTIONS))
def test_help_explains_every_option_with_its_default_and_examples(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":mod:" not in text  # no reStructuredText markup
    assert "examples:" in text and f"fused-mtl {command} --" in text
    options = text.split("options:")[1].split("examples:")[0]
    for option in HELP_OPTIONS[command]:
        # The option's line carries a description after its metavar.
        line = next(line for line in options.splitlines() if line.strip().startswith(option))
        assert len(line.split()) >= 3, line
    if command == "demo":
        defaults = (
            "(default: equal,uw,gradnorm,mgda,famo,moco)",
            "(default: 1000)",
            "(default: 0)",
        )
        flowing = " ".join(text.split())  # argparse wraps at the terminal's width
        for default in (*defaults, "fused-mtl-demo)", "(default: 1)"):
            assert default in flowing, default


def test_demo_prints_a_line_every_n_steps_when_not_a_terminal(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "PROGRESS_LINE_STEPS", 4)
    status, out, _ = run_cli(
        capsys, "demo", "--method", "equal,uw", "--steps", "10", "--out", str(tmp_path)
    )
    assert status == 0
    lines = [line for line in out.splitlines() if line.startswith("gradnorm_toy: equal")]
    assert lines[:2] == ["gradnorm_toy: equal: step 4/10", "gradnorm_toy: equal: step 8/10"]
    assert lines[2].startswith("gradnorm_toy: equal: done, ") and lines[2].endswith(" ms/step")
    assert "known_noise: equal: step 8/10" in out
    # One line per finished method, with the time left: the mean of the finished ones.
    finished = [line for line in out.splitlines() if line.startswith("method ")]
    assert len(finished) == 2, out
    first = re.fullmatch(
        r"method 1/2 equal: done in ([\d.]+) s; 1 left, about (\d+) s", finished[0]
    )
    assert first is not None, finished[0]
    assert abs(float(first[2]) - float(first[1])) <= 0.5 + 1e-9
    assert re.fullmatch(r"method 2/2 uw: done in [\d.]+ s; all done", finished[1]), finished[1]


def test_demo_runs_one_method_of_each_family_by_default(capsys, tmp_path):
    status, out, err = run_cli(capsys, "demo", "--steps", "2", "--out", str(tmp_path))
    assert status == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["methods"] == list(demo.DEFAULT_METHODS) and summary["complete"] is True
    for problem in demo.PROBLEMS:
        assert list(summary["problems"][problem]["methods"]) == list(demo.DEFAULT_METHODS)
    for name in demo.DEFAULT_METHODS:
        assert demo.METHODS[name] in out
    for name in PLOTS:
        assert_valid_png(tmp_path / name)
    # What reproduces the run is recorded with it.
    assert summary["command"] == f"fused-mtl demo --steps 2 --out {tmp_path}"
    environment = summary["environment"]
    assert environment["torch"] == torch.__version__ and environment["cpu_threads"] == 1
    for key in ("git_revision", "date", "device_name", "triton"):
        assert key in environment
    assert summary["wall_seconds"] > 0
    assert torch.get_num_threads() == THREADS  # the demo's one thread is not left behind


def test_demo_runs_every_method_with_all(capsys, tmp_path):
    status, out, err = run_cli(
        capsys, "demo", "--method", "all", "--steps", "2", "--out", str(tmp_path)
    )
    assert status == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    for problem in demo.PROBLEMS:
        assert list(summary["problems"][problem]["methods"]) == list(demo.METHODS)
    for name in demo.METHODS.values():
        assert name in out


@pytest.mark.parametrize(
    ("text", "keys"),
    [
        ("MGDA", ["mgda"]),
        ("mgda,NashMTL, imtl-g", ["mgda", "nash_mtl", "imtl_g"]),
        ("UncertaintyWeighting,RandomWeighting,GeometricMean", ["uw", "rlw", "gls"]),
        ("Aligned-MTL,excessmtl,IMTLL", ["aligned_mtl", "excess_mtl", "imtl_l"]),
        ("default", list(demo.DEFAULT_METHODS)),
    ],
)
def test_methods_by_key_or_class_name(text, keys):
    for option in ("--method", "--methods"):
        assert cli._parser().parse_args(["demo", option, text]).method == keys


def test_in_a_terminal_one_bar_names_the_method_and_problem(tmp_path, monkeypatch):
    from rich.console import Console
    from rich.table import Table

    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, markup=False, width=150)
    monkeypatch.setattr(cli, "_rich", lambda: (terminal, Table))
    status = cli.main(["demo", "--methods", "equal", "--steps", "3", "--out", str(tmp_path)])
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", screen.getvalue())  # colours and cursor moves
    assert status == 0
    assert "equal: known_noise" in text and "6/6" in text, text
    assert "[progress" not in text  # the column's style, not printed as text
    assert "method 1/1 equal: done in " in text


def test_an_interrupted_demo_keeps_the_finished_methods(capsys, tmp_path, monkeypatch):
    """Ctrl-C during the third run (the second method's first problem): the first method's two
    runs are in summary.json, the tables and the plots; the exit status is the shell's 130."""
    train, calls = demo.train, []

    def interrupted_on_the_third_run(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    monkeypatch.setattr(demo, "train", interrupted_on_the_third_run)
    status, out, err = run_cli(
        capsys, "demo", "--methods", "equal,uw,mgda", "--steps", "3", "--out", str(tmp_path)
    )
    assert status == 130 and "interrupted" in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] is False and summary["methods"] == ["equal", "uw", "mgda"]
    for problem in demo.PROBLEMS:
        assert list(summary["problems"][problem]["methods"]) == ["equal"]
    assert demo.METHODS["equal"] in out and demo.METHODS["uw"] not in out
    for name in PLOTS:
        assert_valid_png(tmp_path / name)
    assert not list(tmp_path.glob("*.partial"))


def _without_times(summary: dict) -> dict:
    for key in ("command", "wall_seconds", "environment"):
        summary.pop(key)
    for problem in summary["problems"].values():
        for record in problem["methods"].values():
            record.pop("ms_per_step")
    return summary


def test_demo_is_deterministic_for_a_seed(capsys, tmp_path):
    summaries = []
    for run, seed in enumerate(["3", "3", "4"]):
        out = tmp_path / str(run)
        argv = ["demo", "--method", "gradnorm", "--steps", "6", "--seed", seed, "--out", str(out)]
        assert run_cli(capsys, *argv)[0] == 0
        summaries.append(_without_times(json.loads((out / "summary.json").read_text())))
    assert summaries[0] == summaries[1]
    assert summaries[0]["problems"] != summaries[2]["problems"]


def test_uncertainty_weighting_learns_the_known_noise_variances():
    """What the demo shows: on tasks with label noise of variance 0.01, 0.1 and 1, the learned
    sigma^2 = exp(s) approaches each variance (the optimum of exp(-s)·L + s is s = log L, and a
    task's loss cannot go below its noise)."""
    problem = demo.make_problem("known_noise", seed=0)
    run = demo.train(problem, "uw", steps=600, seed=0)
    truth = problem.train.noise_variances
    ratio = run.learned_variances / truth
    assert torch.all((ratio > 0.6) & (ratio < 1.5)), (run.learned_variances, truth)


def test_gradnorm_evens_out_training_rates_in_the_demo():
    """The demo's "spread of L(t)/L(0)" column tells GradNorm from equal weighting on the toy."""
    problem = demo.make_problem("gradnorm_toy", seed=0)
    equal = demo.train(problem, "equal", steps=300, seed=0)
    gradnorm = demo.train(problem, "gradnorm", steps=300, seed=0)
    assert gradnorm.rate_spread < 0.6 * equal.rate_spread, (gradnorm.rate_spread, equal.rate_spread)
    # rate_spread is the standard deviation across tasks of the final test-loss ratios.
    final = [float(v) for v in equal.loss_ratios[-1]]
    mean = sum(final) / len(final)
    expected = math.sqrt(sum((v - mean) ** 2 for v in final) / (len(final) - 1))
    assert equal.rate_spread == pytest.approx(expected, rel=1e-6)


# --- bench -----------------------------------------------------------------------------------


def test_bench_quick_prints_and_writes_the_table(capsys, tmp_path):
    json_path, markdown_path = tmp_path / "bench.json", tmp_path / "bench.md"
    status, out, err = run_cli(
        capsys,
        "bench",
        "--quick",
        "--device",
        "cpu",
        "--json",
        str(json_path),
        "--markdown",
        str(markdown_path),
    )
    assert status == 0, err
    document = json.loads(json_path.read_text())
    assert document["environment"]["torch"] == torch.__version__
    assert document["environment"]["device_name"] == "cpu"
    assert document["command"] == f"fused-mtl bench --quick --device cpu --json {json_path} " + (
        f"--markdown {markdown_path}"
    )
    results = {(r["group"], r["implementation"]): r for r in document["results"]}
    for group in ("uncertainty K=2", "uncertainty K=8", "uncertainty K=8, (K,) tensor"):
        for implementation in ("fused_auto", "torch_fallback", "per_task_loop"):
            assert results[(group, implementation)]["median_s"] > 0
        for implementation in ("vectorized_eager", "compiled_loop"):
            assert results[(group, implementation)]["median_s"] > 0
        assert results[(group, "compiled_loop")]["compile_seconds"] > 0
        assert "CUDA" in results[(group, "cuda_graph")]["skipped"]
        assert f"| {group} | per_task_loop |" in markdown_path.read_text()
    for group in ("norms K=8 P=65536", "gram K=8 P=65536", "gradnorm step K=8", "mgda step K=8"):
        assert any(g == group and r["median_s"] for (g, _), r in results.items()), group
    copy = results[("copy K=8 P=65536", "copy")]
    assert copy["median_s"] > 0 and copy["bytes_moved"] == 2 * 8 * 65536 * 4
    assert results[("norms K=8 P=65536", "per_task")]["bytes_moved"] == 8 * 65536 * 4 + 8 * 4
    for implementation in ("empty_triton_kernel", "empty_triton_kernel_graph"):
        assert "CUDA" in results[("launch floor", implementation)]["skipped"]
    for method in ("equal", "uw", "dwa", "dtp", "gradnorm", "mgda"):
        assert results[("method step K=8", method)]["median_s"] > 0
    # The notes are printed as written: rich's markup would take "[peers]" for a style tag.
    for result in document["results"]:
        if result["skipped"] and "[" in result["skipped"]:
            assert result["skipped"] in " ".join(out.split()), result["skipped"]
    for text in (out, markdown_path.read_text()):
        for column in ("time per call", "baseline / this", "torch.compile / this", "GB/s"):
            assert column in text
        assert "uncertainty K=8" in text and "compiled_loop" in text
        assert "Targets" not in text and "targets" not in text  # GPU targets: none on a CPU


def test_bench_ratios_are_baseline_time_over_this_time():
    results = [
        Result("uncertainty K=8", "per_task_loop", "per_task_loop", 3e-3),
        Result("uncertainty K=8", "fused_auto", "per_task_loop", 1e-3, bytes_moved=2_000_000),
        Result("uncertainty K=8", "compiled_loop", "per_task_loop", 2e-3, compile_seconds=4.0),
        Result("uncertainty K=8", "cuda_graph", "", None, skipped="needs CUDA"),
        Result("gram K=2 P=4", "fused_auto", "matmul", 5e-6),
    ]
    rows = {(row["group"], row["implementation"]): row for row in table_rows(results)}
    fused = rows[("uncertainty K=8", "fused_auto")]
    assert fused["time per call"] == "1.00 ms"
    assert fused["baseline / this"] == "3.00×"
    assert fused["torch.compile / this"] == "2.00×"
    assert fused["GB/s"] == "2.0"  # 2 MB in 1 ms
    assert rows[("uncertainty K=8", "per_task_loop")]["baseline / this"] == "1.00×"
    assert rows[("uncertainty K=8", "compiled_loop")]["time per call"] == "2.00 ms"
    assert ("uncertainty K=8", "cuda_graph") not in rows
    gram = rows[("gram K=2 P=4", "fused_auto")]
    assert gram["time per call"] == "5 µs"
    assert gram["baseline / this"] == gram["torch.compile / this"] == ""  # nothing to compare
    text = markdown(results, {"device_name": "cpu", "torch": "x"}, "fused-mtl bench")
    assert "- not run: uncertainty K=8 cuda_graph: needs CUDA" in text
    assert text.count("\n| ") == 1 + 4  # the header and the four cases that ran


def test_targets_are_checked_from_the_medians():
    """Each GPU target from hand-made CUDA results: met, missed, and the figures behind it."""
    megabyte = 1 << 20
    results = [
        Result("launch floor", "empty_triton_kernel_graph", "empty_triton_kernel", 4e-6),
        Result("uncertainty K=2", "per_task_loop", "per_task_loop", 60e-6),
        Result("uncertainty K=2", "fused_auto", "per_task_loop", 15e-6),  # 4×: missed
        Result("uncertainty K=2", "compiled_loop", "per_task_loop", 30e-6),
        Result("uncertainty K=2", "cuda_graph", "per_task_loop", 6e-6),  # 1.5× the floor: met
        Result("uncertainty K=8", "per_task_loop", "per_task_loop", 1e-3),  # no K=8 target
        Result("uncertainty K=8", "fused_auto", "per_task_loop", 20e-6),
        Result("uncertainty K=64, (K,) tensor", "per_task_loop", "per_task_loop", 2e-3),
        Result("uncertainty K=64, (K,) tensor", "fused_auto", "per_task_loop", 20e-6),  # 100×
        Result("uncertainty K=64, (K,) tensor", "compiled_loop", "per_task_loop", 10e-6),
        Result("uncertainty K=64, (K,) tensor", "cuda_graph", "per_task_loop", 7e-6),
        Result("copy K=8 P=16777216", "copy", "copy", 2e-3, bytes_moved=1000 * megabyte),
        Result("norms K=8 P=16777216", "fused_auto", "per_task", 1e-3, bytes_moved=450 * megabyte),
        Result("norms K=8 P=16777216", "per_task", "per_task", 2e-3, bytes_moved=450 * megabyte),
        Result("gram K=8 P=1048576", "fused_auto", "matmul", 1e-4, bytes_moved=megabyte),
        Result("gram K=8 P=1048576", "matmul", "matmul", 1e-3, bytes_moved=megabyte),
        Result("gradnorm step K=8", "fused_auto", "per_task_loop", 2e-3),
        Result("gradnorm step K=8", "per_task_loop", "per_task_loop", 5e-3),
    ]
    checks = {check.target: (check.measured, check.met) for check in target_checks(results, "cuda")}
    assert checks == {
        "uncertainty K=2: fused ≥ 5× the loop": ("4.00×", False),
        "uncertainty K=2: fused no slower than compiled loop": ("2.00×", True),
        "uncertainty K=2: graph replay ≤ 1.5× an empty kernel's": ("1.50× (6 µs vs 4 µs)", True),
        "uncertainty K=64, (K,) tensor: fused ≥ 50× the loop": ("100.00×", True),
        "uncertainty K=64, (K,) tensor: fused no slower than compiled loop": ("0.50×", False),
        "uncertainty K=64, (K,) tensor: graph replay ≤ 1.5× an empty kernel's": (
            "1.75× (7 µs vs 4 µs)",
            False,
        ),
        # 450 MiB in 1 ms against 1000 MiB in 2 ms: 90% of the copy's rate.
        "norms K=8 P=16777216: fused ≥ 85% of copy bandwidth": ("90% (472 vs 524 GB/s)", True),
        "norms K=8 P=16777216: fused ≥ 1.5× the baseline": ("2.00×", True),
        "gradnorm step K=8: fused against the per-task loop": ("2.50×", None),
    }  # the Gram at P = 1 M is under the bandwidth targets' width: no check
    assert target_checks(results, "cpu") == []
    on_gpu = markdown(results, {"device": "cuda", "device_name": "H100"}, "fused-mtl bench")
    assert "| uncertainty K=2: fused ≥ 5× the loop | 4.00× | **no** |" in on_gpu
    assert "| gradnorm step K=8: fused against the per-task loop | 2.50× | reported |" in on_gpu
    assert "targets" not in markdown(results, {"device": "cpu"}, "fused-mtl bench").lower()


@pytest.mark.parametrize("num_tasks", [1, 5])
def test_bench_baselines_compute_uncertainty_weighting(num_tasks):
    """The loop and the vectorised expression timed against the fused op compute the same total
    and gradients as Kendall et al.'s formula (float64), from K scalars or one (K,) tensor."""
    gen = torch.Generator().manual_seed(num_tasks)
    values, s = torch.rand(num_tasks, generator=gen), torch.randn(num_tasks, generator=gen)
    expected = log_variance(values.double(), s.double())
    for expression, losses_as in itertools.product(
        (per_task_loop, vectorized_eager), ("scalars", "vector")
    ):
        if losses_as == "vector":
            losses = values.clone().requires_grad_()
        else:
            losses = [v.clone().requires_grad_() for v in values]
        log_vars = s.clone().requires_grad_()
        total = expression(losses, log_vars)
        total.backward()
        torch.testing.assert_close(total.double(), expected.total, rtol=1e-6, atol=0)
        grads = losses.grad if losses_as == "vector" else torch.stack([v.grad for v in losses])
        grads = grads.double()
        torch.testing.assert_close(grads, expected.grad_losses, rtol=1e-6, atol=0)
        torch.testing.assert_close(
            log_vars.grad.double(), expected.grad_params, rtol=1e-5, atol=1e-6
        )


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--method", "sgd"], "argument --method/--methods: unknown method 'sgd'"),
        (["demo", "--methods", "mgda,MGDA"], "method 'MGDA' is named twice"),
        (["demo", "--methods", "mgda,"], "unknown method ''"),
        (["demo", "--threads", "0"], "argument --threads: expected a positive integer, got 0"),
        (["demo", "--steps", "0"], "argument --steps: expected a positive integer, got 0"),
        (["demo", "--steps", "-3"], "expected a positive integer, got -3"),
        (["demo", "--steps", "ten"], "expected a positive integer, got 'ten'"),
        (["demo", "--steps", str(10**12)], "argument --steps: at most 100000 steps, got"),
        (["demo", "--device", "tpu"], "unknown device 'tpu'"),
        (["demo", "--device", "meta"], "unsupported device 'meta'"),
        (["bench", "--device", "gpu0"], "unknown device 'gpu0'"),
        (["demo", "--seed", "x"], "argument --seed: expected an integer, got 'x'"),
        (["demo", "--seed", str(2**70)], "expected an integer in [0, 2**63)"),
        (["train"], "invalid choice: 'train'"),
        ([], "the following arguments are required"),
    ],
)
def test_bad_input_is_one_line_and_status_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert captured.err.count("\n") == 1 and message in captured.err, captured.err
    assert captured.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["demo", "bench"])
def test_cuda_asked_for_but_absent(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--device", "cuda"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'cuda' was asked for, but torch" in err and "no CUDA" in err


def test_unwritable_outputs(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [
        (["demo", "--steps", "1", "--out", str(blocker)], "is a file, not a directory"),
        (["demo", "--steps", "1", "--out", str(blocker / "sub")], "is not a writable directory"),
        (["bench", "--quick", "--json", str(tmp_path)], "is a directory, not a file"),
        (["bench", "--quick", "--markdown", str(blocker / "x.md")], "--markdown"),
    ]
    for argv, message in cases:
        status, out, err = run_cli(capsys, *argv)
        assert status == 2
        assert err.count("\n") == 1 and message in err, err
        assert "Traceback" not in err and out == ""


def test_an_output_that_cannot_be_written_fails_before_the_run(capsys, monkeypatch, tmp_path):
    """--json /dev/full used to run the whole benchmark, then die with a traceback."""
    from fused_mtl.app import benchmark_cases

    def no_run(*args, **kwargs):
        raise AssertionError("the benchmark ran before its outputs were checked")

    monkeypatch.setattr(benchmark_cases, "suite", no_run)
    if Path("/dev/full").exists():
        status, out, err = run_cli(capsys, "bench", "--quick", "--json", "/dev/full")
        assert status == 2 and out == ""
        expected = "fused-mtl bench: error: --json '/dev/full' cannot be written: "
        assert err == expected + "No space left on device\n"
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o500)
    if not os.access(read_only, os.W_OK):  # root writes anywhere
        status, _, err = run_cli(capsys, "bench", "--markdown", str(read_only / "x.md"))
        assert status == 2 and err.count("\n") == 1 and "--markdown" in err, err
    # A file that can be written is probed and left as it was; a new one is not left behind.
    kept = tmp_path / "kept.json"
    kept.write_text("earlier results\n")
    with pytest.raises(AssertionError, match="the benchmark ran"):
        cli.main(["bench", "--json", str(kept), "--markdown", str(tmp_path / "new.md")])
    assert kept.read_text() == "earlier results\n"
    assert not (tmp_path / "new.md").exists()
    # A symlink to a missing file is kept, and the probe does not leave the target behind; a pipe
    # is only opened (a byte written to it could not be taken back).
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "missing.json")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(AssertionError, match="the benchmark ran"):
            cli.main(["bench", "--json", str(link), "--markdown", str(fifo)])
        assert os.read(reader, 16) == b""
    finally:
        os.close(reader)
    assert link.is_symlink() and not (tmp_path / "missing.json").exists()


@pytest.mark.parametrize(
    ("package", "modules"),
    [("rich", ["rich", "rich.console"]), ("matplotlib", ["matplotlib", "matplotlib.figure"])],
)
def test_missing_extra_names_it(capsys, monkeypatch, tmp_path, package, modules):
    # fused_mtl.app.plots is imported afresh, so that it meets the missing package.
    monkeypatch.delitem(sys.modules, "fused_mtl.app.plots", raising=False)
    monkeypatch.delattr(fused_mtl.app, "plots", raising=False)
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    status, _, err = run_cli(capsys, "demo", "--steps", "1", "--out", str(tmp_path))
    assert status == 2
    assert err.count("\n") == 1
    assert f'pip install "fused-mtl[demo]" ({package} is missing)' in err


# --- entry points ----------------------------------------------------------------------------


def test_python_dash_m_and_the_console_script():
    version = subprocess.run(
        [sys.executable, "-m", "fused_mtl", "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.strip() == f"fused-mtl {__version__}"
    script = Path(sys.executable).parent / "fused-mtl"
    helped = subprocess.run([str(script), "demo", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0
    for option in ("--method", "--steps", "--device", "--seed", "--out"):
        assert option in helped.stdout
    failed = subprocess.run(
        [str(script), "demo", "--steps", "0"], capture_output=True, text=True, timeout=120
    )
    assert failed.returncode == 2
    assert failed.stderr == (
        "fused-mtl demo: error: argument --steps: expected a positive integer, got 0\n"
    )


def test_bench_times_the_cases_of_a_group_in_interleaved_rounds():
    """Each round times every case of the group once: a drift of the machine moves them alike.
    The order of the calls shows the rounds: a, b, a, b, ... never all of a first."""
    from fused_mtl.app import benchmark_report
    from fused_mtl.app.benchmark_cases import Case

    calls = []
    cases = [Case("g", name, lambda n=name: calls.append(n), "a") for name in ("a", "b")]
    results = benchmark_report.measure_group(cases, min_run_time=0.001)
    switches = sum(1 for first, second in itertools.pairwise(calls) if first != second)
    assert switches >= 2 * benchmark_report.ROUNDS - 1
    assert [r.implementation for r in results] == ["a", "b"]
    assert all(r.median_s > 0 and r.runs > 0 for r in results)
