"""Turn a pytest-benchmark JSON file into the markdown table quoted in the README.

Usage: ``python benchmarks/summarize.py benchmarks/results/cpu.json > benchmarks/results/cpu.md``
"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as file:
        data = json.load(file)
    medians: dict[int, dict[str, float]] = defaultdict(dict)
    dispatch: dict[str, float] = {}
    for bench in data["benchmarks"]:
        params = bench["params"]
        if "wrapper" in params:
            dispatch[bench["name"].split("[")[1].rstrip("]")] = bench["stats"]["median"]
            continue
        medians[params["num_tasks"]][params["implementation"]] = bench["stats"]["median"]
    info = data["benchmarks"][0]["extra_info"]
    print(
        f"Uncertainty weighting, forward + backward over K scalar losses, median per call. "
        f"Device: {info['device_name']} ({info['cpu_threads']} threads), torch {info['torch']}, "
        f"triton {info['triton']}, git {info['git_revision']}, {data['datetime'][:10]}. "
        f"Command: `pytest benchmarks/ --benchmark-json {path}`."
    )
    print()
    print("| K | per-task loop | fused_mtl (auto) | torch fallback | loop / auto |")
    print("|---|---|---|---|---|")
    for num_tasks in sorted(medians):
        row = medians[num_tasks]
        loop, auto, fallback = row["per_task_loop"], row["fused_auto"], row["torch_fallback"]
        print(
            f"| {num_tasks} | {loop * 1e6:.0f} µs | {auto * 1e6:.0f} µs | {fallback * 1e6:.0f} µs "
            f"| {loop / auto:.1f}× |"
        )
    if dispatch:
        print()
        print("Wrapper dispatch cost, forward + backward of the same torch body at K = 2:")
        print()
        print("| wrapper | median |")
        print("|---|---|")
        for wrapper, median in sorted(dispatch.items()):
            print(f"| {wrapper} | {median * 1e6:.0f} µs |")


if __name__ == "__main__":
    main(sys.argv[1])
