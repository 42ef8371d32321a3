"""Where a CPU training step's time goes: each native kernel pass, the whole step, and dense beside them.

``python -m sparsekern.bench.cpu_passes [--layer linear|conv] [--density D] [--block B] [--threads T]
[--case NAME]``

Times CPU time (``time.process_time``, all threads), not wall time: on a shared 2-core machine the
other core's load moves wall times by 10-30% between minutes, while the CPU time a computation
takes moves far less. With ``--threads 1`` (the default) this is the kernels' own efficiency;
OpenMP spin-waiting inflates CPU time with more threads. The suites' wall-clock steps (``python -m
sparsekern.bench --suite linear|conv``) stay the headline.

Rows, best of ``--repeats`` after one warm-up:

* ``forward`` / ``input grad`` / ``weight grad``: the native kernels alone on the layer's layout
  (packing included), with their GFLOP/s over the computed blocks;
* ``dense``: the matching dense op (``x @ W.T`` for linear, ``F.conv2d`` and
  ``convolution_backward`` for conv);
* ``step``: ``SparseLinear``/``SparseConv2d`` forward + backward through autograd against the dense
  ``nn`` layer's, so ``step - sum of passes`` is what the Python layer, bias, effective-weight
  gather and fresh outputs cost.

Layers: linear 4096x4096 with 2048 tokens; conv at batch 32, by default 3x3 256->256 at 14x14 (the
CPU engine's target cases), or any layer of the conv suite with ``--case`` (``"1x1 1024->256 @14"``).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn


def _cpu_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best * 1e3


def step_fn(module, x, dy):
    """A no-argument training step of ``module``: forward on ``x``, backward of ``dy``, gradients reset first."""

    def run():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(dy)

    return run


def _linear(density: float, block: int, repeats: int):
    from sparsekern.kernels import native
    from sparsekern.kernels.meta import Meta
    from sparsekern.nn import SparseLinear

    n, m = 4096, 2048
    base = nn.Linear(n, n)
    x, dy = torch.randn(m, n, requires_grad=True), torch.randn(m, n)
    keep = torch.rand(n // block, n // block) < density
    layer = SparseLinear.from_dense(base, mask=keep.repeat_interleave(block, 0).repeat_interleave(block, 1),
                                    block_size=block)  # fmt: skip
    lay = layer.layout
    g = Meta(*lay.meta())
    vals = torch.randn(lay.nnz_blocks, block, block)  # values do not change the time
    t_rows, t_cols = g.row_indices[g.train_index.long()].contiguous(), g.col_indices[g.train_index.long()].contiguous()
    xd = x.detach()
    flops = 2 * m * block * block * lay.nnz_blocks
    w = base.weight.detach()
    passes = {
        "forward": (
            lambda: native.group_mm(xd, vals, g.row_offsets, g.col_indices, None, None, n, transposed=True),
            flops,
        ),
        "input grad": (
            lambda: native.group_mm(dy, vals, g.col_offsets, g.row_indices_t, g.block_index_t, None, n),
            flops,
        ),
        "weight grad": (lambda: native.sampled_mm(dy, xd, t_rows, t_cols, block, block), flops),
        "dense (one GEMM)": (lambda: xd @ w.t(), 2 * m * n * n),
    }
    return passes, step_fn(layer, x, dy), step_fn(base, x, dy), 3 * 2 * m * n * n


def _conv(density: float, block: int, repeats: int, case: str = "3x3 256->256 @14"):
    from sparsekern import convview
    from sparsekern.bench.conv import RESNET50, block_mask
    from sparsekern.kernels import native
    from sparsekern.kernels.meta import Meta
    from sparsekern.nn import SparseConv2d

    c = {c.name: c for c in RESNET50}[case]
    base = nn.Conv2d(c.c_in, c.c_out, c.kernel, c.stride, c.padding)
    x = torch.randn(32, c.c_in, c.size, c.size, requires_grad=True)
    dy = torch.randn_like(base(x)).detach()
    layer = SparseConv2d.from_dense(base, mask=block_mask(tuple(base.weight.shape), block, density, torch.Generator()),
                                    block_size=block)  # fmt: skip
    lay = layer.layout
    g = Meta(*lay.meta())
    geom = list(convview.conv_geometry(x.shape, base.weight.shape, c.stride, c.padding, 1, block))
    vals = torch.randn(lay.nnz_blocks, block, block)  # values do not change the time
    tidx = g.train_index.long()
    t_rows, t_cols = g.row_indices[tidx].contiguous(), g.col_indices[tidx].contiguous()
    xd = x.detach()
    y = torch.empty_like(dy, memory_format=torch.channels_last)
    dx = torch.empty_like(xd, memory_format=torch.channels_last)
    dw = torch.empty(tidx.numel(), block, block)
    tokens = dy.shape[0] * dy.shape[2] * dy.shape[3]
    flops = 2 * tokens * block * block * lay.nnz_blocks
    dense_flops = 2 * tokens * base.weight.numel()
    w = base.weight.detach()
    st, pad = [c.stride] * 2, [c.padding] * 2

    def bwd(want_dx, want_dw):
        native.conv_backward(
            dy, xd, geom, vals, g.col_offsets, g.row_indices_t, g.block_index_t, dx if want_dx else None,
            t_rows if want_dw else None, t_cols if want_dw else None, dw if want_dw else None,
        )  # fmt: skip

    def dense_bwd(mask):
        torch.ops.aten.convolution_backward(dy, xd, w, None, st, pad, [1, 1], False, [0, 0], 1, mask)

    passes = {
        "forward": (lambda: native.conv_forward(xd, geom, vals, g.row_offsets, g.col_indices, None, y), flops),
        "input grad": (lambda: bwd(True, False), flops),
        "weight grad": (lambda: bwd(False, True), flops),
        "dense forward": (lambda: F.conv2d(xd, w, None, c.stride, c.padding), dense_flops),
        "dense input grad": (lambda: dense_bwd([True, False, False]), dense_flops),
        "dense weight grad": (lambda: dense_bwd([False, True, False]), dense_flops),
    }
    return passes, step_fn(layer, x, dy), step_fn(base, x, dy), 3 * dense_flops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer", choices=("linear", "conv"), default="linear")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--block", type=int, default=None, help="block side (default: 64 linear, 32 conv)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--case", default="3x3 256->256 @14", help="conv layer: a case name of the conv suite")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    block = args.block or (64 if args.layer == "linear" else 32)
    if args.layer == "linear":
        passes, sparse_step, dense_step, step_flops = _linear(args.density, block, args.repeats)
    else:
        passes, sparse_step, dense_step, step_flops = _conv(args.density, block, args.repeats, args.case)
    what = args.layer if args.layer == "linear" else f"conv {args.case}"
    print(f"{what}, block {block}, density {args.density}, {args.threads} thread(s), CPU ms (best of "
          f"{args.repeats}):")  # fmt: skip
    total = 0.0
    for name, (fn, flops) in passes.items():
        ms = _cpu_ms(fn, args.repeats)
        if not name.startswith("dense"):
            total += ms
        print(f"  {name:<18} {ms:8.1f} ms  {flops / ms / 1e6:6.1f} GFLOP/s")
    s, d = _cpu_ms(sparse_step, args.repeats), _cpu_ms(dense_step, args.repeats)
    print(f"  {'sum of passes':<18} {total:8.1f} ms")
    print(f"  {'sparse step':<18} {s:8.1f} ms  (overhead beyond the passes: {s - total:.1f} ms)")
    print(f"  {'dense step':<18} {d:8.1f} ms  {step_flops / d / 1e6:6.1f} GFLOP/s")
    print(f"  step speedup {d / s:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
