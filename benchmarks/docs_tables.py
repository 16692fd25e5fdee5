"""Regenerate every table and figure of the docs that comes from a measurement, from the
recorded runs in ``benchmarks/results/``.

    python benchmarks/docs_tables.py            # rewrite the generated blocks in place
    python benchmarks/docs_tables.py --check    # exit 1, naming each stale block, if any differs

A generated block sits between ``<!-- generated: NAME -->`` and ``<!-- end generated -->`` in
``README.md`` or a page of ``docs/``; what is between the markers belongs to this script. Each
block names the file it comes from, and that file names its command, commit, device, versions
and date. To refresh a block: rerun the command recorded in its file, then this script.

The recorded runs:

- ``cpu-demo.json``: ``fused-mtl demo --method all`` (every method, both problems);
- ``cpu-demo-default.json``: ``fused-mtl demo`` with no arguments, for its wall time;
- ``cpu-method-steps.json``: ``python benchmarks/method_steps.py`` (a training step of every
  method against the plain sum);
- ``cpu-bench.json``: ``fused-mtl bench`` (every benchmark case);
- ``kernel-resources.json``: ``python benchmarks/kernel_resources.py`` (every kernel variant
  compiled for sm_80, sm_90 and sm_100, and the predicted H100 time of the benchmark cases);
- ``cpu-trunk-steps.json``: ``python benchmarks/trunk_steps.py`` (whole-trunk MGDA and UPGrad
  steps on three trunks against the plain sum and TorchJD);
- ``cpu-compare.json``: ``fused-mtl compare --method all`` (every method against single-task
  models on the three real data sets, 3 seeds);
- ``cpu-compare-default.json``: ``fused-mtl compare`` with no arguments, for its wall time.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from fused_mtl.app import compare_report
from fused_mtl.app.benchmark_report import Result, markdown
from fused_mtl.app.compare import Comparison

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(
    r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL
)

# The families of the method-step summary, in the order of the docs' table.
STEP_FAMILIES = {
    "the loss-level ones (UW, DWA, DTP, FAMO, RLW, GLS, IMTL-L, STCH, PBI, COSMOS, UW-SO, "
    "GO4Align)": [
        "uw", "dwa", "dtp", "famo", "rlw", "gls", "imtl_l", "stch", "pbi", "cosmos", "uw_so",
        "go4align",
    ],
    "GradNorm (the last shared layer's per-task gradients)": ["gradnorm"],
    "MGDA and the Gram family but Nash-MTL / FairGrad": [
        "mgda", "pcgrad", "gradvac", "cagrad", "imtl_g", "aligned_mtl", "upgrad", "dualproj",
        "config", "krum", "cr_mogm", "ntkmtl",
    ],
    "Nash-MTL, FairGrad (Newton steps), GradDrop, the trimmed mean (per coordinate)": [
        "nash_mtl", "fairgrad", "graddrop", "trimmed_mean",
    ],
    "MoCo, SDMGrad, MoDo, ExcessMTL, DB-MTL, Auto-Lambda": [
        "moco", "sdmgrad", "modo", "excess_mtl", "db_mtl", "auto_lambda",
    ],
    "NTKMTL-SR (K backward passes through the heads only)": ["ntkmtl_sr"],
}  # fmt: skip


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _number(value: float) -> str:
    return format(value, ".3g")


def _time(seconds: float) -> tuple[str, str]:
    return (f"{seconds * 1e3:.1f}", " ms") if seconds < 1 else (f"{seconds:.2f}", " s")


def _ratio(ratio: float, digits: int = 2) -> tuple[str, str]:
    return f"{ratio:.{digits}f}", "×"


def _span(values: list[float], unit: Callable[[float], tuple[str, str]]) -> str:
    """``low-high unit`` (one unit when both ends share it), or one value."""
    (low, low_unit), (high, high_unit) = unit(min(values)), unit(max(values))
    if (low, low_unit) == (high, high_unit):
        return low + low_unit
    if low_unit == high_unit:
        return f"{low}-{high}{high_unit}"
    return f"{low}{low_unit}-{high}{high_unit}"


def _provenance(record: dict, source: str) -> str:
    where = record["environment"]
    threads = where["cpu_threads"]
    plural = "s" if threads > 1 else ""
    device = where["device_name"] if where["device"] != "cpu" else f"CPU, {threads} thread{plural}"
    return (
        f"`{record['command']}` at {where['git_revision']}, {where['date']}; {device}, torch "
        f"{where['torch']}, triton {where['triton'] or 'absent'}; recorded in "
        f"`benchmarks/results/{source}`"
    )


def demo_table(problem: str) -> str:
    record = load("cpu-demo.json")
    runs = record["problems"][problem]
    lines = [
        f"**{problem}** ({record['steps']} steps, seed {record['seed']}; "
        f"{_provenance(record, 'cpu-demo.json')}):",
        "",
        "| method | L(t)/L(0) per task | spread | final weights | ms / step |",
        "|---|---|---|---|---|",
    ]
    for method, run in runs["methods"].items():
        ratios = " / ".join(_number(v) for v in run["final_loss_ratios"])
        weights = " / ".join(_number(v) for v in run["final_weights"])
        lines.append(
            f"| {method} | {ratios} | {_number(run['rate_spread'])} | {weights} | "
            f"{run['ms_per_step']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def demo_wall_time() -> str:
    everything, default = load("cpu-demo.json"), load("cpu-demo-default.json")
    return (
        f"`fused-mtl demo` ({', '.join(default['methods'])}; {default['steps']} steps on each "
        f"problem) took {default['wall_seconds']:.0f} s in all: "
        f"{_provenance(default, 'cpu-demo-default.json')}. With `--method all`, "
        f"{everything['wall_seconds']:.0f} s ({_provenance(everything, 'cpu-demo.json')}).\n"
    )


def _method_step_times() -> tuple[dict[str, float], dict]:
    record = load("cpu-method-steps.json")
    times = {r["implementation"]: r["median_s"] for r in record["results"] if r["median_s"]}
    return times, record


def method_step_summary() -> str:
    times, record = _method_step_times()
    plain = times["equal"]
    lines = [
        f"Against the plain sum ({''.join(_time(plain))}; "
        f"{_provenance(record, 'cpu-method-steps.json')}):",
        "",
        "| methods | time | this / plain sum |",
        "|---|---|---|",
    ]
    for label, methods in STEP_FAMILIES.items():
        family = [times[method] for method in methods]
        ratios = [time / plain for time in family]
        lines.append(f"| {label} | {_span(family, _time)} | {_span(ratios, _ratio)} |")
    return "\n".join(lines) + "\n"


def readme_costs() -> str:
    times, record = _method_step_times()
    plain = times["equal"]

    def cost(methods: list[str]) -> str:
        return _span([times[m] / plain for m in methods], lambda r: _ratio(r, 1))

    families = list(STEP_FAMILIES.values())
    gram = families[2] + families[3]
    return (
        f"Cost per training step at K = 8 on a 2-core CPU, relative to the plain sum: "
        f"loss-level methods {cost(families[0])}, GradNorm {cost(families[1])}, MGDA and the Gram "
        f"family {cost(gram)}, the stochastic ones {cost(families[4])}, NTKMTL-SR "
        f"{cost(families[5])} "
        f"(`benchmarks/results/cpu-method-steps.json`, at {record['environment']['git_revision']};"
        f" [Benchmarks](docs/benchmarks.md)).\n"
    )


def bench_table() -> str:
    record = load("cpu-bench.json")
    results = [Result(**entry) for entry in record["results"]]
    return markdown(results, record["environment"], record["command"])


def _script(name: str):
    """``benchmarks/<name>.py`` as a module (it formats its own tables)."""
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def kernel_resources_summary() -> str:
    return _script("kernel_resources").summary_markdown(load("kernel-resources.json"))


def predicted_h100_times() -> str:
    return _script("kernel_resources").roofline_markdown(load("kernel-resources.json"))


def trunk_steps_table() -> str:
    """Each whole-trunk step's time over the plain sum's and autogram's, and its peak."""
    record = load("cpu-trunk-steps.json")
    results = [Result(**entry) for entry in record["results"]]
    summary = _script("trunk_steps").summary(results)
    return summary + "\n" + _provenance(record, "cpu-trunk-steps.json") + ".\n"


#: Every generated block: its name and what fills it.
def _compare_provenance(record: dict, source: str) -> str:
    where = record["environment"]
    packages = ", ".join(f"{name} {version}" for name, version in where["data_packages"].items())
    return (
        f"`{record['command']}` at {where['git_revision']}, {where['date']}; CPU, "
        f"{record['jobs']} processes of 1 thread, torch {where['torch']}, {packages}; "
        f"{record['wall_seconds']:.0f} s in all; recorded in `benchmarks/results/{source}`"
    )


def compare_table(problem: str) -> str:
    """A problem's table of the recorded comparison (and its per-task table, for many tasks)."""
    record = load("cpu-compare.json")
    entry = record["problems"][problem]
    comparison = Comparison.from_json(entry)
    lines = [
        f"**{problem}**: {entry['description']}; {comparison.epochs} epochs, seeds "
        f"{', '.join(map(str, record['seeds']))}.",
        "",
        *compare_report.markdown_table(*compare_report.summary_table(comparison)),
    ]
    if comparison.not_run:
        lines += ["", *compare_report.not_run_lines(comparison)]
    if len(comparison.task_names) > compare_report.TASK_COLUMNS:
        lines += ["", "Each task's test accuracy (%), mean over the seeds:", ""]
        lines += compare_report.markdown_table(*compare_report.per_task_table(comparison))
    return "\n".join(lines) + "\n"


def readme_compare() -> str:
    """Per problem of the recorded comparison: the best three methods, equal weighting, the
    single-task spread, and the worst method."""
    record = load("cpu-compare.json")
    parts = []
    for name, entry in record["problems"].items():
        rows = [row for row in Comparison.from_json(entry).rows() if not row.get("not_run")]
        floor, methods = rows[0]["delta_m_std"], sorted(rows[1:], key=lambda r: -r["delta_m"])

        def cell(row: dict) -> str:
            label = compare_report.method_label(row["method"]).split(" (")[0]
            return f"{label} {compare_report.signed(row['delta_m'], row['delta_m_std'])}"

        equal = next(row for row in rows if row["method"] == "equal")
        parts.append(
            f"{name}: best {', '.join(cell(row) for row in methods[:3])}; {cell(equal)}; "
            f"worst {cell(methods[-1])}; single-task spread ±{floor:.2f}"
        )
    return (
        f"On the recorded comparison (Δm% against single-task models, mean ± std over "
        f"{len(record['seeds'])} seeds; [docs/compare.md](docs/compare.md)): "
        + ". ".join(parts)
        + ".\n"
    )


def compare_wall_time() -> str:
    everything, default = load("cpu-compare.json"), load("cpu-compare-default.json")
    return (
        f"The default comparison ({len(default['methods'])} methods: "
        f"{', '.join(default['methods'])}): "
        f"{_compare_provenance(default, 'cpu-compare-default.json')}. The tables below, all "
        f"{len(everything['methods'])} methods: "
        f"{_compare_provenance(everything, 'cpu-compare.json')}.\n"
    )


BLOCKS: dict[str, Callable[[], str]] = {
    "demo-gradnorm_toy": lambda: demo_table("gradnorm_toy"),
    "demo-known_noise": lambda: demo_table("known_noise"),
    "demo-wall-time": demo_wall_time,
    "method-steps": method_step_summary,
    "readme-costs": readme_costs,
    "bench-cpu": bench_table,
    "kernel-resources": kernel_resources_summary,
    "predicted-h100": predicted_h100_times,
    "trunk-steps": trunk_steps_table,
    "compare-wall-time": compare_wall_time,
    "readme-compare": readme_compare,
    "compare-multi_digits": lambda: compare_table("multi_digits"),
    "compare-yeast": lambda: compare_table("yeast"),
    "compare-penguins": lambda: compare_table("penguins"),
}
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def regenerate(text: str, where: str) -> tuple[str, list[str]]:
    """``text`` with every generated block refilled, and the names of those that changed."""
    changed: list[str] = []

    def refill(match: re.Match) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise SystemExit(f"{where}: unknown generated block {name!r}")
        body = BLOCKS[name]()
        if body != match["body"]:
            changed.append(f"{where}: {name}")
        return match[1] + body + match[4]

    return BLOCK.sub(refill, text), changed


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale: list[str] = []
    seen: set[str] = set()
    for page in PAGES:
        text = page.read_text()
        seen.update(match["name"] for match in BLOCK.finditer(text))
        new, changed = regenerate(text, str(page.relative_to(ROOT)))
        stale += changed
        if changed and not check:
            page.write_text(new)
    missing = sorted(set(BLOCKS) - seen)
    if missing:
        print(f"no page holds the generated block(s): {', '.join(missing)}")
        return 1
    for name in stale:
        print(("stale: " if check else "rewrote: ") + name)
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
