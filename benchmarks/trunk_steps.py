"""The whole-trunk groups of ``fused-mtl bench`` alone: MGDA (K = 2, 8, 32) and UPGrad (K = 8)
over a 4 x 1024 MLP, a ResNet-style CNN and a transformer encoder, each implementation against
the plain sum and TorchJD's autogram, in interleaved rounds, with the same cases and runner as
the full benchmark.

    python benchmarks/trunk_steps.py benchmarks/results/cpu-trunk-steps [--networks cnn,mlp]

writes ``PREFIX.json`` and ``PREFIX.md``: the runner's table, then one row per trunk, method
and K (each implementation's time over the plain sum's and over autogram's, and its peak
extra memory). On a CPU it runs on one thread (``--threads``), as the targets are stated.
``PREFIX --merge A.json B.json`` writes them from runs made apart (one network each, at once).

    python benchmarks/trunk_steps.py --phases [--networks cnn]

prints where the time of the layers' Gram goes at K = 8 (median of 3 steps): the forward pass,
the engine's backward of activation gradients, each rule's share by layer type, and the
backward of the weighted sum; batched and one task at a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fused_mtl.app.benchmark_cases import (
    STEP_TASKS,
    TRUNK_STEP_IMPLEMENTATIONS,
    Unavailable,
    environment,
    trunk_cases,
    trunk_step_case,
)
from fused_mtl.app.benchmark_report import Result, markdown, measure_group

#: What the whole-trunk steps are held to at K = 8 (CPU, one thread, ratios in one run).
PLAIN_RATIO_TARGET = 4.5
AUTOGRAM_RATIO_TARGET = 0.5


def summary(results: list[Result]) -> str:
    """One row per group: time over the plain sum and over autogram, peak MiB."""
    groups: dict[str, dict[str, Result]] = {}
    for result in results:
        groups.setdefault(result.group, {})[result.implementation] = result
    shown = [i for i in TRUNK_STEP_IMPLEMENTATIONS if i != "plain_sum"]
    lines = [
        "| group | " + " | ".join(shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for group, ran in groups.items():
        plain, autogram = ran.get("plain_sum"), ran.get("torchjd_autogram")
        cells = []
        for implementation in shown:
            result = ran.get(implementation)
            if result is None or result.median_s is None or plain is None or not plain.median_s:
                cells.append("–")
                continue
            cell = f"{result.median_s / plain.median_s:.2f}× plain"
            if autogram is not None and autogram.median_s:
                cell += f", {result.median_s / autogram.median_s:.2f}× autogram"
            if result.peak_bytes is not None:
                cell += f", {result.peak_bytes / 2**20:.0f} MiB"
            cells.append(cell)
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def phases(network: str, num_tasks: int, batched: bool) -> dict[str, float]:
    """Seconds of one layers' Gram step on ``network``, by phase (the median of 3 steps)."""
    from fused_mtl.app.benchmark_cases import losses_of_features, trunk_network
    from fused_mtl.ops.layer_gram import LayerGram

    model, inputs, targets = trunk_network(network, num_tasks, "cpu")
    engine = LayerGram(model.trunk, batched=batched)  # type: ignore[arg-type]
    spent: dict[str, float] = {}
    receive = engine._receive

    def timed(call, output_grads):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        receive(call, output_grads)
        key = f"rule: {type(call.module).__name__}"
        spent[key] = spent.get(key, 0.0) + time.perf_counter() - started

    engine._receive = timed  # type: ignore[method-assign]
    steps = []
    for _ in range(4):
        spent.clear()
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        features = model.trunk(inputs)  # type: ignore[operator]
        losses = torch.stack(losses_of_features(model, features, targets))
        forward = time.perf_counter()
        engine(losses)
        gram = time.perf_counter()
        losses.sum().backward()
        done = time.perf_counter()
        rules = sum(spent.values())
        steps.append(
            {
                "forward": forward - started,
                "backward of activation gradients (and held rows)": gram - forward - rules,
                **spent,
                "backward of the weighted sum": done - gram,
            }
        )
    return {key: statistics.median(step[key] for step in steps[1:]) for key in steps[-1]}


def write_merged(prefix: Path, runs: list[dict]) -> None:
    """One record of several runs of this script (each network in its own process, at once):
    the first run's environment, every run's command and results."""
    where = dict(runs[0]["environment"])
    command = " & ".join(run["command"] for run in runs)
    results = [Result(**entry) for run in runs for entry in run["results"]]
    document = {"environment": where, "command": command}
    document["results"] = [result.to_json() for result in results]
    prefix.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")
    table = markdown(results, where, command) + "\n## Ratios\n\n" + summary(results)
    prefix.with_suffix(".md").write_text(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "prefix", type=Path, nargs="?", help="where to write PREFIX.json and PREFIX.md"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--networks", default="mlp,cnn,transformer", help="comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per group")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per case")
    parser.add_argument("--phases", action="store_true", help="where the time goes, K = 8")
    parser.add_argument(
        "--merge", nargs="+", type=Path, help="write PREFIX from these runs' JSON (run apart)"
    )
    args = parser.parse_args()
    if args.merge:
        write_merged(args.prefix, [json.loads(path.read_text()) for path in args.merge])
        return
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    networks = args.networks.split(",")
    if args.phases:
        for network in networks:
            for batched in (True, False):
                spent = phases(network, STEP_TASKS, batched)
                way = "batched" if batched else "one task at a time"
                total = sum(spent.values())
                parts = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in spent.items())
                print(f"{network}, {way}: {total * 1e3:.0f} ms = {parts}")
        return
    results: list[Result] = []
    for network, method, num_tasks in trunk_cases():
        if network not in networks:
            continue
        cases = []
        for implementation in TRUNK_STEP_IMPLEMENTATIONS:
            try:
                cases.append(
                    trunk_step_case(network, implementation, num_tasks, args.device, method)
                )
            except Unavailable as missing:
                print(f"{missing.group} / {missing.implementation}: {missing.reason}")
        results += measure_group(cases, args.min_run_time, args.rounds)
        print(summary(results), flush=True)
    where = environment(args.device)
    where["date"] = datetime.date.today().isoformat()
    where["threads"] = torch.get_num_threads()
    command = "python " + " ".join(sys.argv)
    document = {"environment": where, "command": command}
    document["results"] = [result.to_json() for result in results]
    args.prefix.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")
    table = markdown(results, where, command) + "\n## Ratios\n\n" + summary(results)
    args.prefix.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
