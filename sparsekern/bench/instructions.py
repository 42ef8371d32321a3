"""Instructions per training step, counted by callgrind: a noise-free second signal beside the timings.

``python -m sparsekern.bench.instructions`` runs one process under
``valgrind --tool=callgrind`` (one thread). Every provider takes one warm-up step, then one step
inside ``sk_region`` (``kernels/native/region.cpp``), a C function that zeroes callgrind's counters,
calls back into Python and has callgrind write a profile (client requests from
``valgrind/callgrind.h``), so each step's count is its own and torch's start-up counts for nothing. The
counts repeat to within a fraction of a percent, even with the other core loaded, so a regression in
the kernels or in the Python around them shows here when the timings are too noisy to tell.

Timings stay the headline: instruction counts ignore cache misses, vector width and threads.
The cases are small so that the run under valgrind takes minutes, not hours:

* linear ``512 -> 512``, 256 tokens, 64x64 blocks, density 0.1 and 0.5;
* conv ``3x3 64 -> 64`` at 8x8, batch 4, 32x32 blocks, density 0.1 and 0.5;

each against its dense ``nn`` layer. Needs ``valgrind`` on ``PATH`` and the native kernels built.

On x86-64 the kernels are built for the count with ``-mno-avx512f`` (``SPARSEKERN_NATIVE_CFLAGS``):
valgrind (3.19 here) cannot decode AVX-512 and kills the process with SIGILL, while MKL and oneDNN
pick their code by CPUID, which valgrind reports without AVX-512. So the counts are of AVX2 code on
every x86 machine, comparable across AVX2 and AVX-512 ones.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

CASES = ("linear dense", "linear d=0.1", "linear d=0.5", "conv dense", "conv d=0.1", "conv d=0.5")


def _providers():
    """``{name: step()}`` for :data:`CASES`, built on fixed seeds."""
    import torch
    from torch import nn

    from sparsekern.bench.conv import block_mask
    from sparsekern.bench.cpu_passes import step_fn
    from sparsekern.nn import SparseConv2d, SparseLinear

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(512, 512)
    x_lin, dy_lin = torch.randn(256, 512, requires_grad=True), torch.randn(256, 512)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    x_conv, dy_conv = torch.randn(4, 64, 8, 8, requires_grad=True), torch.randn(4, 64, 8, 8)

    def lin_mask(d):
        keep = torch.rand(8, 8, generator=gen) < d
        return keep.repeat_interleave(64, 0).repeat_interleave(64, 1)

    return {
        "linear dense": step_fn(lin, x_lin, dy_lin),
        "linear d=0.1": step_fn(SparseLinear.from_dense(lin, mask=lin_mask(0.1), block_size=64), x_lin, dy_lin),
        "linear d=0.5": step_fn(SparseLinear.from_dense(lin, mask=lin_mask(0.5), block_size=64), x_lin, dy_lin),
        "conv dense": step_fn(conv, x_conv, dy_conv),
        "conv d=0.1": step_fn(
            SparseConv2d.from_dense(conv, mask=block_mask((64, 64, 3, 3), 32, 0.1, gen), block_size=32), x_conv, dy_conv
        ),
        "conv d=0.5": step_fn(
            SparseConv2d.from_dense(conv, mask=block_mask((64, 64, 3, 3), 32, 0.5, gen), block_size=32), x_conv, dy_conv
        ),
    }


def child() -> None:
    """Inside valgrind: one warm-up step per provider, then one step in ``sk_region`` each, in CASES order."""
    import torch

    from sparsekern.kernels import native

    torch.set_num_threads(1)
    lib = native.lib()
    if lib is None:
        raise SystemExit("sparsekern.bench.instructions: the native kernels are unavailable")
    if not lib.sk_region_counts():
        raise SystemExit("sparsekern.bench.instructions: the native build had no valgrind/callgrind.h")
    callback = ctypes.CFUNCTYPE(None)
    for name, step in _providers().items():
        step()  # warm-up: first-call allocations and caches stay out of the count
        lib.sk_region(callback(step))
        print(f"counted: {name}", file=sys.stderr, flush=True)


def _total(path: str) -> int:
    """The instruction count (``Ir``) a callgrind dump records."""
    with open(path) as f:
        for line in f:
            m = re.match(r"(?:summary|totals):\s+(\d+)", line)
            if m:
                return int(m.group(1))
    raise ValueError(f"no totals in {path}")


def count() -> dict[str, int]:
    """``{case: instructions}`` of one step each, from one callgrind run."""
    if shutil.which("valgrind") is None:
        raise SystemExit("sparsekern.bench.instructions: valgrind is not on PATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if platform.machine() in ("x86_64", "AMD64"):
        env["SPARSEKERN_NATIVE_CFLAGS"] = f"{env.get('SPARSEKERN_NATIVE_CFLAGS', '')} -mno-avx512f".strip()
    # Build (or find) that library outside valgrind, in a process of its own (this one may hold the
    # native build already): under valgrind the compiler would take minutes.
    build = "from sparsekern.kernels import native; raise SystemExit(native.lib() is None)"
    if subprocess.run([sys.executable, "-c", build], env=env).returncode:
        raise SystemExit("sparsekern.bench.instructions: the native kernels are unavailable")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        cmd = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            sys.executable, "-m", "sparsekern.bench.instructions", "--child",
        ]  # fmt: skip
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        # Dumps are cg.out.1, cg.out.2, ... in request order (the final cg.out holds what came after).
        dumps = sorted(glob.glob(out + ".*"), key=lambda p: int(p.rsplit(".", 1)[1]))
        counts = [_total(p) for p in dumps]
    if len(counts) < len(CASES):
        raise RuntimeError(f"callgrind wrote {len(counts)} dumps for {len(CASES)} cases")
    return dict(zip(CASES, counts[: len(CASES)], strict=True))


def table(counts: dict[str, int]) -> str:
    lines = ["| case | instructions per step | vs dense |", "|---|---:|---:|"]
    for name, n in counts.items():
        dense = counts[name.split()[0] + " dense"]
        lines.append(f"| {name} | {n:,} | {dense / n:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the counts to this file")
    args = ap.parse_args(argv)
    if args.child:
        child()
        return 0
    counts = count()
    print(table(counts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(counts, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
