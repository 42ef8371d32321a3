"""Offline compiles (``triton.compile`` with a ``GPUTarget``) and the CUDA tools of the Triton wheel."""

from __future__ import annotations

import functools
import inspect
import re
import subprocess
import tempfile
from pathlib import Path

from sparsekern.check.specs import PRECISIONS, Arch, KernelSpec, Precision, active_descriptors, job_kernel, job_tiles

# Metadata the kernels read as packed int64 pairs of int32: (index, slot) from layout.col_slot and
# layout.row_slot_t, and the conv launchers' per-launch arrays (tap offsets, lines, descriptor tables).
PACKED_POINTERS = frozenset(
    {
        "col_slot_ptr",
        "row_slot_t_ptr",
        "chan_slot_ptr",
        "tap_ptr",
        "line_row_slot_ptr",
        "line_out_ptr",
        "tab_ptr",  # bsconv_tma's padded tables: rows of two packed pairs
    }
)


def tile_value(name: str, kwargs: dict) -> int:
    """A tile constexpr's value; ``WIDE`` is the weight-gradient width ``GROUP * BLOCK_K``
    (``kwargs`` from ``specs.job_tiles``, which adds the rectangle of a descriptor conv kernel)."""
    if name == "WIDE":
        return kwargs.get("GROUP", 1) * kwargs["BLOCK_K"]
    return kwargs[name]


def desc_type(elem: str, block: tuple[int, ...]) -> str:
    """The signature string of a host TensorDescriptor argument (Triton 3.6 and 3.9 both take it)."""
    return f"tensordesc<{elem}[{', '.join(str(b) for b in block)}]>"


def _signature(
    fn, spec: KernelSpec, prec: Precision, constexprs: dict, descs: dict | None = None
) -> tuple[dict, dict, list]:
    """Signature, constexprs and 16-divisible args, as the JIT would specialise a contiguous launch.

    ``descs`` maps descriptor arguments to their block shape (ints).
    """
    descs = descs or {}
    names = list(fn.arg_names)
    listed = spec.data_ptrs | spec.unit_strides | spec.unaligned_ints | set(constexprs) | set(descs)
    missing = listed - set(names)
    if missing:  # a renamed kernel argument must break the check, not silently change what it compiles
        raise ValueError(f"{spec.fn_name} has no argument(s) {sorted(missing)}; update sparsekern/check/specs.py")
    consts = dict(constexprs)
    consts.update({name: 1 for name in spec.unit_strides})
    # divisible stays in argument order: Triton hashes str(attrs), and a set's order changes per process,
    # which would defeat its compile cache.
    signature, divisible = {}, []
    for name in names:
        if name in consts:
            signature[name] = "constexpr"
            continue
        if name in descs:
            signature[name] = desc_type(prec.ptr_type, descs[name])
            continue
        if name in spec.data_ptrs:
            signature[name] = "*" + prec.ptr_type
        elif name == "es_ptr":
            signature[name] = "*i8"  # element_state is int8
        elif name in PACKED_POINTERS:
            signature[name] = "*i64"  # (index, slot) int32 pairs read as one int64
        elif name.endswith("_ptr"):
            signature[name] = "*i32"  # layout index tensors are int32
        else:
            signature[name] = "i32"
        if name not in spec.unaligned_ints:
            divisible.append(name)
    missing_consts = [n for n, p in fn.signature.parameters.items() if _is_constexpr(p) and n not in consts]
    if missing_consts:
        where = "update sparsekern/check/specs.py"
        raise ValueError(f"{spec.fn_name}: no value for constexpr(s) {missing_consts}; {where}")
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


def compile_source(fn, signature: dict, consts: dict, divisible: list, cap: int, num_warps: int, num_stages: int):
    """``triton.compile`` for ``sm_<cap>`` without a GPU; returns (compiled, aligned)."""
    import triton
    from triton.backends.compiler import GPUTarget

    src, aligned = _make_source(fn, signature, consts, divisible)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options), aligned


def compile_job(job: dict):
    """Compile one kernel job (see ``specs.make_job``); returns (compiled, aligned)."""
    fn, spec = job_kernel(job)
    prec = PRECISIONS[job["dtype"]]
    tiles = job_tiles(job)
    constexprs = dict(
        BM=job["bm"],
        BK=job["bk"],
        HAS_MIXED=job["has_mixed"],
        DOT_PRECISION=prec.dot_precision,
        UPCAST=False,
        **spec.extra_constexprs,
        **job["kwargs"],
    )
    if spec.rect:
        constexprs.update({k: tiles[k] for k in ("TN", "TH", "TW")})
    if "USE_TMA" in fn.arg_names:
        constexprs["USE_TMA"] = job.get("use_tma", False)
    descs = {
        arg: tuple(tile_value(t, tiles) for t in block)
        for arg, block in active_descriptors(spec, job["kwargs"], spec.rect or constexprs.get("USE_TMA", False)).items()
    }
    signature, consts, divisible = _signature(fn, spec, prec, constexprs, descs)
    return compile_source(fn, signature, consts, divisible, job["cap"], job["num_warps"], job["num_stages"])


def job_descriptors(job: dict) -> set[str]:
    """The kernel arguments a job passes as descriptors (imports the kernel to see whether it has USE_TMA)."""
    fn, spec = job_kernel(job)
    tma = spec.rect or ("USE_TMA" in fn.arg_names and job.get("use_tma", False))
    return set(active_descriptors(spec, job["kwargs"], tma))


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


def ptxas_perf_warnings(log: str) -> list[str]:
    """ptxas's "Potential Performance Loss" warnings (C7515 and kin: e.g. wgmma serialized), one line each."""
    return [" ".join(line.split()) for line in log.splitlines() if "Performance Loss" in line]


def wgmma_serialized(warnings: list[str]) -> bool:
    """Whether ptxas serialized the wgmma pipeline (warning C7515)."""
    return any("C7515" in w or ("wgmma" in w.lower() and "serializ" in w.lower()) for w in warnings)


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
    cubin cross-check in ``static.judge`` catches the case where this guess goes stale.
    """
    try:
        from triton.backends.nvidia.compiler import CUDABackend

        src = inspect.getsource(CUDABackend.make_cubin)
    except (ImportError, AttributeError, OSError, TypeError):
        return ()
    return tuple(flag for flag in _ALLOC_FLAGS if flag in src)


def inspect_binary(compiled, arch: Arch) -> tuple[dict, str]:
    """(ptxas/cuobjdump figures, SASS text) of a compiled kernel."""
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
    info["ptxas_warnings"] = ptxas_perf_warnings(log)
    return info, sass


def _inspect_binary(compiled, arch: Arch) -> dict:
    return inspect_binary(compiled, arch)[0]
