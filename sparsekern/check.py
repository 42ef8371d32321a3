"""Offline static check of the block-sparse Triton kernels (``python -m sparsekern.check``).

Every kernel in ``kernels/bsmm.py`` and ``kernels/bsconv.py`` (forward, input
gradient, weight gradient of the block-sparse matmul and of the implicit-GEMM
conv) is compiled ahead of time for sm_80 and sm_90 with ``triton.compile`` and a
``GPUTarget``, so no GPU and no CUDA driver are needed: only the ``ptxas`` and
``cuobjdump`` that ship inside the Triton wheel. For each compiled kernel the
check reports

* registers, spill stores/loads and stack frame (local memory) from
  ``ptxas -v`` run on the kernel's PTX, cross-checked against the registers
  recorded in the cubin Triton produced (``cuobjdump -res-usage``);
* shared memory (``compiled.metadata.shared``);
* tensor-core instructions in the SASS: ``HMMA`` on sm_80, ``HGMMA`` (wgmma)
  or ``HMMA`` (small tiles fall back to mma.sync) on sm_90;
* an occupancy estimate (resident warps / 64) from registers, shared memory,
  threads and blocks per SM.

It exits non-zero when a default config (what runs untuned) spills, or when
any kernel does not fit on an SM, fails to compile, or should use tensor
cores and has none. A tuning candidate that spills is listed with a note
instead: the autotuner in ``kernels/bsmm.py`` reads each compiled
candidate's spill count and never picks one that spills.

Coverage: sm_80 and sm_90; fp32 (both ``DOT_PRECISION`` "ieee" and "tf32"),
fp16 and bf16; sparsity blocks 16x16, 32x32, 64x64, 128x128, 64x32 and 32x128;
``HAS_MIXED`` True and False for the forward kernel (True, the heavier
variant, for the two gradients). The conv kernels run with ``HAS_MIXED``
True only and blocks 16x16, 32x32, 64x64, 128x128 and 128x32. Per kind the default config and the largest
candidate (by shared memory, then tile size) that survives ``configs.prune``
for the arch's shared memory, the latter for fp16 and fp32-tf32 only (bf16
shares fp16's tiles and element size; fp32-ieee is slow to compile).
``--full`` adds the largest configs for bf16 and fp32-ieee and takes the
largest candidate of every code path (each value of the non-tile config
constexprs such as ``SWAP_AB`` or ``GROUP``). ``--quick`` checks a small
subset (fp16 and fp32-tf32, blocks 64x64 and 32x32, 64x64 only for the conv
kernels, default configs). ``--only TEXT`` keeps the kernels whose name
contains ``TEXT`` (``--only bsconv``: the conv kernels).

Limits, on purpose:

* fp32 with ``DOT_PRECISION="ieee"`` (PyTorch's default, ``allow_tf32`` off)
  lowers ``tl.dot`` to FMAs, never to tensor cores, so only spills and fit are
  judged for it; its tensor-core count is reported but not required.
* Kernels are specialised like a launch with contiguous operands: 16-byte
  aligned pointers, unit inner strides (Triton turns an int equal to 1 into a
  constant), and ``M``/``N``/``K``/row strides divisible by 16. Transposed or
  odd-sized operands compile other variants, which are not checked.
* Conv kernels are specialised for channels_last activations (unit channel
  stride) with channel counts divisible by 16; the geometry ints (image
  sizes, taps, conv strides, paddings, dilations, the token count) get no
  divisibility. A conv stride or dilation of 1 at run time makes Triton
  specialise it to a constant, a lighter variant than the one checked.
* ``HAS_BIAS`` is True for the forward kernel and ``UPCAST`` is always False
  (it only exists for the interpreter); the weight-gradient output is taken
  in the operand dtype (the single-split case).
* Occupancy is an estimate in the style of the CUDA occupancy calculator
  (registers allocated per warp in units of 256 and split over the four SM
  sub-partitions, 1 KiB of shared memory reserved per block); it ignores
  the L1/shared carve-out the driver actually picks.
* ``ptxas -v`` is the ``ptxas`` Triton itself uses for the arch, with the
  allocation flags its backend passes (read from the backend's source, as
  Triton does not expose its command line); a row notes any disagreement
  with the registers/stack of the cubin Triton produced. Another CUDA
  toolkit or Triton release can allocate differently.

The kernels must be compiled, not interpreted: if ``TRITON_INTERPRET`` or
``SPARSEKERN_INTERPRET`` is set, the check re-runs itself in a subprocess
without them.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

INTERPRET_VARS = ("TRITON_INTERPRET", "SPARSEKERN_INTERPRET")


# ---------------------------------------------------------------- what to check
@dataclass(frozen=True)
class Arch:
    cap: int
    gpu_name: str  # ptxas --gpu-name; Triton compiles sm_90 as the arch-specific sm_90a
    smem_per_sm: int  # shared memory an SM can hold in total
    smem_per_block: int  # opt-in maximum for one block (what configs.prune is given)
    tc_ops: tuple[str, ...]  # SASS opcodes that count as tensor-core instructions


ARCHS = {
    80: Arch(80, "sm_80", 164 * 1024, 163 * 1024, ("HMMA",)),
    90: Arch(90, "sm_90a", 228 * 1024, 227 * 1024, ("HGMMA", "HMMA")),
}
REGS_PER_SM = 65536
SM_PARTITIONS = 4  # a warp's registers come from one of the four sub-partitions
REG_ALLOC_UNIT = 256  # registers are allocated per warp in chunks of 256
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
MAX_WARPS_PER_SM = MAX_THREADS_PER_SM // 32
SMEM_RESERVED_PER_BLOCK = 1024  # the driver keeps 1 KiB per block for itself


@dataclass(frozen=True)
class Precision:
    name: str
    ptr_type: str  # Triton signature element type of the data operands
    elem_bytes: int
    dot_precision: str
    needs_tensor_cores: bool


PRECISIONS = {
    p.name: p
    for p in (
        # ieee fp32 is computed with FMAs by design, so tensor cores are not required.
        Precision("fp32-ieee", "fp32", 4, "ieee", False),
        Precision("fp32-tf32", "fp32", 4, "tf32", True),
        Precision("fp16", "fp16", 2, "ieee", True),
        Precision("bf16", "bf16", 2, "ieee", True),
    )
}


@dataclass(frozen=True)
class KernelSpec:
    """How to build a launch-like signature for one kernel."""

    kind: str  # name used by kernels/configs.py
    fn_name: str
    data_ptrs: frozenset[str]  # pointers to operands in the compute dtype
    unit_strides: frozenset[str]  # inner strides of contiguous operands (== 1)
    unaligned_ints: frozenset[str] = frozenset()  # ints with no divisibility to assume
    extra_constexprs: dict = field(default_factory=dict)
    module: str = "bsmm"  # the module of sparsekern.kernels that defines the kernel


SPECS = {
    "fwd": KernelSpec(
        "fwd",
        "_bsmm_fwd_kernel",
        frozenset({"x_ptr", "wt_ptr", "wf_ptr", "bias_ptr", "y_ptr"}),
        frozenset({"stride_xk", "stride_yn"}),
        frozenset({"n_frozen"}),
        {"HAS_BIAS": True},
    ),
    "dx": KernelSpec(
        "dx",
        "_bsmm_dx_kernel",
        frozenset({"dy_ptr", "wt_ptr", "wf_ptr", "dx_ptr"}),
        frozenset({"stride_dyn", "stride_dxk"}),
        frozenset({"n_frozen"}),
    ),
    "wgrad": KernelSpec(
        "wgrad",
        "_bsmm_dw_kernel",
        frozenset({"dy_ptr", "x_ptr", "dw_ptr"}),
        frozenset({"stride_dyn", "stride_xk"}),
    ),
}
# Conv geometry ints: image sizes, taps and conv strides/paddings/dilations are small and odd in practice.
_CONV_GEOMETRY = frozenset(
    {"M", "H", "W", "H_out", "W_out", "KW", "CPB", "conv_stride_h", "conv_stride_w", "pad_h", "pad_w", "dil_h", "dil_w"}
)
SPECS.update(
    {
        "conv_fwd": KernelSpec(
            "conv_fwd",
            "_bsconv_fwd_kernel",
            frozenset({"x_ptr", "wt_ptr", "wf_ptr", "bias_ptr", "y_ptr"}),
            frozenset({"stride_xc", "stride_yc"}),  # channels_last activations
            _CONV_GEOMETRY | {"n_frozen"},
            {"HAS_BIAS": True},
            module="bsconv",
        ),
        "conv_dx": KernelSpec(
            "conv_dx",
            "_bsconv_dx_kernel",
            frozenset({"dy_ptr", "wt_ptr", "wf_ptr", "dx_ptr"}),
            frozenset({"stride_dyc", "stride_dxc"}),
            _CONV_GEOMETRY | {"HQ", "WQ", "KH", "n_frozen"},
            module="bsconv",
        ),
        "conv_wgrad": KernelSpec(
            "conv_wgrad",
            "_bsconv_dw_kernel",
            frozenset({"dy_ptr", "x_ptr", "dw_ptr"}),
            frozenset({"stride_dyc", "stride_xc"}),
            _CONV_GEOMETRY,
            module="bsconv",
        ),
    }
)
# (kind, HAS_MIXED) pairs: the forward kernel both ways, the gradients with the heavier mixed path.
# The conv kernels (kernels/bsconv.py) only with the mixed path: their forward differs from the matmul's
# in the gather, which HAS_MIXED does not touch.
VARIANTS = (
    ("fwd", False),
    ("fwd", True),
    ("dx", True),
    ("wgrad", True),
    ("conv_fwd", True),
    ("conv_dx", True),
    ("conv_wgrad", True),
)
BLOCKS = ((16, 16), (32, 32), (64, 64), (128, 128), (64, 32), (32, 128))
CONV_BLOCKS = ((16, 16), (32, 32), (64, 64), (128, 128), (128, 32))
QUICK_BLOCKS = ((64, 64), (32, 32))
QUICK_CONV_BLOCKS = ((64, 64),)
QUICK_PRECISIONS = ("fp16", "fp32-tf32")
# Outside --full, only these get the largest config too: bf16 has fp16's tiles and element size (its
# registers, spills and shared memory have matched fp16's everywhere), and fp32-ieee's FMA dot is
# several times slower to compile; both still get every default config.
LARGEST_PRECISIONS = ("fp16", "fp32-tf32")


# ------------------------------------------------------------------- job list
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
SCOPES = ("quick", "default", "full")


def _config_key(cfg) -> tuple:
    return tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages


def _code_path(cfg) -> tuple:
    """Config constexprs other than the tile sizes (``SWAP_AB``, ``GROUP``): they select different kernel code."""
    return tuple(sorted((k, v) for k, v in cfg.kwargs.items() if k not in TILE_KEYS))


def _pick_configs(kind: str, bm: int, bk: int, elem_bytes: int, arch: Arch, scope: str) -> list[tuple[str, object]]:
    """The default config and the largest pruned candidate (by shared memory, then tile size).

    ``full`` takes the largest candidate of every code path instead of the largest overall.
    """
    from sparsekern.kernels import configs as cfgs

    default = cfgs.default_config(kind, bm, bk, elem_bytes)
    picked = {_config_key(default): ["default", default]}
    if scope == "quick":
        return [tuple(v) for v in picked.values()]
    cands = cfgs.prune(cfgs.for_block(cfgs.candidates(kind), bm, bk), elem_bytes, kind, arch.smem_per_block)

    def size(c):
        k = c.kwargs
        return cfgs.smem_bytes(c, elem_bytes, kind), k["BLOCK_M"] * k["BLOCK_N"] * k["BLOCK_K"], c.num_warps

    paths = {}
    for c in cands:
        paths.setdefault(_code_path(c) if scope == "full" else (), []).append(c)
    for group in paths.values():
        largest = max(group, key=size)
        entry = picked.setdefault(_config_key(largest), ["largest", largest])
        if entry[0] == "default":
            entry[0] = "default=largest"
    return [tuple(v) for v in picked.values()]


def build_jobs(scope: str = "default", only: str | None = None) -> list[dict]:
    """Every (kernel variant, arch, precision, block, config) to compile, as picklable dicts.

    ``only`` keeps the kernels whose function name contains it (``bsconv``: the conv kernels).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    precisions = QUICK_PRECISIONS if scope == "quick" else tuple(PRECISIONS)
    variants = [v for v in VARIANTS if only is None or only in SPECS[v[0]].fn_name]
    if not variants:
        raise ValueError(f"no kernel name contains {only!r}; kernels: {[s.fn_name for s in SPECS.values()]}")
    jobs = []
    for cap in (90, 80):
        for prec in precisions:
            for kind, mixed in variants:
                if kind.startswith("conv_"):
                    blocks = QUICK_CONV_BLOCKS if scope == "quick" else CONV_BLOCKS
                else:
                    blocks = QUICK_BLOCKS if scope == "quick" else BLOCKS
                cfg_scope = scope if scope == "full" or prec in LARGEST_PRECISIONS else "quick"
                for bm, bk in blocks:
                    elem = PRECISIONS[prec].elem_bytes
                    for label, cfg in _pick_configs(kind, bm, bk, elem, ARCHS[cap], cfg_scope):
                        jobs.append(
                            {
                                "kind": kind,
                                "has_mixed": mixed,
                                "cap": cap,
                                "dtype": prec,
                                "bm": bm,
                                "bk": bk,
                                "config": label,
                                "kwargs": dict(cfg.kwargs),
                                "num_warps": cfg.num_warps,
                                "num_stages": cfg.num_stages,
                            }
                        )
    return jobs


# ------------------------------------------------------------------ compiling
def _signature(fn, spec: KernelSpec, prec: Precision, constexprs: dict) -> tuple[dict, dict, list]:
    """Signature, constexprs and 16-divisible args, as the JIT would specialise a contiguous launch."""
    names = list(fn.arg_names)
    listed = spec.data_ptrs | spec.unit_strides | spec.unaligned_ints | set(constexprs)
    missing = listed - set(names)
    if missing:  # a renamed kernel argument must break the check, not silently change what it compiles
        raise ValueError(f"{spec.fn_name} has no argument(s) {sorted(missing)}; update sparsekern/check.py")
    consts = dict(constexprs)
    consts.update({name: 1 for name in spec.unit_strides})
    # divisible stays in argument order: Triton hashes str(attrs), and a set's order changes per process,
    # which would defeat its compile cache.
    signature, divisible = {}, []
    for name in names:
        if name in consts:
            signature[name] = "constexpr"
            continue
        if name in spec.data_ptrs:
            signature[name] = "*" + prec.ptr_type
        elif name == "es_ptr":
            signature[name] = "*i8"  # element_state is int8
        elif name.endswith("_ptr"):
            signature[name] = "*i32"  # layout index tensors are int32
        else:
            signature[name] = "i32"
        if name not in spec.unaligned_ints:
            divisible.append(name)
    missing_consts = [n for n, p in fn.signature.parameters.items() if _is_constexpr(p) and n not in consts]
    if missing_consts:
        raise ValueError(f"{spec.fn_name}: no value for constexpr(s) {missing_consts}; update sparsekern/check.py")
    return signature, consts, divisible


def _is_constexpr(param: inspect.Parameter) -> bool:
    return "constexpr" in str(param.annotation)


def _make_source(fn, signature: dict, consts: dict, divisible: list):
    """An ``ASTSource`` in the form this Triton release takes.

    Triton >= 3.3 keys constexprs and attributes by argument path, ``(index,)``;
    older 3.x releases key constants by name and describe alignment differently,
    so there the source is built without alignment hints (and says so).
    """
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        by_path = {(names.index(k),): v for k, v in consts.items()}
        attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in divisible}
        return ASTSource(fn, signature, by_path, attrs), True
    return ASTSource(fn, signature, consts), False


def _compile(job: dict):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    spec = SPECS[job["kind"]]
    prec = PRECISIONS[job["dtype"]]
    fn = getattr(importlib.import_module(f"sparsekern.kernels.{spec.module}"), spec.fn_name)
    constexprs = dict(
        BM=job["bm"],
        BK=job["bk"],
        HAS_MIXED=job["has_mixed"],
        DOT_PRECISION=prec.dot_precision,
        UPCAST=False,
        **spec.extra_constexprs,
        **job["kwargs"],
    )
    signature, consts, divisible = _signature(fn, spec, prec, constexprs)
    src, aligned = _make_source(fn, signature, consts, divisible)
    options = {"num_warps": job["num_warps"], "num_stages": job["num_stages"]}
    compiled = triton.compile(src, target=GPUTarget("cuda", job["cap"], 32), options=options)
    return compiled, aligned


# ---------------------------------------------------------------- NVIDIA tools
def _tool(name: str, cap: int) -> str:
    """Path of a CUDA tool from the Triton wheel, asking Triton first so it is the one it compiles with."""
    import triton

    if name == "ptxas":
        try:
            from triton.backends.nvidia.compiler import get_ptxas

            try:
                return get_ptxas(cap).path  # 3.9: a newer ptxas for sm_90+, whose PTX the old one rejects
            except TypeError:
                return get_ptxas().path
        except (ImportError, AttributeError):
            pass
    knobs = getattr(triton, "knobs", None)
    tool = getattr(getattr(knobs, "nvidia", None), name, None)
    if tool is not None and getattr(tool, "path", None):
        return tool.path
    import triton.backends.nvidia as nv

    path = Path(nv.__file__).parent / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in the Triton wheel ({path})")
    return str(path)


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return res.stdout + res.stderr


_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> dict:
    """Registers, stack frame and spill bytes from ``ptxas -v`` output (one entry function)."""
    regs = _PTXAS_REGS.search(log)
    frame = _PTXAS_FRAME.search(log)
    if regs is None or frame is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log[-2000:]}")
    stack, stores, loads = (int(g) for g in frame.groups())
    return {"regs": int(regs.group(1)), "stack_bytes": stack, "spill_stores": stores, "spill_loads": loads}


def count_tensor_core_ops(sass: str, opcodes: tuple[str, ...]) -> dict[str, int]:
    """Occurrences of each opcode (``HMMA.16816.F32`` counts as ``HMMA``) in SASS text."""
    counts = {}
    for op in opcodes:
        n = len(re.findall(rf"\b{op}\.", sass))
        if n:
            counts[op] = n
    return counts


# Flags Triton may pass to its own ptxas that change register allocation (3.9 adds --regAllocOptLevel=2
# to dodge a ptxas 13 problem; without it sm_90 kernels can collapse to 32 registers and spill far more).
_ALLOC_FLAGS = ("--regAllocOptLevel=2",)


@functools.cache
def _triton_ptxas_flags() -> tuple[str, ...]:
    """The allocation flags this Triton release passes to ptxas, so ``-v`` describes the cubin it ships.

    Read from the backend's source, since Triton does not expose its ptxas command line; the
    cubin cross-check in :func:`judge` catches the case where this guess goes stale.
    """
    try:
        from triton.backends.nvidia.compiler import CUDABackend

        src = inspect.getsource(CUDABackend.make_cubin)
    except (ImportError, AttributeError, OSError, TypeError):
        return ()
    return tuple(flag for flag in _ALLOC_FLAGS if flag in src)


def _inspect_binary(compiled, arch: Arch) -> dict:
    with tempfile.TemporaryDirectory(prefix="sparsekern-check-") as tmp:
        ptx = Path(tmp, "kernel.ptx")
        ptx.write_text(compiled.asm["ptx"])
        cmd = [_tool("ptxas", arch.cap), "-v", *_triton_ptxas_flags(), f"--gpu-name={arch.gpu_name}", str(ptx)]
        log = _run([*cmd, "-o", str(ptx) + ".o"])
        cubin = Path(tmp, "kernel.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        cuobjdump = _tool("cuobjdump", arch.cap)
        sass = _run([cuobjdump, "-sass", str(cubin)])
        usage = _run([cuobjdump, "-res-usage", str(cubin)])
    info = parse_ptxas(log)
    reg, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    info["regs_cubin"] = int(reg.group(1)) if reg else None
    info["stack_cubin"] = int(stack.group(1)) if stack else None
    info["tc_instr"] = count_tensor_core_ops(sass, arch.tc_ops)
    return info


# ------------------------------------------------------------------ occupancy
def occupancy(regs: int, shared: int, num_warps: int, arch: Arch) -> tuple[float, int, str]:
    """(resident warps / max warps, blocks per SM, limiting resource) for one SM."""
    regs_per_warp = -(-regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    warps_by_regs = SM_PARTITIONS * ((REGS_PER_SM // SM_PARTITIONS) // max(regs_per_warp, 1))
    smem = shared + SMEM_RESERVED_PER_BLOCK
    limits = {
        "regs": warps_by_regs // num_warps,
        "smem": arch.smem_per_sm // smem if shared <= arch.smem_per_block else 0,
        "threads": MAX_WARPS_PER_SM // num_warps,
        "blocks": MAX_BLOCKS_PER_SM,
    }
    limiter = min(limits, key=limits.get)
    blocks = limits[limiter]
    return blocks * num_warps / MAX_WARPS_PER_SM, blocks, limiter


# ------------------------------------------------------------------ one check
def check_one(job: dict) -> dict:
    """Compile one kernel variant and measure it; never raises (errors become the row's status)."""
    import warnings

    # Triton 3.9 warns once per process that its FP-fusion default will change; it is noise here.
    warnings.filterwarnings("ignore", message=".*FP_FUSION.*")
    arch = ARCHS[job["cap"]]
    row = _describe(job)
    start = time.perf_counter()
    try:
        compiled, aligned = _compile(job)
        info = _inspect_binary(compiled, arch)
    except Exception as exc:  # a compile or tool failure is a finding, reported in the table
        msg = " ".join(str(exc).split())[:300]
        row.update(status="ERROR", problems=[f"{type(exc).__name__}: {msg}"], seconds=time.perf_counter() - start)
        return row
    row.update(info)
    row["shared"] = int(compiled.metadata.shared)
    row["aligned"] = aligned
    # Occupancy follows the cubin that actually runs when its register count is known.
    occ, blocks, limiter = occupancy(info.get("regs_cubin") or info["regs"], row["shared"], job["num_warps"], arch)
    row.update(occupancy=occ, blocks_per_sm=blocks, occupancy_limiter=limiter)
    row["problems"], row["notes"] = judge(row, PRECISIONS[job["dtype"]])
    row["status"] = "FAIL" if row["problems"] else "ok"
    row["seconds"] = time.perf_counter() - start
    return row


def _describe(job: dict) -> dict:
    kw = job["kwargs"]
    return {
        "kernel": SPECS[job["kind"]].fn_name,
        "kind": job["kind"],
        "has_mixed": job["has_mixed"],
        "arch": f"sm_{job['cap']}",
        "dtype": job["dtype"],
        "block": f"{job['bm']}x{job['bk']}",
        "config": job["config"],
        "BLOCK_M": kw["BLOCK_M"],
        "BLOCK_N": kw["BLOCK_N"],
        "BLOCK_K": kw["BLOCK_K"],
        "num_warps": job["num_warps"],
        "num_stages": job["num_stages"],
        "kwargs": dict(kw),
        "notes": [],
    }


def judge(row: dict, prec: Precision) -> tuple[list[str], list[str]]:
    """Problems (which fail the check) and notes (which do not) for a measured row.

    A spilling *tuning candidate* is a note, not a failure: the autotuner reads
    the compiled kernel's spill count and never picks such a config. Default
    configs run untuned, so a spill there fails the check.
    """
    problems, notes = [], []
    if row["spill_stores"] or row["spill_loads"]:
        msg = f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads"
        if row.get("config", "").startswith("default"):
            problems.append(msg)
        else:
            notes.append(msg + " (candidate: the autotuner rejects it)")
    if prec.needs_tensor_cores and not row["tc_instr"]:
        problems.append("no tensor-core instructions")
    if row["blocks_per_sm"] == 0:
        problems.append(f"does not fit an SM ({row['shared']} B shared, {row['regs']} regs)")
    # ptxas -v reruns the PTX; if its allocation differs from the cubin Triton ships, say so.
    if row.get("regs_cubin") not in (None, row["regs"]) or row.get("stack_cubin") not in (None, row["stack_bytes"]):
        notes.append(
            f"ptxas -v: {row['regs']} regs/{row['stack_bytes']} B stack, "
            f"Triton's cubin: {row['regs_cubin']} regs/{row['stack_cubin']} B stack"
        )
    if row["stack_bytes"] and not problems:
        notes.append(f"{row['stack_bytes']} B stack frame without spills")
    if not row.get("aligned", True):
        notes.append("compiled without alignment hints (old Triton)")
    return problems, notes


# -------------------------------------------------------------------- running
def _interpreter_requested(env=None) -> bool:
    env = os.environ if env is None else env
    return any(var in env for var in INTERPRET_VARS)


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in INTERPRET_VARS}


def _default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _progress(i: int, n: int, row: dict) -> None:
    cfg = _config_text(row)
    print(
        f"[{i:3d}/{n}] {row['kind']:10s}{'+mixed' if row['has_mixed'] else '      '} {row['arch']} "
        f"{row['dtype']:9s} {row['block']:7s} {cfg:30s} {row['status']:5s} ({row.get('seconds', 0):.1f}s)",
        file=sys.stderr,
        flush=True,
    )


def run_check(
    quick: bool = False, jobs: int | None = None, progress: bool = True, full: bool = False, only: str | None = None
) -> list[dict]:
    """Compile and measure every kernel variant; one dict per compiled kernel, in a stable order.

    ``quick`` checks the small subset, ``full`` adds the largest config of every code path,
    ``only`` keeps the kernels whose name contains it.
    Under ``TRITON_INTERPRET``/``SPARSEKERN_INTERPRET`` the kernels in this process are
    interpreted functions, so the check runs in a clean subprocess instead.
    """
    scope = "quick" if quick else "full" if full else "default"
    if _interpreter_requested():
        return _run_in_clean_subprocess(scope, jobs, only)
    todo = build_jobs(scope, only)
    workers = min(jobs or _default_jobs(), len(todo))
    rows: list[dict | None] = [None] * len(todo)
    if workers <= 1:
        for i, job in enumerate(todo):
            rows[i] = check_one(job)
            if progress:
                _progress(i + 1, len(todo), rows[i])
        return rows
    # spawn, not fork: the parent has imported torch/triton, whose threads do not survive fork.
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(check_one, job): i for i, job in enumerate(todo)}
        for done, fut in enumerate(as_completed(futures), 1):
            i = futures[fut]
            try:
                rows[i] = fut.result()
            except Exception as exc:  # a crashed worker (e.g. a segfault in the compiler) is a finding too
                rows[i] = dict(_describe(todo[i]), status="ERROR", problems=[f"worker died: {exc!r}"[:300]])
            if progress:
                _progress(done, len(todo), rows[i])
    return rows


def _run_in_clean_subprocess(scope: str, jobs: int | None, only: str | None = None) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "rows.json")
        cmd = [sys.executable, "-m", "sparsekern.check", "--json", str(out)]
        cmd += [] if scope == "default" else [f"--{scope}"]
        cmd += ["--jobs", str(jobs)] if jobs else []
        cmd += ["--only", only] if only else []
        # The table goes to our stderr so that the caller's stdout only gets what it prints itself.
        subprocess.run(cmd, env=_clean_env(), stdout=sys.stderr)
        if not out.exists():
            raise RuntimeError("the clean-environment check subprocess wrote no results")
        return json.loads(out.read_text())


# -------------------------------------------------------------------- output
def _config_text(row: dict) -> str:
    text = f"M{row['BLOCK_M']} N{row['BLOCK_N']} K{row['BLOCK_K']} w{row['num_warps']} s{row['num_stages']}"
    # Code-path constexprs, shown only when they leave the plain path (SWAP_AB=False, GROUP=1 are omitted).
    for key, value in row.get("kwargs", {}).items():
        if value is True:
            text += f" {key}"
        elif key not in TILE_KEYS and value is not False and value not in (0, 1):
            text += f" {key}={value}"
    return text


def _cells(row: dict) -> list[str]:
    kernel = row["kernel"] + (" (mixed)" if row["has_mixed"] else "")
    config = f"{_config_text(row)} [{row['config']}]"
    if row["status"] == "ERROR":
        return [kernel, row["arch"], row["dtype"], row["block"], config, "-", "-", "-", "-", "-", "-",
                "ERROR: " + row["problems"][0]]  # fmt: skip
    spills = f"{row['spill_stores']}/{row['spill_loads']}"
    tc = ", ".join(f"{op} {n}" for op, n in row["tc_instr"].items()) or "0"
    occ = f"{row['occupancy']:.2f} ({row['blocks_per_sm']} blk, {row['occupancy_limiter']})"
    status = "ok" if row["status"] == "ok" else "FAIL: " + "; ".join(row["problems"])
    if row["notes"]:
        status += " (" + "; ".join(row["notes"]) + ")"
    return [kernel, row["arch"], row["dtype"], row["block"], config, str(row["regs"]), spills,
            str(row["stack_bytes"]), str(row["shared"]), tc, occ, status]  # fmt: skip


HEADER = ["kernel", "arch", "dtype", "block", "config", "regs", "spills st/ld (B)", "stack (B)", "smem (B)",
          "tensor-core instr", "occupancy", "status"]  # fmt: skip


def format_table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    body = [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in [HEADER, *body]) for i in range(len(HEADER))]

    def fmt(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(HEADER), sep, *(fmt(c) for c in body)])


def failures(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] != "ok"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekern.check", description=__doc__.split("\n")[0])
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--quick", action="store_true", help="small subset: fp16 + fp32-tf32, 64x64 and 32x32")
    scope.add_argument("--full", action="store_true", help="also the largest config of every code path")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: usable CPUs)")
    parser.add_argument("--only", metavar="TEXT", help="only kernels whose name contains TEXT (e.g. bsconv, bsmm)")
    args = parser.parse_args(argv)
    if _interpreter_requested():
        # Re-exec rather than unset: the kernels may already be defined as interpreted functions.
        cmd = [sys.executable, "-m", "sparsekern.check", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=_clean_env()).returncode
    start = time.perf_counter()
    rows = run_check(quick=args.quick, jobs=args.jobs, full=args.full, only=args.only)
    print(format_table(rows))
    bad = failures(rows)
    print(f"\n{len(rows)} kernels checked in {time.perf_counter() - start:.0f}s; {len(bad)} with problems.")
    for r in bad:
        print(f"  {r['kernel']} mixed={r['has_mixed']} {r['arch']} {r['dtype']} {r['block']} {_config_text(r)}: "
              f"{'; '.join(r['problems'])}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
