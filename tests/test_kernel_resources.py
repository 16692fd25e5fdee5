"""The resource report of the kernels compiled for GPUs (``benchmarks/kernel_resources.py``): its
occupancy arithmetic, its reading of SASS, and a real compile for sm_90 of the Gram launches that
once failed to compile (fp16 / bf16 gradients). CI runs the whole report with ``--check``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checks import LaunchCounter, load_script
from formulas import gram

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "kernel_resources.py"

pytest.importorskip("triton")


def compile_report(tmp_path, *args):
    """Run the script in a process of its own (the kernels must not be the interpreter's)."""
    out = [] if tmp_path is None else ["--out", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90", "--jobs", "2", *out, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


@pytest.mark.parametrize(
    ("registers", "warps", "shared", "expected"),
    [
        # 32 registers: 1,024 per warp, the 64 warps of an SM fit: 8 blocks of 8 warps.
        (32, 8, 0, 1.0),
        # 80 registers are given as 2,560 per warp (units of 256): 6 warps per scheduler's
        # 16,384, 24 per SM, 3 whole blocks of 8.
        (80, 8, 0, 24 / 64),
        # 128 registers: 4,096 per warp, 16 warps, 2 blocks.
        (128, 8, 0, 16 / 64),
        # Shared memory bounds it: 33 KiB + the 1 KiB the driver keeps per block, 228 KiB per SM
        # give 6 blocks of 2 warps.
        (94, 2, 33 * 1024, 12 / 64),
        # 32 blocks at most, whatever else allows: 1-warp blocks of 16 registers.
        (16, 1, 0, 32 / 64),
        # Each of the 4 schedulers holds whole warps of its 16,384 registers: 6,400 per warp
        # give 2 each, 8 in all (the SM's 65,536 would give 10).
        (200, 2, 0, 8 / 64),
        # 33 registers take 1,280 per warp, not 1,056: 12 warps per scheduler, not 15.
        (33, 4, 0, 48 / 64),
    ],
)
def test_occupancy_counts_as_the_cuda_calculator(registers, warps, shared, expected):
    script = load_script(SCRIPT)
    assert script.occupancy(script.ARCHS[90], registers, warps, shared) == expected


@pytest.mark.parametrize(
    ("opcode", "width"),
    [
        ("LDG.E", 4),
        ("LDG.E.128", 16),
        ("LDG.E.64.CONSTANT", 8),
        ("LDG.E.U16", 2),
        ("LDGSTS.E.BYPASS.128", 16),
        ("LDGSTS.E.LTC128B.128", 16),
        ("LDGSTS.E.LTC128B", 4),
    ],
)
def test_global_load_widths_are_read_from_the_opcode(opcode, width):
    assert load_script(SCRIPT)._load_bytes(opcode) == width


def test_bf16_and_fp16_gram_launches_compile_for_sm90(tmp_path):
    """Every launch the Gram and norms make at K = 8 (three dtypes, three layouts) compiles for
    sm_90 without spills. The Gram of 16-bit gradients did not compile before it read float32
    copies (an assertion of Triton's float64 MMA lowering)."""
    result = compile_report(tmp_path, "--tasks", "8", "--only", "_task_gram_partials")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "kernel-resources.json").read_text())
    variants = report["variants"]
    assert variants and all("error" not in row for row in variants)
    assert all(row["spill_instructions"] == 0 for row in variants)
    # The aligned layouts load 16 bytes per thread at a time.
    flat = [row for row in variants if "flat" in row["example_case"]]
    assert flat and all(row["widest_load_bytes"] == 16 for row in flat)
    markdown = (tmp_path / "kernel-resources.md").read_text()
    assert "_task_gram_partials_kernel" in markdown and "compile error" not in markdown


def test_check_names_a_variant_whose_registers_changed(tmp_path):
    """``--check`` compiles again and names every variant that differs from the recorded file."""
    assert compile_report(tmp_path, "--tasks", "2", "--only", "_reduce").returncode == 0
    recorded = tmp_path / "kernel-resources.json"
    report = json.loads(recorded.read_text())
    report["variants"][0]["registers"] += 1
    recorded.write_text(json.dumps(report))
    result = compile_report(tmp_path, "--tasks", "2", "--only", "_reduce", "--check")
    assert result.returncode == 1
    assert "changed registers: _reduce_partials_kernel / sm_90" in result.stderr


@pytest.mark.parametrize(
    "dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]
)
def test_half_gradients_gram_is_summed_over_float32_groups(dtypes, device, monkeypatch):
    """The Gram of fp16 / bf16 gradients (alone or beside fp32 ones) reads their columns copied
    into a float32 buffer, here of 16 columns at K = 3: the 29 columns take two launches, and
    every column is counted once, as in the float64 Gram of the joined gradients."""
    from fused_mtl.kernels import gram as kernels

    from fused_mtl.functional import task_gram

    monkeypatch.setattr(kernels, "_UPCAST_GROUP_ELEMENTS", 48)
    partials = LaunchCounter(kernels._task_gram_partials_kernel)
    monkeypatch.setattr(kernels, "_task_gram_partials_kernel", partials)
    gen = torch.Generator().manual_seed(3)
    grads = [
        torch.randn(3, 4, 5, generator=gen).to(dtypes[0]).to(device),
        torch.randn(3, 9, generator=gen).to(dtypes[1]).to(device),
    ]
    got = task_gram(grads, backend="triton")
    expected, _ = gram(grads)  # float64, from the joined gradients
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert partials.launches == 2


def test_a_partial_run_leaves_the_recorded_table_alone():
    recorded = ROOT / "benchmarks" / "results" / "kernel-resources.json"
    before = recorded.read_bytes()
    result = compile_report(None, "--tasks", "2", "--only", "_reduce")
    assert result.returncode != 0 and "give --out" in result.stderr
    assert recorded.read_bytes() == before


def test_half_gradients_without_columns_have_a_zero_gram(device):
    from fused_mtl.functional import task_gram

    got = task_gram([torch.zeros(3, 0, dtype=torch.float16, device=device)], backend="triton")
    assert torch.equal(got, torch.zeros(3, 3, dtype=torch.float64, device=device))


@pytest.mark.parametrize("arch", ["75", "sm_90", "90,120"])
def test_an_unknown_arch_is_named(arch):
    with pytest.raises(SystemExit, match=r"--arch .*the report knows sm_80, sm_90, sm_100"):
        load_script(SCRIPT).main(["--arch", arch])
