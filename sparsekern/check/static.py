"""The per-kernel static check: registers, spills, stack, shared memory, tensor cores, occupancy."""

from __future__ import annotations

import time

from sparsekern.check.compile import compile_job, inspect_binary
from sparsekern.check.specs import (
    ARCHS,
    MAX_BLOCKS_PER_SM,
    MAX_WARPS_PER_SM,
    PRECISIONS,
    REG_ALLOC_UNIT,
    REGS_PER_SM,
    SM_PARTITIONS,
    SMEM_RESERVED_PER_BLOCK,
    Arch,
    Precision,
    job_fn_name,
)


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
    row = describe_job(job)
    start = time.perf_counter()
    try:
        compiled, aligned = compile_job(job)
        info = inspect_binary(compiled, arch)[0]
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


def describe_job(job: dict) -> dict:
    kw = job["kwargs"]
    return {
        "kernel": job_fn_name(job),
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
