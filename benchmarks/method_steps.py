"""The ``method step K=8`` group of ``fused-mtl bench`` alone: one training step of every method
on the toy's network against the plain sum, in interleaved rounds, with the same cases and
runner as the full benchmark.

    python benchmarks/method_steps.py benchmarks/results/cpu-method-steps [--device cpu]

writes ``PREFIX.json`` and ``PREFIX.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from fused_mtl.app.benchmark_cases import STEP_METHODS, STEP_TASKS, environment, method_step_case
from fused_mtl.app.benchmark_report import markdown, measure_group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefix", type=Path, help="where to write PREFIX.json and PREFIX.md")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per case")
    args = parser.parse_args()
    cases = [method_step_case(method, STEP_TASKS, args.device) for method in STEP_METHODS]
    results = measure_group(cases, args.min_run_time)
    where = environment(args.device)
    where["date"] = datetime.date.today().isoformat()
    command = "python " + " ".join(sys.argv)
    document = {"environment": where, "command": command}
    document["results"] = [result.to_json() for result in results]
    args.prefix.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")
    args.prefix.with_suffix(".md").write_text(markdown(results, where, command))
    print(markdown(results, where, command))


if __name__ == "__main__":
    main()
