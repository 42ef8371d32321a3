"""Running the check (worker processes, the interpreter guard), its tables and the command line."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from sparsekern import kernels
from sparsekern.check import twins
from sparsekern.check.specs import INTERPRET_VARS, TILE_KEYS, build_jobs
from sparsekern.check.static import check_one, describe_job


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
    what = row["label"] if "proof" in row else f"{row['kind']:10s}{'+mixed' if row['has_mixed'] else '      '}"
    print(
        f"[{i:3d}/{n}] {what:24s} {row['arch']} {row['dtype']:9s} {row['block']:7s} {_config_text(row):30s} "
        f"{row['status']:5s} ({row.get('seconds', 0):.1f}s)",
        file=sys.stderr,
        flush=True,
    )


def _failed_row(task, job: dict, exc: Exception) -> dict:
    row = twins.describe(job) if task is twins.analyse_one else describe_job(job)
    return dict(row, status="ERROR", problems=[f"worker died: {exc!r}"[:300]])


def _run_tasks(tasks: list[tuple], jobs: int | None, progress: bool) -> list[dict]:
    """Run ``(function, job)`` pairs in spawned worker processes; rows in the tasks' order."""
    workers = min(jobs or _default_jobs(), len(tasks))
    rows: list[dict | None] = [None] * len(tasks)
    if workers <= 1:
        for i, (task, job) in enumerate(tasks):
            rows[i] = task(job)
            if progress:
                _progress(i + 1, len(tasks), rows[i])
        return rows
    # spawn, not fork: the parent has imported torch/triton, whose threads do not survive fork.
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(task, job): i for i, (task, job) in enumerate(tasks)}
        for done, fut in enumerate(as_completed(futures), 1):
            i = futures[fut]
            try:
                rows[i] = fut.result()
            except Exception as exc:  # a crashed worker (e.g. a segfault in the compiler) is a finding too
                rows[i] = _failed_row(*tasks[i], exc)
            if progress:
                _progress(done, len(tasks), rows[i])
    return rows


def run_all(
    scope: str = "default",
    jobs: int | None = None,
    progress: bool = True,
    only: str | None = None,
    static: bool = True,
    proof: bool = True,
    dump: str | None = None,
) -> tuple[list[dict], list[dict]]:
    """(static rows, proof rows), compiled in one pool. Both lists are empty when not asked for."""
    if _interpreter_requested():
        return _run_in_clean_subprocess(scope, jobs, only, static, proof, dump)
    static_jobs = build_jobs(scope, only) if static else []
    proof_jobs = twins.build_proof_jobs(scope, only, dump) if proof else []
    tasks = [(check_one, j) for j in static_jobs] + [(twins.analyse_one, j) for j in proof_jobs]
    rows = _run_tasks(tasks, jobs, progress) if tasks else []
    return rows[: len(static_jobs)], twins.judge_all(rows[len(static_jobs) :])


def run_check(
    quick: bool = False, jobs: int | None = None, progress: bool = True, full: bool = False, only: str | None = None
) -> list[dict]:
    """The static check alone: one dict per compiled kernel, in a stable order.

    ``quick`` checks the small subset, ``full`` adds the largest config of every code path,
    ``only`` keeps the kernels whose name contains it.
    Under ``TRITON_INTERPRET``/``SPARSEKERN_INTERPRET`` the kernels in this process are
    interpreted functions, so the check runs in a clean subprocess instead.
    """
    scope = "quick" if quick else "full" if full else "default"
    return run_all(scope, jobs, progress, only, proof=False)[0]


def run_proof(
    scope: str = "default", jobs: int | None = None, progress: bool = True, only: str | None = None, dump=None
) -> list[dict]:
    """The dense-twin proof alone (see ``twins.py``): kernel, mixed and twin rows."""
    return run_all(scope, jobs, progress, only, static=False, dump=dump)[1]


def _run_in_clean_subprocess(scope, jobs, only, static, proof, dump) -> tuple[list[dict], list[dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        out, proof_out = Path(tmp, "rows.json"), Path(tmp, "proof.json")
        cmd = [sys.executable, "-m", "sparsekern.check", "--json", str(out), "--proof-json", str(proof_out)]
        cmd += [] if scope == "default" else [f"--{scope}"]
        cmd += ["--jobs", str(jobs)] if jobs else []
        cmd += ["--only", only] if only else []
        cmd += ["--dump", dump] if dump else []
        cmd += [] if proof else ["--no-twins"]
        cmd += [] if static else ["--twins"]
        # The table goes to our stderr so that the caller's stdout only gets what it prints itself.
        subprocess.run(cmd, env=_clean_env(), stdout=sys.stderr)
        if not out.exists():
            raise RuntimeError("the clean-environment check subprocess wrote no results")
        read = lambda p: json.loads(p.read_text()) if p.exists() else []  # noqa: E731
        return read(out), read(proof_out)


# -------------------------------------------------------------------- output
def _config_text(row: dict) -> str:
    kw = row.get("kwargs", {})
    text = f"M{kw['BLOCK_M']} N{kw['BLOCK_N']} K{kw['BLOCK_K']} w{row['num_warps']} s{row['num_stages']}"
    # Code-path constexprs, shown only when they leave the plain path (SWAP_AB=False, GROUP=1 are omitted).
    for key, value in kw.items():
        if value is True:
            text += f" {key}"
        elif key not in TILE_KEYS and value is not False and value not in (0, 1):
            text += f" {key}={value}"
    return text


def _markdown(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), sep, *(fmt(c) for c in body)])


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
    """The static rows as a markdown table."""
    return _markdown(HEADER, [_cells(r) for r in rows])


# ---- the proof's side-by-side table: each cell is "kernel / twin" (the twin part is left out on sm_80)
def _loop_cells(row: dict | None) -> list[str]:
    if row is None:
        return ["-"] * 11
    if row["status"] == "ERROR":
        return ["ERROR"] + ["-"] * 10
    t, s = row["ttgir_loop"] or {}, row["sass_loop"] or {}
    hgmma = " ".join(f"{n}x{shape}" for shape, n in s.get("hgmma", {}).items()) or (f"HMMA {s['hmma']}" if s else "-")
    spills = f"{row['spill_stores']}/{row['spill_loads']}"
    waits = lambda xs: ",".join(map(str, xs)) if xs else "-"  # noqa: E731
    return [
        row.get("tma", "-"),
        ",".join(map(str, row["bufs"])),
        waits(t.get("async_wait")),
        waits(s.get("cp_wait")),
        str(t.get("index_copies", "-")),
        hgmma,
        f"{s.get('utmaldg', '-')}/{s.get('ldgsts', '-')}",
        waits(s.get("wgmma_wait")),
        "yes" if row["serialized"] else "no",
        str(s.get("non_mma", "-")),
        f"{row['regs']} {spills}",
    ]


PROOF_HEADER = ["kernel", "arch", "config", "A,B,C TMA", "smem bufs A,B", "ttgir async_wait", "DEPBAR SB0",
                "idx copies", "HGMMA/iter", "UTMALDG/LDGSTS", "wgmma wait", "C7515", "non-MMA/iter",
                "regs spills", "status"]  # fmt: skip


def format_proof(rows: list[dict]) -> str:
    """Kernel rows (and mixed variants) against their twins, as a markdown table."""
    twin_rows = {r["label"]: r for r in rows if r["proof"] == "twin"}
    body = []
    for r in rows:
        if r["proof"] == "twin":
            continue
        twin = twin_rows.get(r["twin_label"]) if r["arch"] != "sm_80" else None
        mine, theirs = _loop_cells(r), _loop_cells(twin)
        cells = [m if twin is None else f"{m} / {o}" for m, o in zip(mine, theirs, strict=True)]
        if r["status"] in ("ok", "FAIL", "ERROR"):
            status = "ok" if r["status"] == "ok" else f"{r['status']}: " + "; ".join(r["problems"])
        else:
            status = "reported" + (": " + "; ".join(r.get("notes", [])) if r.get("notes") else "")
        body.append([r["kernel"] + (" (mixed)" if r["has_mixed"] else ""), r["arch"],
                     f"{r['label']} {_config_text(r)}", *cells, status])  # fmt: skip
    return _markdown(PROOF_HEADER, body)


def failures(rows: list[dict]) -> list[dict]:
    """Rows that fail: static problems, proof gates, compile errors (reported proof rows never fail)."""
    return [r for r in rows if r["status"] not in ("ok", "info")]


def main(argv: list[str] | None = None) -> int:
    from sparsekern import check

    parser = argparse.ArgumentParser(prog="python -m sparsekern.check", description=check.__doc__.split("\n")[0])
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--quick", action="store_true", help="small subset: fp16 + fp32-tf32, 64x64 and 32x32")
    scope.add_argument("--full", action="store_true", help="also the largest config of every code path")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--twins", action="store_true", help="only the dense-twin proof (no static table)")
    which.add_argument("--no-twins", action="store_true", help="only the static check (no dense-twin proof)")
    parser.add_argument("--json", metavar="PATH", help="also write the static rows as JSON to PATH")
    parser.add_argument("--proof-json", metavar="PATH", help="also write the dense-twin proof rows as JSON to PATH")
    parser.add_argument("--dump", metavar="DIR", help="write DIR/<label>-<arch>/ (TTGIR, SASS, meta) per proof job")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: usable CPUs)")
    parser.add_argument("--only", metavar="TEXT", help="only kernels whose name contains TEXT (e.g. bsconv, bsmm)")
    args = parser.parse_args(argv)
    if not kernels.HAS_TRITON:  # the check compiles the kernels: say so before any import fails deep inside
        print(kernels.triton_missing_message("python -m sparsekern.check"), file=sys.stderr)
        return 2
    if _interpreter_requested():
        # Re-exec rather than unset: the kernels may already be defined as interpreted functions.
        cmd = [sys.executable, "-m", "sparsekern.check", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=_clean_env()).returncode
    start = time.perf_counter()
    scope_name = "quick" if args.quick else "full" if args.full else "default"
    dump = str(Path(args.dump).resolve()) if args.dump else None
    rows, proof = run_all(scope_name, args.jobs, True, args.only, not args.twins, not args.no_twins, dump)
    if rows:
        print(format_table(rows))
    if proof:
        print("\nDense-twin proof (each cell: kernel / twin; sm_80: kernel only):\n" if rows else "")
        print(format_proof(proof))
    bad = failures(rows) + failures(proof)
    print(f"\n{len(rows)} kernels checked, {len(proof)} proof compiles, in {time.perf_counter() - start:.0f}s; "
          f"{len(bad)} with problems.")  # fmt: skip
    for r in bad:
        name = r.get("label") or f"{r['kernel']} mixed={r['has_mixed']}"
        print(f"  {name} {r['arch']} {r['dtype']} {r['block']} {_config_text(r)}: {'; '.join(r['problems'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.proof_json:
        Path(args.proof_json).write_text(json.dumps(proof, indent=1))
    return 1 if bad else 0
