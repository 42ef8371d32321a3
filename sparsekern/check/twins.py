"""The dense-twin proof: each kernel's innermost MMA loop against a dense Triton GEMM of the same tile.

For every kernel kind, block and 16-bit dtype, the default config's kernel is compiled for sm_90 next
to its twin (``twin_kernels.py``): the same ``BLOCK_M/N/K``, ``SWAP_AB`` or ``GROUP`` width,
``num_warps``, ``num_stages``, and per operand the same load mechanism (a tensor descriptor where
the kernel gets one, ``USE_TMA=True``, pointers elsewhere, e.g. the conv kernels' gathered
activations). A kernel (``HAS_MIXED=False``) FAILS the proof when, in its MMA loop,

* an operand has fewer than ``num_stages - 1`` shared-memory buffers,
* there is a wait-all (``DEPBAR.LE SB0, 0x0`` in the SASS or ``ttg.async_wait {num = 0}`` in the TTGIR),
* there is a one-element index copy (``async_copy`` of a ``tensor<1x...>``),
* its HGMMA shapes per iteration differ from the twin's,
* ptxas serialized its wgmma (warning C7515),
* it has more than the twin's non-MMA instructions per iteration + ``NON_MMA_SLACK``,
* it spills.

``HAS_MIXED=True`` variants are compiled and reported (a slower path is allowed there), and so are the
pointer conv kernels that sm_90 falls back to when the activations cannot sit behind descriptors (NCHW,
unaligned channels; ``-pointer`` rows) and the descriptor kernels of strided convs (``-strided``: ``x``
through the 5-D stride-phase view) and the descriptor weight gradient over rectangles of pixels, what
batches too small for one-pixel tiles take (``-rect``): the gated conv kernels on sm_90 are the stride-1
descriptor kernels of ``kernels/bsconv_tma.py`` as they run for the issue's layer (``specs.RECT_IMAGE``,
``specs.RECT_BATCH``). On sm_80 the kernel alone is judged: buffers and no wait-all.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from sparsekern.check.specs import ARCHS, PRECISIONS, SPECS, default_config, job_fn_name, make_job

NON_MMA_SLACK = 16
PROOF_KINDS = ("fwd", "dx", "wgrad", "conv_fwd", "conv_dx", "conv_wgrad")
PROOF_BLOCKS = (32, 64, 128)
PROOF_DTYPES = ("bf16", "fp16")
# --quick: the three linear kernels, one block and dtype (a few compiles; the full proof is the default run).
QUICK_PROOF = (("fwd", "dx", "wgrad"), (64,), ("bf16",))


@dataclass(frozen=True)
class Twin:
    fn_name: str
    flags: tuple[str, str, str]  # the *_TMA constexprs of operands A, B and output C
    tiles: tuple[tuple[str, str], ...]  # block shapes of A, B, C (tile constexpr names; WIDE = GROUP*BLOCK_K)
    code_path: str  # SWAP_AB or GROUP, copied from the kernel's config


TWINS = {
    "fwd": Twin("_twin_fwd", ("X_TMA", "W_TMA", "Y_TMA"),
                (("BLOCK_M", "BLOCK_K"), ("BLOCK_N", "BLOCK_K"), ("BLOCK_M", "BLOCK_N")), "SWAP_AB"),
    "dx": Twin("_twin_dx", ("DY_TMA", "W_TMA", "DX_TMA"),
               (("BLOCK_M", "BLOCK_N"), ("BLOCK_N", "BLOCK_K"), ("BLOCK_M", "BLOCK_K")), "SWAP_AB"),
    "wgrad": Twin("_twin_dw", ("DY_TMA", "X_TMA", "DW_TMA"),
                  (("BLOCK_M", "BLOCK_N"), ("BLOCK_M", "WIDE"), ("BLOCK_N", "WIDE")), "GROUP"),
}  # fmt: skip


def base_kind(kind: str) -> str:
    return kind.removeprefix("conv_")


def label(job: dict) -> str:
    """``fwd-64x64-bf16`` (``-mixed``, ``-twin``): a job's name in tables and ``--dump`` directories."""
    text = f"{job['kind']}-{job['bm']}x{job['bk']}-{job['dtype']}"
    if job.get("config", "default").split("=")[0] != "default":
        text += "-" + job["config"]
    if job.get("proof") in ("fallback", "strided", "rectangles"):
        strided = "-strided" if job.get("phased") else ""
        return text + {"fallback": "-pointer", "strided": "-strided", "rectangles": strided + "-rect"}[job["proof"]]
    return text + ("-twin" if job.get("twin") else "-mixed" if job.get("has_mixed") else "")


# ------------------------------------------------------------------ job list
def build_proof_jobs(scope: str = "default", only: str | None = None, dump: str | None = None) -> list[dict]:
    """Kernel and twin jobs of the proof, as picklable dicts (kernel, then its mixed variant, then its twin)."""
    kinds, blocks, dtypes = QUICK_PROOF if scope == "quick" else (PROOF_KINDS, PROOF_BLOCKS, PROOF_DTYPES)
    if only is not None and not any(only in SPECS[k].fn_name for k in PROOF_KINDS):
        raise ValueError(f"no kernel name contains {only!r}; kernels: {[SPECS[k].fn_name for k in PROOF_KINDS]}")
    kinds = [k for k in kinds if only is None or only in SPECS[k].fn_name]
    jobs = []
    for cap in (90, 80):
        for kind in kinds:
            for b in blocks:
                for dtype in dtypes:
                    cfg = default_config(kind, b, b, PRECISIONS[dtype].elem_bytes, cap)
                    kernel = dict(make_job(kind, False, cap, dtype, b, b, "default", cfg), proof="kernel")
                    kernel["label"] = label(kernel)
                    group = [kernel]
                    if cap >= 90:
                        mixed = dict(kernel, has_mixed=True, proof="mixed")
                        mixed["label"] = label(mixed)
                        twin = dict(kernel, twin=True, proof="twin")
                        twin["label"] = kernel["twin_label"] = mixed["twin_label"] = label(twin)
                        group += [mixed, twin]
                        if kernel.get("rect"):  # the pointer kernel sm_90 falls back to (NCHW, unaligned C)
                            pcfg = default_config(kind, b, b, PRECISIONS[dtype].elem_bytes, cap, variant="")
                            fallback = dict(make_job(kind, False, cap, dtype, b, b, "default", pcfg), proof="fallback")
                            fallback["rect"] = False
                            fallback["label"] = label(fallback)
                            fallback["twin_label"] = twin["label"]
                            group.append(fallback)
                        if kernel.get("rect") and kind != "conv_dx":  # dx reads dy, a plain box, at any stride
                            strided = dict(kernel, phased=True, proof="strided")
                            strided["label"] = label(strided)
                            group.append(strided)
                        if kernel.get("rect") and kind == "conv_wgrad":  # small batches: rectangles of pixels
                            for phased in (False, True):
                                rects = dict(kernel, rectangles=True, phased=phased, proof="rectangles")
                                rects["label"] = label(rects)
                                group.append(rects)
                    for job in group:
                        job["dump"] = dump
                    jobs += group
    return jobs


# ------------------------------------------------------------------ compiling
def twin_fn(job: dict):
    from sparsekern.check import twin_kernels

    return getattr(twin_kernels, TWINS[base_kind(job["kind"])].fn_name)


def twin_descriptors(job: dict) -> tuple[bool, bool, bool]:
    """Which of the twin's A, B, C are descriptors: those whose kernel argument is one in the same launch."""
    from sparsekern.check.compile import job_descriptors
    from sparsekern.check.specs import job_kernel

    descs = job_descriptors(job)
    return tuple(arg in descs for arg in job_kernel(job)[1].operands)


def compile_twin(job: dict):
    """Compile a twin job; returns (compiled, which of A, B, C are descriptors)."""
    from sparsekern.check.compile import compile_source, desc_type, tile_value

    twin = TWINS[base_kind(job["kind"])]
    fn = twin_fn(job)
    elem = PRECISIONS[job["dtype"]].ptr_type
    tma = twin_descriptors(job)
    names = list(fn.arg_names)
    consts = {flag: on for flag, on in zip(twin.flags, tma, strict=True)}
    consts.update({k: job["kwargs"][k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")})
    consts[twin.code_path] = job["kwargs"].get(twin.code_path, False if twin.code_path == "SWAP_AB" else 1)
    signature, divisible = {}, []
    for i, name in enumerate(names):
        if name in consts:
            signature[name] = "constexpr"
        elif i < 3 and tma[i]:
            signature[name] = desc_type(elem, tuple(tile_value(t, job["kwargs"]) for t in twin.tiles[i]))
        else:
            signature[name] = "*" + elem if i < 3 else "i32"
            divisible.append(name)
    compiled, _ = compile_source(fn, signature, consts, divisible, job["cap"], job["num_warps"], job["num_stages"])
    return compiled, tma


def operand_tiles(job: dict) -> list[tuple[int, ...]]:
    """Block shapes of the A and B tiles, for matching shared buffers: (rows, cols) for the twins and the
    2-D kernels, the descriptor boxes for the descriptor conv kernels (``TN, TH, 1, TW, BLOCK_K``...)."""
    from sparsekern.check.compile import tile_value
    from sparsekern.check.specs import job_kernel, job_tiles

    tiles = job_tiles(job)
    if job.get("rect") and not job.get("twin"):
        spec = job_kernel(job)[1]
        boxes = {d.arg: d.block for d in spec.descriptors}
        return [tuple(tile_value(t, tiles) for t in boxes[arg]) for arg in spec.operands[:2]]
    twin = TWINS[base_kind(job["kind"])]
    return [tuple(tile_value(t, tiles) for t in tile) for tile in twin.tiles[:2]]


# ------------------------------------------------------------------ one job
def analyse_one(job: dict) -> dict:
    """Compile one proof job (kernel or twin) and read its MMA loop; never raises."""
    import warnings

    from sparsekern.check.compile import compile_job, inspect_binary, wgmma_serialized
    from sparsekern.check.loops import TTGIR_ELEM, operand_buffers, sass_mma_loop, ttgir_mma_loop

    warnings.filterwarnings("ignore", message=".*FP_FUSION.*")
    row = describe(job)
    start = time.perf_counter()
    try:
        if job.get("twin"):
            compiled, tma = compile_twin(job)
        else:
            compiled, _ = compile_job(job)
            tma = twin_descriptors(job)
        row["tma"] = "".join("T" if t else "p" for t in tma)
        info, sass = inspect_binary(compiled, ARCHS[job["cap"]])
        ttgir = compiled.asm["ttgir"]
        tloop, sloop = ttgir_mma_loop(ttgir), sass_mma_loop(sass)
        row.update(info)
        row.update(
            shared=int(compiled.metadata.shared),
            ttgir_loop=tloop,
            sass_loop=sloop,
            bufs=operand_buffers(ttgir, operand_tiles(job), TTGIR_ELEM[job["dtype"]], tloop),
            serialized=wgmma_serialized(info["ptxas_warnings"]),
        )
        if job.get("dump"):
            write_dump(Path(job["dump"]), job, ttgir, sass)
        row["status"] = "ok"
    except Exception as exc:  # a compile or tool failure is a finding, reported in the table
        row.update(status="ERROR", problems=[error_text(exc)])
    row["seconds"] = time.perf_counter() - start
    return row


def error_text(exc: Exception, limit: int = 300) -> str:
    """One line for a failed compile: a CompilationError's own message is at its end, after the source."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: " + (text if len(text) <= limit else "..." + text[-limit:])


def describe(job: dict) -> dict:
    return {
        "kernel": TWINS[base_kind(job["kind"])].fn_name if job.get("twin") else job_fn_name(job),
        **{k: job[k] for k in ("label", "proof", "kind", "has_mixed", "dtype", "kwargs", "num_warps", "num_stages")},
        "twin_label": job.get("twin_label"),
        "arch": f"sm_{job['cap']}",
        "block": f"{job['bm']}x{job['bk']}",
        "use_tma": job.get("use_tma", False),
        "problems": [],
    }


def write_dump(root: Path, job: dict, ttgir: str, sass: str) -> None:
    """``root/<label>-<arch>/``: kernel.ttgir, kernel.sass and meta.json."""
    d = root / f"{job['label']}-sm_{job['cap']}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "kernel.ttgir").write_text(ttgir)
    (d / "kernel.sass").write_text(sass)
    meta = {
        "kind": job["kind"],
        "role": job["proof"],
        "kernel": TWINS[base_kind(job["kind"])].fn_name if job.get("twin") else job_fn_name(job),
        "has_mixed": job["has_mixed"],
        "block": [job["bm"], job["bk"]],
        "dtype": job["dtype"],
        "config": {"kwargs": job["kwargs"], "num_warps": job["num_warps"], "num_stages": job["num_stages"]},
        "use_tma": job.get("use_tma", False),
        "arch": f"sm_{job['cap']}",
        "twin": job.get("twin_label"),
    }
    (d / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


# ------------------------------------------------------------------ the gates
def _loop_problems(row: dict) -> list[str]:
    """Buffers and waits: the gates that need no twin (sm_80 gets only these)."""
    problems = []
    need = row["num_stages"] - 1
    if min(row["bufs"]) < need:
        problems.append(f"shared buffers {row['bufs']} < num_stages-1 = {need}")
    tloop, sloop = row.get("ttgir_loop"), row.get("sass_loop")
    if tloop is None or sloop is None:
        problems.append("no MMA loop found in the " + ("TTGIR" if tloop is None else "SASS"))
        return problems
    if 0 in tloop["async_wait"] or 0 in sloop["cp_wait"]:
        problems.append("wait-all in the MMA loop")
    return problems


def judge_proof(row: dict, twin: dict | None) -> list[str]:
    """The proof's problems for a kernel row (``twin``: its twin's row, None on sm_80)."""
    if row["status"] == "ERROR":
        return row["problems"]
    problems = _loop_problems(row)
    if row["arch"] == "sm_80" or row.get("sass_loop") is None:
        return problems
    if row["ttgir_loop"]["index_copies"]:
        problems.append(f"{row['ttgir_loop']['index_copies']} index copies in the MMA loop")
    if row["serialized"]:
        problems.append("wgmma serialized (C7515)")
    if row["spill_stores"] or row["spill_loads"]:
        problems.append(f"spills {row['spill_stores']}/{row['spill_loads']} B")
    if twin is None or twin["status"] == "ERROR" or twin.get("sass_loop") is None:
        problems.append("no twin to compare with")
        return problems
    if row["sass_loop"]["hgmma"] != twin["sass_loop"]["hgmma"]:
        problems.append(f"HGMMA {row['sass_loop']['hgmma']} vs twin {twin['sass_loop']['hgmma']}")
    limit = twin["sass_loop"]["non_mma"] + NON_MMA_SLACK
    if row["sass_loop"]["non_mma"] > limit:
        problems.append(f"{row['sass_loop']['non_mma']} non-MMA instr/iter > twin + {NON_MMA_SLACK} = {limit}")
    return problems


def judge_all(rows: list[dict]) -> list[dict]:
    """Set ``status`` and ``problems`` of every proof row: kernels are gated, mixed variants and twins reported."""
    twins = {r["label"]: r for r in rows if r["proof"] == "twin"}
    for r in rows:
        if r["status"] == "ERROR":
            continue
        if r["proof"] == "kernel":
            r["problems"] = judge_proof(r, twins.get(r["twin_label"]))
            r["status"] = "FAIL" if r["problems"] else "ok"
        else:  # reported, not gated: the problems are listed as notes
            gated_like = r["proof"] in ("mixed", "fallback", "strided", "rectangles")
            notes = judge_proof(r, twins.get(r["twin_label"])) if gated_like else _loop_problems(r)
            r["notes"] = notes
            r["status"] = "info"
    return rows
