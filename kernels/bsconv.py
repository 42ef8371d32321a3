"""Block-sparse 2-D convolution as an implicit GEMM, with a three-state block-sparse weight.

Why one file of this size: it is one operation family (STYLE.md 2), the three implicit-GEMM
kernels (forward, input gradient, weight gradient) and their launchers, which must agree on the
same channel order and store layout: about 120 lines are this docstring, 420 the kernels and 250
their launchers (which also send a launch to the linear or the sm_90 descriptor kernels).
The host-side tables the kernels index are in ``bsconv_tables.py`` (re-exported here), shared
tile code in ``tiles.py``, operand checks in ``launch.py``, token splits in ``splits.py``,
configs in ``configs.py``, the choice of kernels in ``conv_routes.py``, the sm_90 descriptor
kernels in ``bsconv_tma.py``.

Import path: ``sparsekern.kernels.bsconv`` (this folder, ``kernels/``, installs as ``sparsekern.kernels``).

The weight is the matrix view of ``sparsekern/convview.py``: ``(Cout, Cin, kh, kw)``
becomes ``(Cout, kh*kw*c_pad)`` with ``K`` ordered ``(kh, kw, Cin)`` and ``Cin``
padded to ``c_pad`` (a multiple of ``bk``) inside each tap, so block column ``c``
is tap ``t = c // CPB`` (``CPB = c_pad // bk`` channel blocks per tap),
``(r, s) = divmod(t, kw)``, input channels ``(c % CPB)*bk + [0, bk)``. Its values
live in the joined store ``[w_train | w_frozen]`` (``kernels/store.py``) and
``Meta``/``n_frozen`` are exactly those of ``kernels/bsmm.py``: block ``p`` is
``store[storage[p]]``, mixed blocks merge with their fixed slot at
``fixed_base + aux`` (``fixed_base = n_train + n_frozen``).

Shapes and conventions:

* ``x``: ``(N, Cin, H, W)``; ``dy``/``y``: ``(N, Cout, Ho, Wo)``; ``dx``:
  ``(N, Cin, H, W)``. Any strides: the kernels take all four, so NCHW and
  channels_last both run without a copy. channels_last (channels contiguous) is
  the native case: a tile's channel slice is one contiguous run per pixel, which
  the gathers load 16 bytes at a time (cp.async). Outputs the launchers allocate
  are channels_last.
* A *token* is an output pixel ``m = (n*Ho + ho)*Wo + wo`` (``M = N*Ho*Wo``); the
  input pixel of token ``m`` at tap ``(r, s)`` is
  ``(ho*stride_h - pad_h + r*dil_h, wo*stride_w - pad_w + s*dil_w)``.
  ``pad_h``/``pad_w`` are the top/left paddings; bottom/right are implied by
  ``Ho``/``Wo`` (asymmetric ``'same'`` padding works).
* ``geom`` is a :class:`~sparsekern.kernels.meta.ConvGeom`
  (``sparsekern.convview.conv_geometry``).

=================  ==========================================  =========================================
pass               product                                     traversal (one loop per program)
=================  ==========================================  =========================================
forward            ``Y = im2col(X) @ W.T (+ b)``               computed blocks of each block row (CSR),
                                                               with per-block tap offsets
input gradient     ``dX = col2im(dY @ W)``, as a transposed    one *line* per (stride phase, input-
                   conv: ``dx[p] += dy[q] @ W_t`` for the      channel block): the blocks of every
                   output pixel ``q`` that reads ``p`` at tap  column ``(tap, cb)`` whose tap hits the
                   ``t``                                       phase, flattened into one list
weight gradient    ``dW_b = dY_r.T @ im2col(X)_c``             runs of up to ``GROUP`` trainable blocks
                                                               of a block row, sharing ``dy``
=================  ==========================================  =========================================

``im2col(X)`` is never built: each ``(tokens x channels)`` tile is gathered
straight from ``x`` with masked loads (zero outside the image and for
channels ``>= Cin``). The input gradient is a gather too, never a scatter: a
program owns a tile of input pixels of one stride phase (pixels with the same
``(h + pad_h) % stride_h`` and ``(w + pad_w) % stride_w``) and a channel slice,
and reads, for each block of its line, the ``dy`` pixel the block's tap maps
them to. Each ``dx`` element is written once, so no atomics and no zero-fill.

Main loops, and why (the pattern of ``kernels/bsmm.py``, ``kernels/tiles.py``):

* Every per-block quantity is loaded one iteration ahead into loop-carried
  scalars, two packed 8-byte ``(low, high)`` int32 pairs and the aux
  (``tiles._prefetch_packed``), so no load of an
  iteration feeds another load's address in that iteration and the pipeliner
  keeps ``num_stages`` tiles in flight: the activation gather on cp.async, the
  weight tile through TMA on sm_90 (``launch.use_tma`` over the store, decided
  per launch) or cp.async elsewhere.
* No integer division by a runtime value in a loop: the launchers compute, per
  launch with vectorised torch, small int32 per-block arrays. Forward, per CSR
  position: the tap's row/column offsets ``r*dil_h``, ``s*dil_w`` and the
  channel block ``c % CPB`` (``forward_taps``). Input gradient, per entry of a
  line: block row, slot, aux and the output-pixel offsets ``oh = (h_first +
  pad_h - r*dil_h) / stride_h`` (``ow`` likewise), exact because a tap hits
  exactly one stride phase per dimension, so that ``ho = hq + oh``, ``wo = wq +
  ow`` (``input_grad_lines``). One indirection everywhere.
* One loop per program: the input gradient used to run a tap loop around a
  block loop, and with ~one block per tap the pipeliner (innermost loops only)
  never filled. A line holds every block of its (phase, channel block), so
  every block of column ``t*CPB + cb`` belongs to exactly one line.

Load balance: forward programs visit block rows longest first
(``row_order``), input-gradient programs lines longest first (per launch);
lines no tap reaches still run (empty) and write zeros. The weight gradient
splits the token reduction when there are too few trainable blocks to fill
the GPU (``splits.wgrad_splits``) and skips frozen blocks (one program per
trainable block); its token loop has no index load at all.

Precision, configs (``configs.pick_config`` with kinds ``conv_fwd``/``conv_dx``/
``conv_wgrad``, sharing their matmul twin's candidates and defaults but tuned
under their own keys), the interpreter's bf16 upcast and the builtins-only rule
are those of ``kernels/bsmm.py``.

Known limits:

* Input-gradient programs of a stride phase cover ``cdiv(H, stride_h)`` rows
  (``W`` likewise); when ``stride_h`` does not divide ``H`` some phases have a
  masked last row. Pixels no tap reaches (``stride > dilation*(k-1)+1``) are
  still visited and written as zeros.
* These kernels gather activations with pointers (the weight tile goes
  through TMA on sm_90). On sm_90 the launchers run the descriptor kernels
  of ``bsconv_tma.py`` instead whenever the activations allow it (channels
  contiguous, 16-byte pixels; strided convs also need ``H``, ``W`` multiples
  of the stride): there a program's tokens are a rectangle of pixels (in
  the weight gradient of a large batch, one pixel of many images) and TMA's
  zero fill does the image bounds, so no per-row mask is left in the loop.
  Otherwise a warning names the reason once and these kernels run.
  Pointwise convs (1x1, stride 1, no padding) with channels_last operands
  run on the linear kernels of ``bsmm.py`` instead, on every device: their
  pixels are the tokens of a matmul (``conv_routes.py``).
* The per-launch arrays cost a few small torch ops per call (no host sync).
* The weight gradient decodes its tokens ``(n, ho, wo)`` per token step (two
  divisions by runtime sizes per token of the tile); the forward and input
  gradient do it once per program.
* Groups (depthwise/grouped conv), 1-D/3-D convs and padding modes other than
  zeros are not supported.
* Offsets into activations are int64; block indices and the token count
  ``N*Ho*Wo`` (and ``N*H*W``) are int32, as are the per-tap pixel coordinates.
* NCHW inputs read a channel slice with a stride of ``H*W`` elements (one
  element per load, not pipelined by cp.async); use channels_last for speed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import bsconv_tma, bsmm
from . import configs as cfgs
from .bsconv_tables import channel_order, forward_taps, input_grad_lines
from .conv_routes import matmul_views, rect_path
from .launch import check, check_bias, check_dtype, check_values, kernel_constexprs, use_tma, weight_operand
from .meta import ConvGeom, Meta
from .splits import launch_split
from .store import store_matrix, value_store
from .tiles import (
    _add_bias,
    _line_program,
    _mma,
    _mma_weight,
    _prefetch_packed,
    _prefetch_packed_next,
    _weight_tile,
    _wgrad_run,
    _wgrad_store,
)

__all__ = [
    "ConvGeom",
    "Meta",
    "bsconv_forward",
    "bsconv_input_grad",
    "bsconv_weight_grad",
    "channel_order",
    "forward_taps",
    "input_grad_lines",
]

INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------- helpers
@triton.jit
def _pixel_coords(offs, H, W):
    """``(n, h, w)`` of flat pixel indices ``offs = (n*H + h)*W + w``."""
    rest = offs // W
    return rest // H, rest % H, offs % W


# --------------------------------------------------------------------- kernels
@triton.jit
def _bsconv_fwd_kernel(
    # pointers (w: a tensor descriptor when USE_TMA)
    x_ptr,
    w_ptr,
    es_ptr,
    bias_ptr,
    y_ptr,
    # layout (CSR order) and the per-launch packed pairs of forward_taps
    row_offsets_ptr,
    chan_slot_ptr,
    aux_ptr,
    tap_ptr,
    row_order_ptr,
    # shapes
    M,
    C_in,
    H,
    W,
    C_out,
    H_out,
    W_out,
    fixed_base,
    conv_stride_h,
    conv_stride_w,
    pad_h,
    pad_w,
    # strides
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_yn,
    stride_yc,
    stride_yh,
    stride_yw,
    # meta-parameters
    BM: tl.constexpr,
    BK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MIXED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """``y[n, r*BM + j, ho, wo] = sum_blocks x[n, ch, hi, wi] * W_rc[j, k] (+ bias)``.

    CSR position ``p`` (block ``(r, c)``) reads channels ``ch = cb*BK + k`` at
    ``hi = ho*conv_stride_h - pad_h + dh`` (``wi`` likewise), with ``(cb,
    slot) = chan_slot[p]`` and ``(dh, dw) = tap[p]`` packed int64 pairs from
    :func:`forward_taps`; out-of-image pixels and ``ch >= C_in`` read 0. Tokens ``m = (n*H_out + ho)*W_out + wo``.

    Grid: ``cdiv(M, BLOCK_M) * RB * (BM // BLOCK_N)``, as ``_bsmm_fwd_kernel``.
    With ``USE_TMA`` ``w_ptr`` is a descriptor over the store as ``(n_slots *
    BM, BK)`` with blocks ``[BLOCK_N, BLOCK_K]``; ``x`` and ``y`` are pointers.
    """
    tl.static_assert(BM % BLOCK_N == 0, "BLOCK_N must divide the block's rows")
    tl.static_assert(BK % BLOCK_K == 0, "BLOCK_K must divide the block's columns")
    SUB_N: tl.constexpr = BM // BLOCK_N
    SUB_K: tl.constexpr = BK // BLOCK_K
    LOG_SUB_K: tl.constexpr = (SUB_K >= 2) + (SUB_K >= 4) + (SUB_K >= 8)
    pid_m, sub_n, r, start, end = _line_program(row_order_ptr, row_offsets_ptr, M, BLOCK_M, SUB_N)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_bk = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    img, ho, wo = _pixel_coords(offs_m, H_out, W_out)
    # A token past M gets a row no tap brings into the image: the bounds test below masks it too.
    h0 = tl.where(mask_m, ho * conv_stride_h - pad_h, -(1 << 30))
    w0 = wo * conv_stride_w - pad_w
    # The token's pixel at tap (0, 0): a tap adds scalar offsets to it.
    x_tok = x_ptr + img.to(tl.int64) * stride_xn + h0.to(tl.int64) * stride_xh + w0.to(tl.int64) * stride_xw
    if SWAP_AB:  # tokens on the MMA's wide side, as in _bsmm_fwd_kernel
        acc = tl.full((BLOCK_N, BLOCK_M), 0.0, dtype=tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    cb, s, a = _prefetch_packed(chan_slot_ptr, aux_ptr, start, end, HAS_MIXED)
    dh, dw, _ = _prefetch_packed(tap_ptr, aux_ptr, start, end, False)
    for it in range(start * SUB_K, end * SUB_K):
        # The next iteration's block and tap, loaded now: no load below feeds an address of this iteration.
        q = (it + 1) >> LOG_SUB_K
        cb_n, s_n, a_n = _prefetch_packed_next(chan_slot_ptr, aux_ptr, q, end, HAS_MIXED)
        dh_n, dw_n, _ = _prefetch_packed_next(tap_ptr, aux_ptr, q, end, False)
        kk = (it & (SUB_K - 1)) * BLOCK_K
        # 0 <= hi < H as one unsigned compare (a negative row wraps past H).
        inside = ((h0 + dh).to(tl.uint32, bitcast=True) < H) & ((w0 + dw).to(tl.uint32, bitcast=True) < W)
        offs_c = cb * BK + kk + offs_bk  # cb * BK, not a loaded start: keeps the 16-byte alignment visible
        cols = dh.to(tl.int64) * stride_xh + dw.to(tl.int64) * stride_xw + offs_c.to(tl.int64) * stride_xc
        x = tl.load(x_tok[:, None] + cols[None, :], mask=inside[:, None] & (offs_c < C_in)[None, :], other=0.0)
        w = _weight_tile(w_ptr, es_ptr, s, a, fixed_base, sub_n * BLOCK_N, kk, BLOCK_N, BLOCK_K, BM, BK,
                         HAS_MIXED, USE_TMA)  # fmt: skip
        acc = _mma_weight(x, w, acc, True, SWAP_AB, DOT_PRECISION, UPCAST)
        cb, s, a, dh, dw = cb_n, s_n, a_n, dh_n, dw_n

    offs_n = r * BM + sub_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C_out
    acc = _add_bias(acc, bias_ptr, offs_n, mask_n, HAS_BIAS, SWAP_AB)
    y_tok = y_ptr + img.to(tl.int64) * stride_yn + ho.to(tl.int64) * stride_yh + wo.to(tl.int64) * stride_yw
    y_ptrs = y_tok[:, None] + offs_n.to(tl.int64)[None, :] * stride_yc
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _bsconv_dx_kernel(
    # pointers (w: a tensor descriptor when USE_TMA)
    dy_ptr,
    w_ptr,
    es_ptr,
    dx_ptr,
    # per-launch lines (input_grad_lines)
    line_offsets_ptr,
    line_row_slot_ptr,
    line_aux_ptr,
    line_out_ptr,
    line_order_ptr,
    # shapes
    M,
    HQ,
    WQ,
    C_in,
    H,
    W,
    C_out,
    H_out,
    W_out,
    CPB,
    fixed_base,
    conv_stride_h,
    conv_stride_w,
    pad_h,
    pad_w,
    # strides
    stride_dyn,
    stride_dyc,
    stride_dyh,
    stride_dyw,
    stride_dxn,
    stride_dxc,
    stride_dxh,
    stride_dxw,
    # meta-parameters
    BM: tl.constexpr,
    BK: tl.constexpr,
    HAS_MIXED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """``dx[n, cb*BK + k, h, w] = sum_taps sum_blocks dy[n, r*BM + j, ho, wo] * W_rc[j, k]``.

    Line ``L = (ph*conv_stride_w + pw)*CPB + cb`` holds the blocks of every
    column ``t*CPB + cb`` whose tap ``t`` hits stride phase ``(ph, pw)``; its
    programs own pixels ``h = h_first + hq*conv_stride_h`` (``h_first`` the
    phase's first row, ``hq < HQ = cdiv(H, conv_stride_h)``, rows past ``H``
    masked; ``w`` likewise), ``M = N*HQ*WQ`` of them, ``(n*HQ + hq)*WQ + wq``.
    Entry ``e`` of a line is block row ``r`` at slot ``s``, ``(r, s) =
    line_row_slot[e]``, and reads ``dy`` at ``ho = hq + oh``, ``wo = wq + ow``,
    ``(oh, ow) = line_out[e]`` (packed int64 pairs; masked outside ``[0,
    H_out) x [0, W_out)``): no division in the loop. ``BLOCK_K`` is the output slice of the block's columns,
    ``BLOCK_N`` the reduction step, as in ``_bsmm_dx_kernel``.

    Grid: ``cdiv(M, BLOCK_M) * (BK // BLOCK_K) * n_lines``, pixel tiles
    fastest, lines in ``line_order`` (longest first). With ``USE_TMA``
    ``w_ptr`` is a descriptor as in the forward; ``dy``/``dx`` are pointers.
    """
    tl.static_assert(BM % BLOCK_N == 0, "BLOCK_N must divide the block's rows")
    tl.static_assert(BK % BLOCK_K == 0, "BLOCK_K must divide the block's columns")
    SUB_N: tl.constexpr = BM // BLOCK_N
    SUB_K: tl.constexpr = BK // BLOCK_K
    LOG_SUB_N: tl.constexpr = (SUB_N >= 2) + (SUB_N >= 4) + (SUB_N >= 8)
    pid_m, sub_k, line, start, end = _line_program(line_order_ptr, line_offsets_ptr, M, BLOCK_M, SUB_K)
    phase = line // CPB
    cb = line - phase * CPB
    ph = phase // conv_stride_w
    pw = phase - ph * conv_stride_w
    # First row/column of the phase; "+ stride) % stride" keeps it non-negative under C and numpy remainders.
    h_first = ((ph - pad_h) % conv_stride_h + conv_stride_h) % conv_stride_h
    w_first = ((pw - pad_w) % conv_stride_w + conv_stride_w) % conv_stride_w

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_bn = tl.arange(0, BLOCK_N)
    img, hq, wq = _pixel_coords(offs_m, HQ, WQ)
    h = h_first + hq * conv_stride_h
    w = w_first + wq * conv_stride_w
    mask_m = (offs_m < M) & (h < H) & (w < W)
    # dy at (hq, wq): an entry adds its scalar offsets (oh, ow).
    dy_tok = dy_ptr + img.to(tl.int64) * stride_dyn + hq.to(tl.int64) * stride_dyh + wq.to(tl.int64) * stride_dyw
    # A masked pixel gets a row no entry brings into dy: the bounds test below masks it too.
    hq_t = tl.where(mask_m, hq, -(1 << 30))
    if SWAP_AB:  # dx^T = W^T dy^T, as in _bsmm_dx_kernel
        acc = tl.full((BLOCK_K, BLOCK_M), 0.0, dtype=tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_K), 0.0, dtype=tl.float32)
    r, s, a = _prefetch_packed(line_row_slot_ptr, line_aux_ptr, start, end, HAS_MIXED)
    oh, ow, _ = _prefetch_packed(line_out_ptr, line_aux_ptr, start, end, False)
    for it in range(start * SUB_N, end * SUB_N):
        q = (it + 1) >> LOG_SUB_N
        r_n, s_n, a_n = _prefetch_packed_next(line_row_slot_ptr, line_aux_ptr, q, end, HAS_MIXED)
        oh_n, ow_n, _ = _prefetch_packed_next(line_out_ptr, line_aux_ptr, q, end, False)
        nn = (it & (SUB_N - 1)) * BLOCK_N
        # 0 <= ho < H_out as one unsigned compare (a negative row wraps past H_out).
        hit = ((hq_t + oh).to(tl.uint32, bitcast=True) < H_out) & ((wq + ow).to(tl.uint32, bitcast=True) < W_out)
        offs_n = r * BM + nn + offs_bn
        cols = oh.to(tl.int64) * stride_dyh + ow.to(tl.int64) * stride_dyw + offs_n.to(tl.int64) * stride_dyc
        dy = tl.load(dy_tok[:, None] + cols[None, :], mask=hit[:, None] & (offs_n < C_out)[None, :], other=0.0)
        wt = _weight_tile(w_ptr, es_ptr, s, a, fixed_base, nn, sub_k * BLOCK_K, BLOCK_N, BLOCK_K, BM, BK,
                          HAS_MIXED, USE_TMA)  # fmt: skip
        acc = _mma_weight(dy, wt, acc, False, SWAP_AB, DOT_PRECISION, UPCAST)
        r, s, a, oh, ow = r_n, s_n, a_n, oh_n, ow_n
    if SWAP_AB:
        acc = tl.trans(acc)

    offs_c = cb * BK + sub_k * BLOCK_K + tl.arange(0, BLOCK_K)
    dx_tok = dx_ptr + img.to(tl.int64) * stride_dxn + h.to(tl.int64) * stride_dxh + w.to(tl.int64) * stride_dxw
    dx_ptrs = dx_tok[:, None] + offs_c.to(tl.int64)[None, :] * stride_dxc
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_c < C_in)[None, :])


@triton.jit
def _bsconv_dw_kernel(
    # pointers
    dy_ptr,
    x_ptr,
    es_ptr,
    dw_ptr,
    # layout
    train_index_ptr,
    train_rank_ptr,
    train_left_ptr,
    row_indices_ptr,
    col_indices_ptr,
    aux_ptr,
    # shapes
    M,
    C_in,
    H,
    W,
    C_out,
    H_out,
    W_out,
    KW,
    CPB,
    rows_per_split,
    conv_stride_h,
    conv_stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    # strides
    stride_dyn,
    stride_dyc,
    stride_dyh,
    stride_dyw,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_dws,
    # meta-parameters
    BM: tl.constexpr,
    BK: tl.constexpr,
    HAS_MIXED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    """``dw[t] = (dy[:, rows of r].T @ im2col(x)[:, cols of c]) * trainable`` for trainable blocks ``t``.

    The reduction runs over tokens ``m = (n*H_out + ho)*W_out + wo``. As in
    ``_bsmm_dw_kernel``, a program owns a run of up to ``GROUP`` trainable
    blocks of one block row and gathers their ``x`` tiles side by side into one
    ``(BLOCK_M, GROUP * BLOCK_K)`` operand; here each member has its own tap,
    so the gather offsets are per column. Grid ``(n_train * (BM // BLOCK_N) *
    (BK // BLOCK_K), splits)``; split ``j`` reduces tokens ``[j *
    rows_per_split, (j + 1) * rows_per_split)`` into ``dw[j]`` (``stride_dws``
    apart). Non-trainable positions of mixed blocks and the overhang get 0.
    """
    tl.static_assert(BM % BLOCK_N == 0, "BLOCK_N must divide the block's rows")
    tl.static_assert(BK % BLOCK_K == 0, "BLOCK_K must divide the block's columns")
    tl.static_assert(GROUP == 1 or BLOCK_K == BK, "grouped blocks are gathered whole")
    WIDE: tl.constexpr = GROUP * BLOCK_K
    leads, t0, r, member, in_group, b, c, offs_bk, offs_bn = _wgrad_run(
        train_index_ptr, train_rank_ptr, train_left_ptr, row_indices_ptr, col_indices_ptr,
        BM, BK, BLOCK_N, BLOCK_K, GROUP,
    )  # fmt: skip
    if not leads:
        return
    offs_n = r * BM + offs_bn
    mask_n = offs_n < C_out
    dy_cols = offs_n.to(tl.int64) * stride_dyc
    if GROUP == 1:  # one block: its tap is a scalar, so the bounds test is per token, not per element
        c0 = tl.load(col_indices_ptr + tl.load(train_index_ptr + t0))
        tap0 = c0 // CPB
        kr0 = tap0 // KW
        tap_h = kr0 * dil_h - pad_h
        tap_w = (tap0 - kr0 * KW) * dil_w - pad_w
        offs_c = (c0 - tap0 * CPB) * BK + offs_bk
        mask_k = offs_c < C_in
        x_cols = tap_h.to(tl.int64) * stride_xh + tap_w.to(tl.int64) * stride_xw + offs_c.to(tl.int64) * stride_xc
    else:  # each member of the run has its own tap: per-column offsets
        tap = c // CPB
        kr = tap // KW
        tap_h = kr * dil_h - pad_h
        tap_w = (tap - kr * KW) * dil_w - pad_w
        offs_c = (c - tap * CPB) * BK + offs_bk
        mask_k = in_group & (offs_c < C_in)
        x_cols = offs_c.to(tl.int64) * stride_xc

    split = tl.program_id(1)
    m_start = split * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    # Tokens are decoded once; each step then adds BLOCK_M to (n, ho, wo) in mixed radix, with one
    # conditional carry per digit (BLOCK_M = q images + rem_h rows + rem_w pixels): no division in
    # the loop. (Carrying the int64 offsets instead would hide their alignment from the compiler,
    # which then loads element by element and pipelines nothing.)
    hw = H_out * W_out
    step_q = BLOCK_M // hw
    rem = BLOCK_M - step_q * hw
    rem_h = rem // W_out
    rem_w = rem - rem_h * W_out
    offs_m = m_start + tl.arange(0, BLOCK_M)
    img, ho, wo = _pixel_coords(offs_m, H_out, W_out)
    acc = tl.full((BLOCK_N, WIDE), 0.0, dtype=tl.float32)
    for _ in range(m_start, m_end, BLOCK_M):  # the tokens are carried in offs_m/img/ho/wo
        mask_m = offs_m < m_end
        img64 = img.to(tl.int64)
        dy_rows = dy_ptr + img64 * stride_dyn + ho.to(tl.int64) * stride_dyh + wo.to(tl.int64) * stride_dyw
        # Loaded as dy^T, as in _bsmm_dw_kernel: a transposed register tile is not pipelined on sm_80.
        dyt = tl.load(dy_rows[None, :] + dy_cols[:, None], mask=mask_n[:, None] & mask_m[None, :], other=0.0)
        hs = ho * conv_stride_h
        ws = wo * conv_stride_w
        x_rows = x_ptr + img64 * stride_xn + hs.to(tl.int64) * stride_xh + ws.to(tl.int64) * stride_xw
        if GROUP == 1:
            # 0 <= hi < H as one unsigned compare (a negative row wraps past H).
            inside = ((hs + tap_h).to(tl.uint32, bitcast=True) < H) & ((ws + tap_w).to(tl.uint32, bitcast=True) < W)
            x_mask = (inside & mask_m)[:, None] & mask_k[None, :]
            x = tl.load(x_rows[:, None] + x_cols[None, :], mask=x_mask, other=0.0)
        else:
            hi = hs[:, None] + tap_h[None, :]
            wi = ws[:, None] + tap_w[None, :]
            inside = (hi.to(tl.uint32, bitcast=True) < H) & (wi.to(tl.uint32, bitcast=True) < W)
            x_cols_t = tap_h.to(tl.int64) * stride_xh + tap_w.to(tl.int64) * stride_xw + x_cols
            x = tl.load(x_rows[:, None] + x_cols_t[None, :], mask=inside & mask_m[:, None] & mask_k[None, :],
                        other=0.0)  # fmt: skip
        acc = _mma(dyt, x, acc, DOT_PRECISION, UPCAST)
        offs_m += BLOCK_M
        wo += rem_w
        carry_w = wo >= W_out
        wo = tl.where(carry_w, wo - W_out, wo)
        ho += rem_h + carry_w.to(tl.int32)
        carry_h = ho >= H_out
        ho = tl.where(carry_h, ho - H_out, ho)
        img += step_q + carry_h.to(tl.int32)

    _wgrad_store(acc, dw_ptr, es_ptr, aux_ptr, stride_dws, t0, member, in_group, b, offs_bk, offs_bn, BM, BK, HAS_MIXED)


# ------------------------------------------------------------------ launchers
def _check_geom(geom: ConvGeom, meta: Meta, bm: int, bk: int, device: torch.device) -> int:
    """Validate ``geom`` and ``meta`` against each other; return ``CPB`` (channel blocks per tap)."""
    if not isinstance(geom, ConvGeom):
        raise TypeError(f"geom must be a ConvGeom, got {type(geom).__name__}")
    if meta.row_offsets.device != device:
        raise ValueError(f"the layout is on {meta.row_offsets.device}, the activations on {device}")
    if geom.c_pad % bk or geom.c_pad < geom.c_in:
        raise ValueError(f"geom.c_pad={geom.c_pad} is not c_in={geom.c_in} padded to a multiple of bk={bk}")
    cpb = geom.c_pad // bk
    rb, cb = meta.row_offsets.numel() - 1, meta.col_offsets.numel() - 1
    want = (triton.cdiv(geom.c_out, bm), geom.kh * geom.kw * cpb)
    if (rb, cb) != want:
        raise ValueError(
            f"layout has {rb} x {cb} blocks of {bm} x {bk}, but the matrix view of the conv weight "
            f"{(geom.c_out, geom.c_in, geom.kh, geom.kw)} needs {want[0]} x {want[1]}"
        )
    for name, total in (("N*H_out*W_out", geom.n * geom.h_out * geom.w_out), ("N*H*W", geom.n * geom.h * geom.w)):
        if total > INT32_MAX:
            raise ValueError(f"{name} = {total} pixels exceeds the int32 token index of the conv kernels")
    return cpb


def _check_frozen_slots(w_frozen: torch.Tensor, meta: Meta, n_frozen: int) -> None:
    slots = n_frozen + meta.element_state.shape[0]
    if w_frozen.shape[0] != slots:
        raise ValueError(f"w_frozen holds {w_frozen.shape[0]} blocks, the layout needs n_frozen + n_mixed = {slots}")


def _check_act(name: str, t, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    check(name, t, 4, dtype, device)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape} from the conv geometry")


def _new_act(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def _check_grid(programs: int, what: str) -> None:
    if programs > INT32_MAX:
        raise ValueError(f"{what} needs {programs} programs, over the grid limit of {INT32_MAX}")


def bsconv_forward(
    x: torch.Tensor,
    w_train: torch.Tensor,
    w_frozen: torch.Tensor,
    bias: torch.Tensor | None,
    meta: Meta,
    geom: ConvGeom,
    n_frozen: int,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``y = conv2d(x, W) + bias`` over the computed blocks.

    Args:
        x: ``(N, Cin, H, W)``, any strides.
        w_train, w_frozen: the layout's value stores (see ``kernels/store.py``).
        bias: ``(Cout,)`` or ``None``.
        meta: the layout's index tensors (of the ``(Cout, kh*kw*c_pad)`` matrix view).
        geom: the conv geometry (``sparsekern.convview.conv_geometry`` with the block's ``bk``).
        n_frozen: ``layout.n_frozen``.
        out: optional ``(N, Cout, Ho, Wo)`` output, any strides.
        config: explicit kernel config (else tuned data, autotuning or the default).

    Returns:
        ``(N, Cout, Ho, Wo)``; channels_last when allocated here.
    """
    bm, bk = check_values(w_train, w_frozen, x.dtype, x.device)
    _check_geom(geom, meta, bm, bk, x.device)
    _check_frozen_slots(w_frozen, meta, n_frozen)
    _check_act("x", x, (geom.n, geom.c_in, geom.h, geom.w), x.dtype, x.device)
    check_bias(bias, geom.c_out, x.dtype, x.device)
    y_shape = (geom.n, geom.c_out, geom.h_out, geom.w_out)
    if out is not None:
        _check_act("out", out, y_shape, x.dtype, x.device)
    y = out if out is not None else _new_act(x, y_shape)
    m = geom.n * geom.h_out * geom.w_out
    rb = meta.row_offsets.numel() - 1
    if not (m and rb):
        return y
    views = matmul_views(geom, x, y)
    if views is not None:
        bsmm.bsmm_forward(views[0], w_train, w_frozen, bias, meta, geom.c_out, n_frozen, out=views[1], config=config)
        return y
    store = value_store(w_train, w_frozen)
    fixed_base = w_train.shape[0] + n_frozen
    if rect_path(x.device, "forward", geom, bk, {"y": y}, x, store):
        boxes = bsconv_tma.forward_tables(meta, geom, bm, bk)

        def run(cfg):
            return bsconv_tma.forward(x, store, bias, y, meta, geom, bm, bk, fixed_base, cfg, boxes)

        run(cfgs.pick_config("conv_fwd", x.dtype, x.device, bm, bk, m, run, config, variant="rect"))
        return y
    tma = use_tma(x.device, store_matrix(store))
    taps = forward_taps(meta, geom, bk)

    def run(cfg):
        kw = cfg.kwargs
        programs = triton.cdiv(m, kw["BLOCK_M"]) * rb * (bm // kw["BLOCK_N"])
        _check_grid(programs, "the conv forward")
        return _bsconv_fwd_kernel[(programs,)](
            x, weight_operand(store, tma, kw["BLOCK_N"], kw["BLOCK_K"]), meta.element_state,
            bias if bias is not None else x, y,
            meta.row_offsets, taps[0], meta.aux, taps[1], meta.row_order,
            m, geom.c_in, geom.h, geom.w, geom.c_out, geom.h_out, geom.w_out, fixed_base,
            geom.stride_h, geom.stride_w, geom.pad_h, geom.pad_w,
            *x.stride(), *y.stride(),
            HAS_BIAS=bias is not None, USE_TMA=tma, **kernel_constexprs(bm, bk, meta, x.dtype, x.device, cfg),
        )  # fmt: skip

    run(cfgs.pick_config("conv_fwd", x.dtype, x.device, bm, bk, m, run, config))
    return y


def bsconv_input_grad(
    dy: torch.Tensor,
    w_train: torch.Tensor,
    w_frozen: torch.Tensor,
    meta: Meta,
    geom: ConvGeom,
    n_frozen: int,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``dx`` of :func:`bsconv_forward` for upstream ``dy`` ``(N, Cout, Ho, Wo)`` (any strides).

    Returns ``(N, Cin, H, W)`` (``out`` when given, else channels_last).
    """
    bm, bk = check_values(w_train, w_frozen, dy.dtype, dy.device)
    cpb = _check_geom(geom, meta, bm, bk, dy.device)
    _check_frozen_slots(w_frozen, meta, n_frozen)
    _check_act("dy", dy, (geom.n, geom.c_out, geom.h_out, geom.w_out), dy.dtype, dy.device)
    x_shape = (geom.n, geom.c_in, geom.h, geom.w)
    if out is not None:
        _check_act("out", out, x_shape, dy.dtype, dy.device)
    dx = out if out is not None else _new_act(dy, x_shape)
    # Pixels per stride phase (see the kernel): an upper bound, rows and columns past the image are masked.
    hq, wq = triton.cdiv(geom.h, geom.stride_h), triton.cdiv(geom.w, geom.stride_w)
    m = geom.n * hq * wq
    if not (m and cpb):
        return dx
    views = matmul_views(geom, dy, dx)
    if views is not None:
        bsmm.bsmm_input_grad(views[0], w_train, w_frozen, meta, geom.c_in, n_frozen, out=views[1], config=config)
        return dx
    n_lines = geom.stride_h * geom.stride_w * cpb
    store = value_store(w_train, w_frozen)
    fixed_base = w_train.shape[0] + n_frozen
    lines = input_grad_lines(meta, geom, bk)
    if rect_path(dy.device, "input gradient", geom, bk, {"dy": dy}, store=store):

        def run(cfg):
            return bsconv_tma.input_grad(dy, store, dx, meta, geom, bm, bk, fixed_base, lines, cfg)

        run(cfgs.pick_config("conv_dx", dy.dtype, dy.device, bm, bk, m, run, config, variant="rect"))
        return dx
    tma = use_tma(dy.device, store_matrix(store))
    offsets, pairs, aux, order = lines

    def run(cfg):
        kw = cfg.kwargs
        programs = triton.cdiv(m, kw["BLOCK_M"]) * n_lines * (bk // kw["BLOCK_K"])
        _check_grid(programs, "the conv input gradient")
        return _bsconv_dx_kernel[(programs,)](
            dy, weight_operand(store, tma, kw["BLOCK_N"], kw["BLOCK_K"]), meta.element_state, dx,
            offsets, pairs[0], aux, pairs[1], order,
            m, hq, wq, geom.c_in, geom.h, geom.w, geom.c_out, geom.h_out, geom.w_out, cpb, fixed_base,
            geom.stride_h, geom.stride_w, geom.pad_h, geom.pad_w,
            *dy.stride(), *dx.stride(),
            USE_TMA=tma, **kernel_constexprs(bm, bk, meta, dy.dtype, dy.device, cfg),
        )  # fmt: skip

    run(cfgs.pick_config("conv_dx", dy.dtype, dy.device, bm, bk, m, run, config))
    return dx


def bsconv_weight_grad(
    dy: torch.Tensor,
    x: torch.Tensor,
    meta: Meta,
    geom: ConvGeom,
    block_size: tuple[int, int],
    config: triton.Config | None = None,
    splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the trainable blocks, ``(n_train, bm, bk)`` in ``w_train`` order.

    Args:
        dy: ``(N, Cout, Ho, Wo)``; x: ``(N, Cin, H, W)``; any strides, same dtype.
        meta, geom: as for :func:`bsconv_forward`.
        block_size: ``(bm, bk)`` of the layout.
        config: explicit kernel config; splits: token splits (default from
            ``splits.wgrad_splits``); out: optional ``(n_train, bm, bk)`` output.
    """
    bm, bk = block_size
    check_dtype(x.dtype)
    cpb = _check_geom(geom, meta, bm, bk, x.device)
    _check_act("x", x, (geom.n, geom.c_in, geom.h, geom.w), x.dtype, x.device)
    _check_act("dy", dy, (geom.n, geom.c_out, geom.h_out, geom.w_out), x.dtype, x.device)
    n_train = meta.train_index.numel()
    if out is not None:
        check("out", out, 3, x.dtype, x.device)
        if tuple(out.shape) != (n_train, bm, bk) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {(n_train, bm, bk)} tensor, got {tuple(out.shape)}")
    dw = out if out is not None else x.new_empty(n_train, bm, bk)
    m = geom.n * geom.h_out * geom.w_out
    if n_train == 0:
        return dw
    if m == 0:
        return dw.zero_()
    views = matmul_views(geom, dy, x)
    if views is not None:
        return bsmm.bsmm_weight_grad(views[0], views[1], meta, (bm, bk), out=dw, config=config, splits=splits)
    # The descriptor kernel runs one block per program: grouped configs (autotuning) take the pointer kernel.
    rect = rect_path(x.device, "weight gradient", geom, bk, {"dy": dy}, x)

    def run(cfg):
        kw = cfg.kwargs
        sub = (bm // kw["BLOCK_N"]) * (bk // kw["BLOCK_K"])
        _check_grid(n_train * sub, "the conv weight gradient")
        runs = triton.cdiv(n_train, kw.get("GROUP", 1)) * sub
        if rect and kw.get("GROUP", 1) == 1:
            bm_tok = kw["BLOCK_M"]
            rects = bsconv_tma.rect_count(bm_tok, geom.n, geom.h_out, geom.w_out)

            def launch_rect(target, rows_per_split, nsplit, stride_dws):
                return bsconv_tma.weight_grad(dy, x, meta, geom, bm, bk, cfg, target, rows_per_split // bm_tok,
                                              nsplit, stride_dws)  # fmt: skip

            return launch_split(dw, (n_train, bm, bk), rects * bm_tok, runs, bm_tok, splits, launch_rect)

        def launch(target, rows_per_split, nsplit, stride_dws):
            return _bsconv_dw_kernel[(n_train * sub, nsplit)](
                dy, x, meta.element_state, target,
                meta.train_index, meta.train_rank, meta.train_left, meta.row_indices, meta.col_indices, meta.aux,
                m, geom.c_in, geom.h, geom.w, geom.c_out, geom.h_out, geom.w_out, geom.kw, cpb, rows_per_split,
                geom.stride_h, geom.stride_w, geom.pad_h, geom.pad_w, geom.dil_h, geom.dil_w,
                *dy.stride(), *x.stride(), stride_dws,
                **kernel_constexprs(bm, bk, meta, x.dtype, x.device, cfg),
            )  # fmt: skip

        return launch_split(dw, (n_train, bm, bk), m, runs, kw["BLOCK_M"], splits, launch)

    variant = "rect" if rect else ""
    run(cfgs.pick_config("conv_wgrad", x.dtype, x.device, bm, bk, m, run, config, blocks=n_train, variant=variant))
    return dw
