"""The Triton kernel variants the launchers produce for the cases below, compiled for real GPUs on
a machine without one, with the resources each takes, and a static roofline of the benchmark
cases.

    python benchmarks/kernel_resources.py          # write benchmarks/results/kernel-resources.*
    python benchmarks/kernel_resources.py --check  # compile, then compare with those files
    python benchmarks/kernel_resources.py --out DIR --arch 90 --quick

No GPU is needed: ``triton.compile`` turns each variant into PTX and a cubin for ``sm_80``,
``sm_90`` and ``sm_100`` (those the installed triton supports), and the ``cuobjdump`` that ships
with triton reads its registers, stack and shared memory, and disassembles it (SASS).

Which variants: the launchers themselves run, on CPU tensors, for every case below, with each
kernel swapped for a recorder of its launch (grid, arguments, options). Each recorded launch then
goes through Triton's own launch path (the binder of ``triton.runtime.jit`` and
``JITFunction._pack_args``, for the target's backend), which gives the specialisation a real
launch applies: the constexprs, each integer's and pointer's divisibility by 16, the dtypes. Two
launches with the same specialisation are one variant, as in Triton's kernel cache. Cases:

- Gram and norms: K = 1..256, gradients stored as fp32, fp16 or bf16, in four layouts: one
  ``(K, 4096)`` matrix (the flat Jacobian), the weight and bias of ``nn.Linear(256, 64)`` (every
  row stride a multiple of 16 elements), of ``nn.Linear(100, 10)`` (strides 1000 and 10, which
  Triton does not know to be multiples of 16 elements), and the 8 parameters of the GradNorm
  toy's trunk in fp32 at one K per tiling (NUM_TENSORS is a constexpr: a network with another
  number of parameters compiles another variant, alike but for that unrolled loop). The
  chunking uses the arch's SM count (A100 108, H100 SXM 132, B200 148), as on that GPU.
- Uncertainty weighting, forward and backward: K = 1..256 and powers of two up to 4096 (the
  largest block); the three parametrisations, the log-variance one with and without
  coefficients (the others never get any); losses in fp32, fp16 or bf16 with float32
  parameters (a module's), or both in fp16 or both in bf16 (the functional API).
- The empty kernel of the launch floor.

Per variant and arch: registers per thread, spills (local-memory loads and stores in the SASS),
shared memory, theoretical occupancy (from the arch's register file, shared memory, warp and block
limits), the widest and narrowest global load, the instruction counts by kind, and for ``tl.dot``
the factor by which warps compute the same MMA tiles (from the TTGIR layout). The script exits 1
on a compile error or a spill, naming the variant.

The roofline: for each benchmark case of the fused ops (the sizes of
``fused_mtl.app.benchmark_cases``), the bytes each launch moves and the FLOPs it executes (the
Gram's padded tile included), and the time an H100 SXM (3.35 TB/s, 67 TFLOP/s of fp32 FMA and
of fp64 on the tensor cores) needs at 85% of its bandwidth or at its peak arithmetic rate,
whichever is longer. Predicted, not measured: launch cost and latency are not in it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import functools
import importlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

try:  # The tables of the recorded run (docs_tables.py) need no triton; compiling does.
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature
except ImportError:
    triton = None

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
KERNEL_MODULES = (
    "fused_mtl.kernels.gram",
    "fused_mtl.kernels.uncertainty",
    "fused_mtl.kernels.launch_floor",
)
STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The uncertainty kernels' (losses, parameters) storage dtypes: a module's parameters stay
# float32 whatever the model's dtype (bf16-true gives bf16 losses and float32 parameters); the
# functional API takes both from the caller.
UNCERTAINTY_DTYPES = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
]
# (parametrisation, with coefficients): only the log-variance form has coefficients (task
# types, and the functional API's a and b); the library never gives the other two any.
UNCERTAINTY_FORMS = [(0, False), (0, True), (1, False), (2, False)]
# One K per tiling of the Gram and of the norms (folds 16, 8, 4, 2; 16, 32 and 64 rows; tiles
# over the grid), for the layout of many tensors.
MANY_TENSORS_TASK_COUNTS = (1, 2, 4, 8, 16, 32, 64, 100)
# --quick: every tiling of the Gram and norms, and both sides of K % 16 == 0.
QUICK_TASK_COUNTS = [1, 2, 3, 8, 16, 32, 64, 100, 256]


@dataclass(frozen=True)
class Arch:
    """What bounds occupancy on one GPU generation (CUDA programming guide, "Compute
    Capabilities"), and its SM count in the named part."""

    name: str
    capability: int
    sm_count: int
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    shared_per_sm: int = 228 * 1024
    reserved_shared_per_block: int = 1024  # kept by the driver for each resident block
    register_unit: int = 256  # registers are given to a warp in multiples of this
    sub_partitions: int = 4  # each SM's register file is split between 4 schedulers


ARCHS = {
    80: Arch("A100", 80, 108, shared_per_sm=164 * 1024),
    90: Arch("H100 SXM", 90, 132),
    100: Arch("B200", 100, 148),
}

# The H100 SXM of the roofline (the and NVIDIA's datasheet figures).
H100_BANDWIDTH = 3.35e12  # bytes/s, HBM3
H100_FLOPS = 67e12  # fp32 FMA, and fp64 on the tensor cores
BANDWIDTH_FRACTION = 0.85
# Under this, a launch (a few microseconds on any GPU: the launch-floor benchmark measures it)
# costs more than the work, so the case is called launch-bound.
LAUNCH_BOUND_S = 1e-6


# --- recording launches ------------------------------------------------------------------------


@dataclass
class Launch:
    """One kernel launch made by a launcher: what Triton's launch path needs to specialise it."""

    module: str
    kernel: str
    fn: JITFunction
    grid: tuple
    args: tuple
    kwargs: dict
    case: str


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(
        self, module: str, name: str, fn: JITFunction, sink: list[Launch], case: list[str]
    ) -> None:
        self.module, self.name, self.fn, self.sink, self.case = module, name, fn, sink, case

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(
                Launch(self.module, self.name, self.fn, grid, args, kwargs, self.case[0])
            )

        return launch


def _kernels(module) -> dict[str, JITFunction]:
    return {n: v for n, v in vars(module).items() if isinstance(v, JITFunction)}


@contextlib.contextmanager
def recording(sink: list[Launch], case: list[str]) -> Iterator[None]:
    """Every ``@triton.jit`` function of the kernel modules replaced by a recorder."""
    saved = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, kernel in _kernels(module).items():
            saved.append((module, name, kernel))
            setattr(module, name, _Recorder(module_name, name, kernel, sink, case))
    try:
        yield
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


def _layouts(num_tasks: int, dtype: torch.dtype) -> dict[str, list[tuple[int, ...]]]:
    """Per-task gradient shapes ``(K, *param.shape)`` of the Gram cases, by layout."""
    layouts = {
        "flat (K, 4096)": [(num_tasks, 4096)],
        "Linear(256, 64)": [(num_tasks, 64, 256), (num_tasks, 64)],
        "Linear(100, 10)": [(num_tasks, 10, 100), (num_tasks, 10)],
    }
    if num_tasks in MANY_TENSORS_TASK_COUNTS and dtype == torch.float32:
        # Every parameter of a network is one tensor of the launch (NUM_TENSORS is a constexpr,
        # its loop unrolled): the GradNorm toy's trunk, 250-100-100-100-100, 8 tensors of
        # widths 25000, 100, 10000, 100, ... At one K per tiling and in fp32 only: a variant
        # of 8 tensors takes seconds to compile (8 minutes for all K and dtypes on sm_100).
        layouts["toy trunk (8 tensors)"] = [
            shape
            for fan_in in (250, 100, 100, 100)
            for shape in ((num_tasks, 100, fan_in), (num_tasks, 100))
        ]
    return layouts


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def record_launches(arch: Arch, task_counts: list[int]) -> Iterator[Launch]:
    """Run every launcher on every case with the kernels recorded (see the module docstring).

    Launches are yielded as they are made, so that their tensors are freed once specialised:
    kept, those of K = 1..256 would hold gigabytes of address space."""
    from fused_mtl.kernels import gram, launch_floor, uncertainty

    launches: list[Launch] = []
    case = [""]
    programs = gram._PROGRAMS_PER_SM * arch.sm_count
    capability = (arch.capability // 10, arch.capability % 10)
    with _patched(torch.cuda, "get_device_capability", lambda device=None: capability):
        mma = gram._has_fp64_mma.__wrapped__(torch.device("cuda"))
    # As on the GPU: the chunking targets this many programs (the interpreter's count
    # otherwise), and the tiling follows whether the arch multiplies float64 on MMA.
    with (
        recording(launches, case),
        _patched(gram, "_target_programs", lambda _: programs),
        _patched(gram, "_has_fp64_mma", lambda _: mma),
    ):
        for num_tasks in task_counts:
            for dtype in STORAGE_DTYPES:
                for layout, shapes in _layouts(num_tasks, dtype).items():
                    grads = [torch.empty(shape, dtype=dtype) for shape in shapes]
                    matrices = [g.reshape(num_tasks, -1) for g in grads]
                    for diagonal in (True, False):
                        op = "norms" if diagonal else "gram"
                        case[0] = f"{op} K={num_tasks} {_dtype_name(dtype)} {layout}"
                        gram.task_gram_or_norms(matrices, diagonal)
                        yield from launches
                        launches.clear()
        largest = max(uncertainty._MAX_FORWARD_BLOCK, uncertainty._MAX_BACKWARD_BLOCK)
        extra = [2**i for i in range(9, largest.bit_length() + 1) if 2**i > max(task_counts)]
        for num_tasks in [*task_counts, *extra]:
            for loss_dtype, param_dtype in UNCERTAINTY_DTYPES:
                losses = torch.empty(num_tasks, dtype=loss_dtype)
                params = torch.empty(num_tasks, dtype=param_dtype)
                grad_total = torch.empty((), dtype=torch.promote_types(loss_dtype, param_dtype))
                for parametrization, with_coefs in UNCERTAINTY_FORMS:
                    coefs = (torch.empty(num_tasks),) * 2 if with_coefs else (None, None)
                    case[0] = (
                        f"uncertainty K={num_tasks} losses {_dtype_name(loss_dtype)} "
                        f"parameters {_dtype_name(param_dtype)} form {parametrization}, "
                        f"{'with' if with_coefs else 'without'} coefficients"
                    )
                    args = (losses, params, *coefs, parametrization, 1e-4, 1e4)
                    uncertainty.uncertainty_forward(*args)
                    uncertainty.uncertainty_backward(grad_total, *args)
                    yield from launches
                    launches.clear()
        case[0] = "launch floor"
        launch_floor.launch_empty_kernel(torch.empty(1))
        yield from launches


@contextlib.contextmanager
def _patched(owner, name, value) -> Iterator[None]:
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


# --- specialising as a launch does -------------------------------------------------------------


@dataclass
class Variant:
    """One compiled kernel: its specialisation and the cases that launch it."""

    kernel: str
    arch: int
    module: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    cases: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The constexprs, the storage dtypes and which arguments are multiples of 16."""
        names = importlib.import_module(self.module).__dict__[self.kernel].arg_names
        parts = [f"{names[path[0]]}={value}" for path, value in sorted(self.constexprs.items())]
        parts.append(_pointer_dtypes(self.signature))
        # Which integers and pointers Triton specialised as multiples of 16 (of elements for
        # integers, of bytes for pointers): what decides the loads' width.
        divisible = sorted(path for path, attr in self.attrs.items() if attr)
        parts.append("÷16: " + (" ".join(_path_name(names, p) for p in divisible) or "none"))
        parts.append(f"warps={self.options['num_warps']}")
        return ", ".join(parts)


def _pointer_dtypes(signature: dict) -> str:
    """The pointers' dtypes in argument order, repeats counted: ``fp32x8 fp64``."""
    runs: list[list] = []
    for dtype in (v[1:] for v in _leaves(signature) if v.startswith("*")):
        if runs and runs[-1][0] == dtype:
            runs[-1][1] += 1
        else:
            runs.append([dtype, 1])
    return " ".join(dtype + (f"x{count}" if count > 1 else "") for dtype, count in runs)


def _path_name(names: list[str], path: tuple[int, ...]) -> str:
    return names[path[0]] + "".join(f"[{i}]" for i in path[1:])


def _paths(signature: dict) -> list[tuple[tuple[int, ...], str]]:
    """Each leaf of the signature with its path (argument index, then tuple position)."""
    out = []
    for index, value in enumerate(signature.values()):
        if isinstance(value, tuple):
            out += [((index, j), v) for j, v in enumerate(value)]
        else:
            out.append(((index,), value))
    return out


def _leaves(signature: dict) -> list[str]:
    return [v for _, v in _paths(signature)]


def specialise(launches: Iterable[Launch], arch: Arch) -> list[Variant]:
    """The distinct specialisations of the launches for ``arch``, through Triton's launch path:
    ``JITFunction.run`` binds the arguments with this binder and packs them with
    ``_pack_args`` before compiling."""
    from triton import knobs

    target = GPUTarget("cuda", arch.capability, 32)
    backend = make_backend(target)
    variants: dict[tuple, Variant] = {}
    binders = {}
    for launch in launches:
        kernel = launch.fn
        kwargs = dict(launch.kwargs)
        # What JITFunction.run adds before binding.
        kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if launch.kernel not in binders:
            binders[launch.kernel] = create_function_from_signature(
                kernel.signature, kernel.params, backend
            )
        bound, specialization, options = binders[launch.kernel](*launch.args, **kwargs)
        key = (launch.kernel, str(specialization), str(options))
        if key not in variants:
            options, signature, constexprs, attrs = kernel._pack_args(
                backend, kwargs, bound, specialization, options
            )
            variants[key] = Variant(
                launch.kernel,
                arch.capability,
                launch.module,
                signature,
                {path: _plain(value) for path, value in constexprs.items()},
                {path: value for path, value in attrs.items()},
                options.__dict__,
            )
        variants[key].cases.append(launch.case)
    return list(variants.values())


def _plain(value):
    return value.value if hasattr(value, "value") else value


# --- compiling and reading the cubin -----------------------------------------------------------


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def supported_archs(wanted: list[int]) -> list[int]:
    """The archs the installed triton's ptxas can compile for."""
    from triton.backends.nvidia.compiler import get_ptxas

    out = []
    for capability in wanted:
        tool = get_ptxas(capability).path
        listed = subprocess.run([tool, "--help"], capture_output=True, text=True).stdout
        if f"sm_{capability}" in listed:
            out.append(capability)
    return out


_ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def _element_bytes(variant: Variant) -> int:
    """Bytes per element of the kernel's first pointer (the data it streams)."""
    return _ELEMENT_BYTES.get(_leaves(variant.signature)[0].lstrip("*"), 4)


_LOAD = re.compile(r"^(LDG|LDGSTS)\b")
_WIDTH = {".128": 16, ".64": 8, ".U16": 2, ".S16": 2, ".U8": 1, ".S8": 1}


def _load_bytes(opcode: str) -> int:
    """Bytes one thread loads with a global load instruction (4 unless the opcode says)."""
    for suffix, size in _WIDTH.items():
        if suffix + "." in opcode + ".":
            return size
    return 4


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)([^;]*);")


def _hot_loop(sass: str, element_bytes: int) -> tuple[int, float | None]:
    """The largest loop body (from a backward branch's target to the branch: the column loop):
    its instructions, and those per element its global loads bring to each thread (None
    without loads). Static: an unrolled body counts each of its steps."""
    instructions = [
        (int(address, 16), opcode, operands)
        for address, opcode, operands in _INSTRUCTION.findall(sass)
    ]
    body: list[str] = []
    for address, opcode, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            loop = [op for at, op, _ in instructions if start <= at <= address]
            body = max(body, loop, key=len)
    loaded = sum(_load_bytes(op) for op in body if _LOAD.match(op)) / element_bytes
    return len(body), (len(body) / loaded if loaded else None)


def _mma_replication(ttgir: str, num_warps: int) -> float | None:
    """How many warps compute each MMA tile of the dot's output: 1 when each warp has its own
    tiles. From the TTGIR: the MMA layout's warps per dimension against the output shape."""
    layout = re.search(r"warpsPerCTA = \[(\d+), (\d+)\], instrShape = \[(\d+), (\d+)", ttgir)
    shape = re.search(r"tt\.dot .*-> tensor<(\d+)x(\d+)x", ttgir)
    if layout is None or shape is None:
        return None
    warps_m, warps_n, instr_m, instr_n = map(int, layout.groups())
    rows, cols = map(int, shape.groups())
    distinct = min(warps_m, max(1, rows // instr_m)) * min(warps_n, max(1, cols // instr_n))
    return num_warps / distinct


def compile_variant(variant: Variant) -> dict:
    """Compile one variant and read its cubin; the measures of the table (or the error)."""
    kernel = importlib.import_module(variant.module).__dict__[variant.kernel]
    target = GPUTarget("cuda", variant.arch, 32)
    source = ASTSource(kernel, variant.signature, variant.constexprs, variant.attrs)
    with tempfile.TemporaryFile("w+") as log:
        try:
            # A failing pass prints the whole module from C++: keep it out of the output.
            with _redirected(log):
                compiled = triton.compile(source, target=target, options=variant.options)
        except Exception as error:  # the compile error is the finding
            log.seek(0)
            cause = [line for line in log if "Assertion" in line or "error:" in line]
            first = str(error).strip().splitlines()[0]
            return {"error": f"{type(error).__name__}: {first}; " + " ".join(cause[:1]).strip()}
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    resources = dict(re.findall(r"(\w+)(?:\[\d+\])?:(\d+)", usage.split("Function", 1)[1]))
    opcodes = Counter(
        match.group(1)
        for match in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", sass)
    )
    loads = {op: n for op, n in opcodes.items() if _LOAD.match(op)}
    load_widths = sorted({_load_bytes(op) for op in loads})
    loop, per_element = _hot_loop(sass, _element_bytes(variant))
    return {
        "loop_instructions": loop,
        "loop_instructions_per_element": per_element,
        "registers": int(resources["REG"]),
        "stack_bytes": int(resources["STACK"]),
        "local_bytes": int(resources["LOCAL"]),
        "spill_instructions": sum(n for op, n in opcodes.items() if op.startswith(("STL", "LDL"))),
        "shared_bytes": compiled.metadata.shared + int(resources["SHARED"]),
        "num_warps": compiled.metadata.num_warps,
        "instructions": sum(opcodes.values()) - opcodes.get("NOP", 0),
        "global_loads": loads,
        "widest_load_bytes": max(load_widths, default=0),
        "narrowest_load_bytes": min(load_widths, default=0),
        "tensor_core": sum(n for op, n in opcodes.items() if op.startswith(("DMMA", "HMMA"))),
        "to_fp64": sum(n for op, n in opcodes.items() if op.startswith("F2F.F64")),
        "mma_replication": _mma_replication(compiled.asm["ttgir"], compiled.metadata.num_warps),
        "num_stages": compiled.metadata.num_stages,
    }


@contextlib.contextmanager
def _redirected(log) -> Iterator[None]:
    """File descriptors 1 and 2 (what C++ code prints) written to ``log``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def occupancy(arch: Arch, registers: int, num_warps: int, shared_bytes: int) -> float:
    """Resident warps over the SM's maximum, as the CUDA occupancy calculator counts them."""
    per_warp = math.ceil(registers * 32 / arch.register_unit) * arch.register_unit
    warps_by_registers = (
        arch.registers_per_sm // arch.sub_partitions // per_warp
    ) * arch.sub_partitions
    blocks = min(
        arch.max_blocks_per_sm,
        arch.max_warps_per_sm // num_warps,
        warps_by_registers // num_warps,
        arch.shared_per_sm // (shared_bytes + arch.reserved_shared_per_block),
    )
    return blocks * num_warps / arch.max_warps_per_sm


# --- the static roofline -----------------------------------------------------------------------


def roofline() -> list[dict]:
    """Bytes and FLOPs per launch of each fused-op benchmark case (fp32 storage, as in the
    cases), and the H100 time they predict (see the module docstring)."""
    from fused_mtl.kernels import gram

    from fused_mtl.app import benchmark_cases as cases

    rows = []
    for num_tasks in cases.UNCERTAINTY_TASK_COUNTS:
        # Forward: read L and s, write the total. Backward: read the upstream gradient, L and s,
        # write both gradients. About 8 FLOPs per task each (exp, FMA, the bound's compares).
        group = cases.uncertainty_group(num_tasks, "scalars")
        rows.append(_row(f"{group}, forward", group, 8 * num_tasks + 4, 8 * num_tasks))
        rows.append(_row(f"{group}, backward", group, 16 * num_tasks + 4, 10 * num_tasks))
    for op in ("norms", "gram"):
        for num_tasks in cases.GRAM_TASK_COUNTS:
            for width in cases.GRAM_WIDTHS["cuda"]:
                diagonal = op == "norms"
                block_k, _, fold, *_ = gram.tiling(num_tasks, diagonal)
                elements = num_tasks * width
                if diagonal:
                    flops = 2 * elements
                else:
                    # Each element loaded enters a BLOCK_K x BLOCK_K tile product: 2 BLOCK_K
                    # FLOPs (FOLD rows per task make that 16 for every K <= 16).
                    tiles = triton.cdiv(num_tasks, block_k // fold)
                    flops = 2 * block_k * elements * tiles
                group = f"{op} K={num_tasks} P={width}"
                rows.append(_row(group, group, 4 * elements, flops))
    return rows


def _row(case: str, group: str, bytes_moved: int, flops: int) -> dict:
    """One launch's roofline; ``group``: the benchmark group whose step makes it."""
    memory_s = bytes_moved / (BANDWIDTH_FRACTION * H100_BANDWIDTH)
    compute_s = flops / H100_FLOPS
    if max(memory_s, compute_s) < LAUNCH_BOUND_S:
        bound = "launch"
    else:
        bound = "memory" if memory_s >= compute_s else "compute"
    return {
        "case": case,
        "group": group,
        "bytes": bytes_moved,
        "flops": flops,
        "flops_per_byte": flops / bytes_moved,
        "memory_s": memory_s,
        "compute_s": compute_s,
        "predicted_s": max(memory_s, compute_s),
        "bound": bound,
    }


# --- the report --------------------------------------------------------------------------------


def run(archs: list[int], task_counts: list[int], jobs: int, only: str = "") -> dict:
    variants = []
    for capability in archs:
        arch = ARCHS[capability]
        launched: set[str] = set()
        launches = (
            launched.add(launch.kernel) or launch for launch in record_launches(arch, task_counts)
        )
        variants += [v for v in specialise(launches, arch) if only in v.kernel]
        for module_name in KERNEL_MODULES:
            for name in _kernels(importlib.import_module(module_name)):
                if name not in launched and not _is_helper(module_name, name):
                    raise SystemExit(f"{module_name}.{name}: no case launches it; add one")
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        measures = list(pool.map(compile_variant, variants, chunksize=4))
    rows = []
    for variant, measure in zip(variants, measures, strict=True):
        row = {
            "kernel": variant.kernel,
            "arch": f"sm_{variant.arch}",
            "variant": variant.label,
            "cases": len(variant.cases),
            "example_case": variant.cases[0],
            **measure,
        }
        if "error" not in measure:
            row["occupancy"] = occupancy(
                ARCHS[variant.arch],
                measure["registers"],
                measure["num_warps"],
                measure["shared_bytes"],
            )
            row["bytes_in_flight_per_sm"] = _bytes_in_flight(variant, row)
        rows.append(row)
    keys = Counter((row["kernel"], row["arch"], row["variant"]) for row in rows)
    repeated = [key for key, count in keys.items() if count > 1]
    assert not repeated, f"{len(repeated)} labels name several variants, e.g. {repeated[0]}"
    return {
        "command": " ".join(["python benchmarks/kernel_resources.py", *sys.argv[1:]]),
        "revision": _git_revision(),
        "date": datetime.date.today().isoformat(),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "ptxas": _ptxas_versions(archs),
        "archs": {f"sm_{c}": asdict(ARCHS[c]) for c in archs},
        "variants": rows,
        "roofline": roofline(),
    }


def _bytes_in_flight(variant: Variant, row: dict) -> int | None:
    """Bytes of gradient loads an SM has in flight in the Gram / norms kernel's column loop:
    its resident programs (at most the launcher's programs per SM), times the blocks each loads
    per step (two when the row and column tiles differ), times the steps in flight (a cp.async
    pipeline of ``num_stages`` keeps ``num_stages - 1`` ahead; plain loads one). None for the
    other kernels."""
    names = importlib.import_module(variant.module).__dict__[variant.kernel].arg_names
    meta = {names[path[0]]: value for path, value in variant.constexprs.items()}
    if "BLOCK_P" not in meta:
        return None
    element = _element_bytes(variant)
    blocks = 1 if meta["DIAGONAL"] or meta["SINGLE_TILE"] else 2
    pipelined = any(op.startswith("LDGSTS") for op in row["global_loads"])
    steps = row["num_stages"] - 1 if pipelined else 1
    from fused_mtl.kernels import gram

    # Resident programs, but no more than the launcher starts per SM.
    resident = round(row["occupancy"] * 64) // row["num_warps"]
    programs = min(resident, gram._PROGRAMS_PER_SM)
    return programs * blocks * steps * meta["BLOCK_K"] * meta["BLOCK_P"] * element


@functools.cache
def _helpers() -> set[tuple[str, str]]:
    """Jit functions that kernels call (never launched from Python): those named in another
    kernel's source."""
    out = set()
    for module_name in KERNEL_MODULES:
        kernels = _kernels(importlib.import_module(module_name))
        for name in kernels:
            if any(
                re.search(rf"\b{name}\(", k.src) for other, k in kernels.items() if other != name
            ):
                out.add((module_name, name))
    return out


def _is_helper(module_name: str, name: str) -> bool:
    return (module_name, name) in _helpers()


def _git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _ptxas_versions(archs: list[int]) -> dict[str, str]:
    from triton.backends.nvidia.compiler import get_ptxas

    out = {}
    for capability in archs:
        text = subprocess.run(
            [get_ptxas(capability).path, "--version"], capture_output=True, text=True
        ).stdout
        out[f"sm_{capability}"] = re.search(r"release [\d.]+, V[\d.]+", text).group(0)
    return out


def failures(report: dict) -> list[str]:
    """A line per variant that failed to compile or spills."""
    out = []
    for row in report["variants"]:
        where = f"{row['kernel']} [{row['variant']}] on {row['arch']} (e.g. {row['example_case']})"
        if "error" in row:
            out.append(f"{where}: compile error: {row['error']}")
        elif row["spill_instructions"]:
            out.append(
                f"{where}: {row['spill_instructions']} spill instructions, "
                f"{row['stack_bytes']} bytes of stack at {row['registers']} registers"
            )
    return out


def summary(report: dict) -> list[dict]:
    """Per kernel and arch: the worst registers and occupancy, the load widths, the spills."""
    groups = defaultdict(list)
    for row in report["variants"]:
        if "error" not in row:
            groups[(row["kernel"], row["arch"])].append(row)
    out = []
    for (kernel, arch), rows in groups.items():
        worst = max(rows, key=lambda r: r["registers"])
        least = min(rows, key=lambda r: r["occupancy"])
        out.append(
            {
                "kernel": kernel,
                "arch": arch,
                "variants": len(rows),
                "max_registers": worst["registers"],
                "max_registers_variant": worst["variant"],
                "min_occupancy": least["occupancy"],
                "min_occupancy_variant": least["variant"],
                "widest_load_bytes": max(r["widest_load_bytes"] for r in rows),
                "narrowest_load_bytes": min(r["narrowest_load_bytes"] for r in rows),
                "spill_variants": sum(r["spill_instructions"] > 0 for r in rows),
                "max_shared_bytes": max(r["shared_bytes"] for r in rows),
                "max_loop_instructions_per_element": max(
                    (r["loop_instructions_per_element"] or 0 for r in rows), default=0
                ),
                "min_bytes_in_flight_per_sm": min(
                    (r["bytes_in_flight_per_sm"] for r in rows if r["bytes_in_flight_per_sm"]),
                    default=None,
                ),
                "max_mma_replication": max(
                    (r["mma_replication"] for r in rows if r["mma_replication"]), default=None
                ),
            }
        )
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines; a row may stop short (its last cell then spans the rest)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(row) + " " + "|" * (len(header) - len(row) + 1))
    return lines


def summary_markdown(report: dict) -> str:
    """The worst case of each kernel on each arch, and where the table comes from."""
    header = [
        "kernel",
        "arch",
        "variants",
        "registers (max)",
        "occupancy (min)",
        "global loads",
        "spilling variants",
        "shared memory (max)",
        "loads in flight per SM (min)",
        "loop instructions per element (max)",
        "warps per MMA tile (max)",
    ]
    rows = [
        [
            f"`{s['kernel']}`",
            s["arch"],
            str(s["variants"]),
            str(s["max_registers"]),
            f"{s['min_occupancy']:.0%}",
            f"{s['narrowest_load_bytes']}-{s['widest_load_bytes']} B"
            if s["widest_load_bytes"]
            else "-",
            str(s["spill_variants"]),
            f"{s['max_shared_bytes'] / 1024:.0f} KiB",
            _kib(s["min_bytes_in_flight_per_sm"]),
            _number(s["max_loop_instructions_per_element"] or None),
            _replication(s["max_mma_replication"]),
        ]
        for s in summary(report)
    ]
    provenance = (
        f"`{report['command']}` at {report['revision']}, {report['date']}: triton "
        f"{report['triton']}, "
        + ", ".join(f"{a} ptxas {v.split(', ')[-1]}" for a, v in report["ptxas"].items())
        + "; recorded in `benchmarks/results/kernel-resources.json`. Compiled, never run."
    )
    return "\n".join([provenance, "", *_table(header, rows)]) + "\n"


def roofline_markdown(report: dict) -> str:
    """The predicted H100 time of each fused-op benchmark case."""
    header = ["case", "bytes", "FLOPs", "FLOP/byte", "bound by", "predicted time"]
    rows = [
        [
            row["case"],
            f"{_si(row['bytes'])}B",
            _si(row["flops"]),
            f"{row['flops_per_byte']:.2g}",
            row["bound"],
            _seconds(row["predicted_s"]),
        ]
        for row in report["roofline"]
    ]
    intro = (
        f"Predicted, not measured: at {BANDWIDTH_FRACTION:.0%} of "
        f"{H100_BANDWIDTH / 1e12:g} TB/s or at {H100_FLOPS / 1e12:g} TFLOP/s, whichever is "
        "longer; launch cost is not included (from `python benchmarks/kernel_resources.py`, "
        "recorded in `benchmarks/results/kernel-resources.json`)."
    )
    return "\n".join([intro, "", *_table(header, rows)]) + "\n"


def variants_markdown(report: dict) -> str:
    """One row per variant and arch."""
    header = [
        "kernel",
        "arch",
        "variant",
        "cases",
        "registers",
        "spills",
        "shared",
        "occupancy",
        "loads (bytes)",
        "in flight per SM",
        "instructions",
        "loop per element",
        "to fp64",
        "MMA",
        "warps per MMA tile",
    ]
    rows = []
    for row in report["variants"]:
        head = [f"`{row['kernel']}`", row["arch"], row["variant"], str(row["cases"])]
        if "error" in row:
            rows.append([*head, f"compile error: {row['error']}"])
            continue
        rows.append(
            [
                *head,
                str(row["registers"]),
                str(row["spill_instructions"]),
                f"{row['shared_bytes'] / 1024:.0f} KiB",
                f"{row['occupancy']:.0%}",
                f"{row['narrowest_load_bytes']}-{row['widest_load_bytes']}",
                _kib(row["bytes_in_flight_per_sm"]),
                str(row["instructions"]),
                _number(row["loop_instructions_per_element"]),
                str(row["to_fp64"]),
                str(row["tensor_core"]),
                _replication(row["mma_replication"]),
            ]
        )
    return "\n".join(_table(header, rows)) + "\n"


def markdown(report: dict) -> str:
    return "\n".join(
        [
            "# Kernel resources, compiled for GPUs without one",
            "",
            "## Worst case per kernel and arch",
            "",
            summary_markdown(report),
            "## The benchmark cases on an H100 SXM",
            "",
            roofline_markdown(report),
            "## Every variant",
            "",
            "Registers per thread; spills: local-memory loads and stores in the SASS; shared: "
            "per block, as launched; occupancy: resident warps over 64; loads: the narrowest "
            "and widest global load per thread; instructions: SASS, static; to fp64: "
            "`F2F.F64.F32` conversions; MMA: `DMMA` / `HMMA` instructions.",
            "",
            variants_markdown(report),
        ]
    )


def _json(report: dict) -> str:
    """The report with one line per variant (diffs then show which variants changed)."""
    head = {k: v for k, v in report.items() if k != "variants"}
    rows = ",\n".join("  " + json.dumps(row) for row in report["variants"])
    return json.dumps(head, indent=1)[:-2] + ',\n "variants": [\n' + rows + "\n ]\n}\n"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _kib(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024:.0f} KiB"


def _replication(value: float | None) -> str:
    # None: no tl.dot, or one lowered to FMAs (sm_100 has no float64 MMA in triton 3.7).
    return "-" if value is None else f"{value:g}"


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:g} "


def _seconds(value: float) -> str:
    for unit, scale in (("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return "< 1 ns"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--arch", default="80,90,100", help="compute capabilities, e.g. 80,90")
    parser.add_argument("--quick", action="store_true", help="a few K per kernel, for a smoke run")
    parser.add_argument(
        "--tasks", default="", help="the K of the cases, e.g. 2,8 (1..256 by default)"
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", default="", help="kernels whose name holds this (a partial run)")
    parser.add_argument(
        "--check", action="store_true", help="compare with the recorded files instead of writing"
    )
    args = parser.parse_args(argv)
    unknown = [a for a in args.arch.split(",") if not a.isdigit() or int(a) not in ARCHS]
    if unknown:
        raise SystemExit(
            f"--arch {','.join(unknown)}: the report knows sm_"
            + ", sm_".join(map(str, ARCHS))
            + " (their register files, shared memory and SM counts); give those numbers"
        )
    # The kernels must compile, not run in the interpreter: a JITFunction, not an
    # InterpretedFunction (the variable is read when the kernel modules are imported).
    if os.environ.pop("TRITON_INTERPRET", None) is not None and any(
        name in sys.modules for name in KERNEL_MODULES
    ):
        raise SystemExit("unset TRITON_INTERPRET before the kernels are imported")
    if triton is None:
        raise SystemExit("compiling the kernels needs triton: pip install -e '.[triton]'")
    partial = args.quick or args.tasks or args.only or args.arch != "80,90,100"
    if partial and not args.check and args.out.resolve() == RESULTS.resolve():
        raise SystemExit(
            f"a partial run would overwrite the recorded table in {RESULTS}: give --out"
        )
    archs = supported_archs([int(a) for a in args.arch.split(",")])
    if args.tasks:
        task_counts = [int(k) for k in args.tasks.split(",")]
    else:
        task_counts = QUICK_TASK_COUNTS if args.quick else list(range(1, 257))
    report = run(archs, task_counts, args.jobs, args.only)
    problems = failures(report)
    for line in problems:
        print(line, file=sys.stderr)
    for s in summary(report):
        print(
            f"{s['kernel']:<32} {s['arch']:<7} {s['variants']:>4} variants, registers <= "
            f"{s['max_registers']}, occupancy >= {s['min_occupancy']:.0%}, loads "
            f"{s['narrowest_load_bytes']}-{s['widest_load_bytes']} B, spilling variants "
            f"{s['spill_variants']}"
        )
    if args.check:
        stale = _stale(report, args.out / "kernel-resources.json")
        for line in stale:
            print(line, file=sys.stderr)
        problems += stale
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernel-resources.json").write_text(_json(report))
        (args.out / "kernel-resources.md").write_text(markdown(report))
    return 1 if problems else 0


# Compared with the recorded run by --check: what the compiler decides for each variant.
_COMPARED = (
    "registers",
    "spill_instructions",
    "shared_bytes",
    "widest_load_bytes",
    "narrowest_load_bytes",
)


def _stale(report: dict, recorded_path: Path) -> list[str]:
    recorded = json.loads(recorded_path.read_text())
    if recorded["triton"] != report["triton"]:
        return [
            f"{recorded_path}: recorded with triton {recorded['triton']}, not {report['triton']}"
        ]
    out = [
        f"{name} differs from the recorded one"
        for name in ("ptxas", "roofline")
        if recorded[name] != json.loads(json.dumps(report[name]))
    ]
    key = lambda row: (row["kernel"], row["arch"], row["variant"])  # noqa: E731
    old = {key(row): row for row in recorded["variants"]}
    new = {key(row): row for row in report["variants"]}
    out += [f"not recorded: {' / '.join(k)}" for k in new.keys() - old.keys()]
    out += [f"no longer compiled: {' / '.join(k)}" for k in old.keys() - new.keys()]
    for k in new.keys() & old.keys():
        changed = [f for f in _COMPARED if new[k].get(f) != old[k].get(f)]
        if changed:
            out.append(f"changed {', '.join(changed)}: {' / '.join(k)}")
    if out:
        out.append(
            f"rerun `python benchmarks/kernel_resources.py` to record them in "
            f"{recorded_path.parent}"
        )
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
