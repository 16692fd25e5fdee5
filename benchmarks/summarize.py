"""Turn a pytest-benchmark JSON file into the markdown table quoted in the README.

Usage: ``python benchmarks/summarize.py benchmarks/results/cpu.json > benchmarks/results/cpu.md``

``--compact`` first rewrites the JSON file without the per-round timings (``stats.data``), which
pytest-benchmark keeps for every round (megabytes for the full suite); the statistics stay.
"""

import json
import sys
from collections import defaultdict


def compact(path: str) -> None:
    with open(path) as file:
        data = json.load(file)
    for bench in data["benchmarks"]:
        bench["stats"].pop("data", None)
    with open(path, "w") as file:
        json.dump(data, file, indent=1)
        file.write("\n")


def main(path: str) -> None:
    with open(path) as file:
        data = json.load(file)
    medians: dict[int, dict[str, float]] = defaultdict(dict)
    dispatch: dict[str, float] = {}
    gradnorm: dict[str, float] = {}
    gram: dict[tuple[str, int, int], dict[str, tuple[float, float]]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        params, median = bench["params"], bench["stats"]["median"]
        if "wrapper" in params:
            dispatch[bench["name"].split("[")[1].rstrip("]")] = median
        elif bench["name"].startswith("test_gradnorm_step"):
            gradnorm[params["implementation"]] = median
        elif "op" in params:
            key = (params["op"], params["num_tasks"], params["width"])
            gram[key][bench["extra_info"]["implementation"]] = (
                median,
                bench["extra_info"]["gb_per_s"],
            )
        else:
            medians[params["num_tasks"]][params["implementation"]] = median
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
    if gradnorm:
        loop = gradnorm["per_task_loop"]
        print()
        print(
            "GradNorm step at K = 8 on the toy's network (trunk 250-100-100-100-100, 8 heads "
            "of 100 outputs, batch 256): forward, per-task gradients of the last shared layer, "
            "their norms, the weights' gradient and the backward of the weighted total."
        )
        print()
        print("| implementation | median | per-task loop / this |")
        print("|---|---|---|")
        for name, median in gradnorm.items():
            print(f"| {name} | {median * 1e3:.2f} ms | {loop / median:.2f}× |")
    if gram:
        print()
        print(
            "Per-task gradient norms and Gram of a (K, P) fp32 matrix: fused_mtl (auto) vs "
            "`torch.linalg.vector_norm` per task and `G @ G.T`; GB/s = bytes of G / time."
        )
        print()
        print("| op | K | P | fused_mtl (auto) | baseline | baseline / fused |")
        print("|---|---|---|---|---|---|")
        for (op, num_tasks, width), row in sorted(gram.items()):
            fused = row["fused_auto"]
            (baseline,) = [value for name, value in row.items() if name != "fused_auto"]
            print(
                f"| {op} | {num_tasks} | {width} | {fused[0] * 1e6:.0f} µs ({fused[1]:.1f} GB/s) "
                f"| {baseline[0] * 1e6:.0f} µs ({baseline[1]:.1f} GB/s) "
                f"| {baseline[0] / fused[0]:.2f}× |"
            )


if __name__ == "__main__":
    if "--compact" in sys.argv[2:]:
        compact(sys.argv[1])
    main(sys.argv[1])
