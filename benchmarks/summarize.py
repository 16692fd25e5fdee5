"""Turn a pytest-benchmark JSON file into the markdown table that ``fused-mtl bench`` prints
(the same columns and ratios, from ``fused_mtl.app.benchmark_report``).

Usage: ``python benchmarks/summarize.py benchmarks/results/cpu.json > benchmarks/results/cpu.md``

``--compact`` first rewrites the JSON file without the per-round timings (``stats.data``), which
pytest-benchmark keeps for every round (megabytes for the full suite); the statistics stay.
"""

import json
import sys

from fused_mtl.app.benchmark_report import Result, markdown


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
    results = [
        Result(
            group=bench["group"],
            implementation=bench["extra_info"]["implementation"],
            baseline=bench["extra_info"]["baseline"],
            median_s=bench["stats"]["median"],
            iqr_s=bench["stats"]["iqr"],
            runs=bench["stats"]["rounds"],
            bytes_moved=bench["extra_info"].get("bytes_moved"),
            compile_seconds=bench["extra_info"].get("compile_seconds"),
        )
        for bench in data["benchmarks"]
    ]
    environment = dict(data["benchmarks"][0]["extra_info"], date=data["datetime"][:10])
    print(markdown(results, environment, f"pytest benchmarks/ --benchmark-json {path}"), end="")


if __name__ == "__main__":
    if "--compact" in sys.argv[2:]:
        compact(sys.argv[1])
    main(sys.argv[1])
