"""Offline static check and dense-twin proof of the block-sparse Triton kernels (``python -m sparsekern.check``).

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

It then runs the *dense-twin proof* (``twins.py``): for each kernel (linear and conv forward, input
gradient, weight gradient), block 32/64/128 and bf16/fp16 default config, it compiles for sm_90 a dense
Triton GEMM with the same tile, warps, stages and per-operand load mechanism (TMA descriptor or
pointers) and compares the innermost MMA loops side by side: shared buffers per operand, async-wait
depth, one-element index copies, HGMMA shapes, UTMALDG/LDGSTS, wgmma wait depth and serialization
(ptxas C7515), non-MMA instructions per iteration, registers and spills. The gates are listed in
``twins.py``; on sm_80 only buffers and waits are judged. ``HAS_MIXED=True`` variants are reported,
not gated.

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
contains ``TEXT`` (``--only bsconv``: the conv kernels). ``--quick`` limits the proof to the three linear
kernels, 64x64 blocks, bf16. ``--twins`` runs only the proof, ``--no-twins`` only the static check;
``--dump DIR`` writes ``DIR/<label>-<arch>/`` (``kernel.ttgir``, ``kernel.sass``, ``meta.json``) for every
proof compile, twins included; ``--json``/``--proof-json PATH`` write the rows.

Kernels that take a ``USE_TMA`` argument (the issue-10 redesign) are compiled with ``USE_TMA=True``
on sm_90 and their descriptor arguments typed ``tensordesc<bf16[R, C]>`` (``specs.TMA_SPECS``);
older kernels are compiled from ``specs.SPECS``. A renamed argument fails the compile loudly.

Two Triton versions: the default venv carries the newest Triton (3.9); the GPU machines run 3.6, whose
ptxas serializes some wgmma kernels that 3.9's does not. One process holds one Triton, so the 3.6 pass
runs from a second venv: ``make check`` makes ``.venv36`` (torch 2.13.0 CPU, ``triton==3.6.0``, this
checkout with ``--no-deps -e``) and runs ``--twins`` under both. By hand::

    python -m venv .venv36 && .venv36/bin/pip install torch==2.13.0 triton==3.6.0 numpy
    .venv36/bin/pip install --no-deps -e . && .venv36/bin/python -m sparsekern.check --twins

(Both versions take ``ASTSource(fn, signature, constexprs, attrs)`` keyed by argument index, and the
``tensordesc<...>`` signature strings.)

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

from sparsekern.check.cli import (
    HEADER,
    failures,
    format_proof,
    format_table,
    main,
    run_all,
    run_check,
    run_proof,
)
from sparsekern.check.compile import (
    compile_job,
    count_tensor_core_ops,
    parse_ptxas,
    ptxas_perf_warnings,
    wgmma_serialized,
)
from sparsekern.check.loops import operand_buffers, parse_sass, sass_loops, sass_mma_loop, ttgir_mma_loop
from sparsekern.check.specs import (
    ARCHS,
    BLOCKS,
    CONV_BLOCKS,
    INTERPRET_VARS,
    PRECISIONS,
    SPECS,
    TMA_SPECS,
    VARIANTS,
    Arch,
    KernelSpec,
    Precision,
    build_jobs,
)
from sparsekern.check.static import check_one, judge, occupancy
from sparsekern.check.twins import build_proof_jobs, judge_proof

__all__ = [
    "ARCHS", "BLOCKS", "CONV_BLOCKS", "HEADER", "INTERPRET_VARS", "PRECISIONS", "SPECS", "TMA_SPECS", "VARIANTS",
    "Arch", "KernelSpec", "Precision", "build_jobs", "build_proof_jobs", "check_one", "count_tensor_core_ops",
    "failures", "format_proof", "format_table", "judge", "judge_proof", "main", "occupancy", "operand_buffers",
    "parse_ptxas", "parse_sass", "ptxas_perf_warnings", "run_all", "run_check", "run_proof", "sass_loops",
    "sass_mma_loop", "ttgir_mma_loop", "wgmma_serialized", "compile_job",
]  # fmt: skip
