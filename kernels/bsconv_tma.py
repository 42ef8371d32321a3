"""The sm_90 conv kernels: every operand through a tensor descriptor, tokens as boxes of pixels.

Import path: ``sparsekern.kernels.bsconv_tma`` (this folder, ``kernels/``, installs as ``sparsekern.kernels``).

Why one file of this size (about 620 lines): the three descriptor kernels and their launchers share the
rectangle, the stride-phase view and the table layout, and nothing else uses them; about 90 lines are
this docstring, 345 the kernels, 185 the launchers.

Why a second set of conv kernels. The pointer kernels of ``bsconv.py`` gather the activation tile row by
row, each row with its own image bounds: compiled for sm_90 that is about 4 ISETP, 4 SEL and 3.5 IMAD per
row, 8 rows per thread, so their main loop ran ~216 non-MMA instructions against ~108 for a dense GEMM of
the same tile (``python -m sparsekern.check --twins``). Here a program's tokens are a rectangle of output
pixels, ``TN`` images x ``TH`` rows x ``TW`` columns (``BLOCK_M = TN*TH*TW``), so a tap's input tile is one
box of ``x`` and TMA does the bounds: boxes that hang over the image edge (padding) are zero-filled by the
hardware. No per-row mask is left in any main loop. The weight gradient of a large batch takes one output
pixel of ``BLOCK_M`` images instead (``wgrad_tiling``, and the limits below say why).

Strides: ``x`` is read through a 5-D view ``[N, H/sh, sh, W/sw, sw*C]`` with strides ``[sN, sh*sH, sH,
sw*sW, 1]`` (``sh``, ``sw`` the conv strides). Input row ``hi = ho*sh + d`` (``d = r*dil_h - pad_h``) is
row ``ho + floor(d/sh)`` of phase ``d mod sh``, so every tap is still one box ``[TN, TH, 1, TW, BLOCK_K]``
at ``(n0, h0 + floor(d/sh), d mod sh, w0 + floor(e/sw), (e mod sw)*C + channel)``. For stride 1 the view
is plain NHWC. It needs ``H % sh == 0`` (else the last phase row would read the next image) and, for
``sw > 1``, ``W % sw == 0``, pixels packed (``sW == C``) and ``C % bk == 0`` (a channel tail must not run
into the next phase's channels); :func:`rect_reason` says which condition fails, and the launcher then
runs the pointer kernels.

=================  =============================================  ==================================
pass               main loop (one box per operand per step)       output
=================  =============================================  ==================================
forward            CSR positions of a block row: x box at the     TMA store of the rectangle, the
                   block's tap and channels, weight tile          descriptor clipping edge pixels
input gradient     entries of a line (``bsconv.input_grad_        pointer store of the phase's
                   lines``): dy box at the entry's offsets        pixels, masked (epilogue only)
weight gradient    the token tiles of one split (one pixel of     ``tiles._wgrad_store``
                   ``BLOCK_M`` images, or rectangles for small
                   batches: ``wgrad_tiling``): dy and x boxes,
                   the tile's coordinates carried
=================  =============================================  ==================================

Block metadata is prefetched one position ahead, as in every kernel here, so the pipeliner keeps
``num_stages`` tiles in flight. Here it is one int64 per block in a per-launch table
(``bsconv_tables.rect_table``): the store row (slot times ``BM``) and a channel offset, 24 bits each,
with a signed 8-bit pixel offset above each. Every value a box coordinate needs comes out of one load
with one mask or one shift (sm_90 fuses the shift into the add), and the table's sentinel lets the
prefetch run past a line's end unclamped. Per iteration that is what separates these loops from a
dense TMA GEMM's: measured on sm_90, two descriptor pairs per block cost 111 non-MMA instructions per
iteration against the dense twin's 83, this word 94 (64x64 blocks, Triton 3.9). The limits it sets
(``bsconv_tables.table_reason``: taps at most 127 pixels away, up to 2**24 store rows and channels)
send other geometries to the pointer kernels.

What the rectangles cost: pixels of a rectangle past the image are computed and dropped. The tile is
chosen per geometry to waste least (``bsconv_tables.pixel_tile``): 14x14 images in 16x16 tiles compute
1.31x the tokens, 56x56 in 4x64 1.14x, 7x7 images as 4 images of 8x8 1.31x. Past-image tokens read
``dy`` as zero (the weight gradient adds ``0 * x``) and ``x`` as real neighbouring pixels, never memory
outside ``x``.

Limits:

* The weight gradient runs one block per program (``GROUP == 1``; grouped configs run the pointer
  kernel); the input gradient's store stays on pointers (a stride phase's pixels are not a box of ``dx``).
* Where an activation box is the MMA's *A* operand, Triton (3.6 and 3.9 alike) does not keep it in
  shared memory when the box merges two dimensions (``TH x TW`` into ``BLOCK_M``): it reaches a wgmma's
  A side as ``local_load``, ``reshape``, ``convert_layout`` to registers, while on the B side it stays a
  ``memdesc_reshape`` of the TMA buffer. A box that only drops leading unit dimensions stays in shared
  memory (an ``[N, H, W, C]`` box ``[64, 1, 1, C]`` does not: measured, the same 114 as a rectangle).
  Two kernels have an activation on the A side, and both avoid the merge:

  - The weight gradient (``dy^T`` is A). Over rectangles its loop had ``ldmatrix`` copies, register
    moves, a second barrier and a proxy fence: 114-118 non-MMA instructions per iteration against
    the dense twin's 81-90 (Triton 3.9; the ``-rect`` rows of ``python -m sparsekern.check --twins``).
    Its tile is now one output pixel of ``BLOCK_M`` images, read through descriptors ordered
    ``[H, W, N, C]`` (TMA takes the dimensions' strides in any order), so each box is ``[1, 1,
    BLOCK_M, C]``: 85-99 against 75-90. It pads only the batch, to a multiple of ``BLOCK_M``;
    :func:`wgrad_tiling` keeps rectangles where that would cost more than an eighth more tokens
    (fewer images than about ``BLOCK_M``, or batches just past a multiple of it).
  - 32-wide blocks in the forward and input gradient, whose 32 rows cannot be a wgmma's 64-row A side.
    Tokens on M ran a register A that ptxas serialized (C7515); their default config puts 256 tokens
    on N (``SWAP_AB``), where Triton emits ``mma.sync`` from the two TMA buffers
    (``configs.default_config``).

  Why the merge goes through registers: when Triton picks the wgmma's operand sources, A stays in
  shared memory only if it comes from a load through layout conversions and transposes alone, and a
  merging ``reshape`` is neither (one that drops leading unit dimensions is folded into the load).
  Measured and dropped before the one-pixel tiles (sm_90, Triton 3.9, 64x64 fp16, non-MMA
  instructions per iteration against the dense twin's 81-83): ``dy`` through pointers (``cp.async``,
  A in shared memory) 126 with the masks that zero past-image pixels, 103 without them; one box and
  one dot per pixel row 238 (each row's dot waited for the one before, each box had its own barrier).
* Pointwise convs (1x1, stride 1, no padding) never come here: ``bsconv.py`` runs them on the linear
  kernels, whose tokens are pixels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import bsconv_tables
from .bsconv_tables import padded_aux, pixel_tile, rect_forward_table, rect_input_grad_table, table_reason
from .launch import TensorDescriptor, descriptor, kernel_constexprs, tma_ok
from .meta import ConvGeom, Meta
from .store import store_matrix
from .tiles import _add_bias, _line_program, _mma, _mma_weight, _weight_tile, _wgrad_run, _wgrad_store

# A strided forward's table field: the channel offset below this bit, the row phase above it.
PHASE_SHIFT = tl.constexpr(bsconv_tables.PHASE_SHIFT)
PHASE_ONE = tl.constexpr(1 << bsconv_tables.PHASE_SHIFT)

__all__ = ["forward", "forward_tables", "input_grad", "rect_count", "rect_reason", "weight_grad", "wgrad_tiling"]


# --------------------------------------------------------------------- kernels
@triton.jit
def _table_row(row_ptr, aux_ptr, p, HAS_MIXED: tl.constexpr):
    """The entry at ``row_ptr`` (position ``p``) of a table of ``bsconv_tables.rect_table``:
    ``(low, field, a, b, aux)``.

    One 8-byte load: the block's store row and a 24-bit field under two signed 8-bit offsets (unpacked
    by a mask or an arithmetic shift each, in the scalar unit). The tables end in a sentinel and the aux
    in a ``-1``, so the prefetch of the position after a line's last needs no clamp and no mask.
    """
    v = tl.load(row_ptr)
    low = v.to(tl.int32)
    high = (v >> 32).to(tl.int32)
    if HAS_MIXED:
        a = tl.load(aux_ptr + p)
    else:
        a = -1
    return low & 0xFFFFFF, high & 0xFFFFFF, low >> 24, high >> 24, a


@triton.jit
def _next_row(row_ptr, tab_ptr, it, SUB: tl.constexpr):
    """The table entry of iteration ``it + 1`` (a new position every ``SUB`` iterations).

    With one iteration per position the pointer is carried and stepped, not recomputed as ``tab + p``:
    from that affine index LLVM widened the loop counter to 64 bits, and each iteration paid for
    64-bit compares (5 SASS instructions of about 105 on sm_90).
    """
    if SUB == 1:
        nxt = row_ptr + 1
    else:
        nxt = tab_ptr + ((it + 1) >> ((SUB >= 2) + (SUB >= 4) + (SUB >= 8)))
    return nxt


@triton.jit
def _weight_rows(w_desc, es_ptr, srow, a, fixed_base, r0, c0, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                 BM: tl.constexpr, BK: tl.constexpr, HAS_MIXED: tl.constexpr):  # fmt: skip
    """The weight tile of the block whose first store row is ``srow`` (``slot * BM``, precomputed)."""
    if HAS_MIXED:
        w = _weight_tile(w_desc, es_ptr, srow // BM, a, fixed_base, r0, c0, BLOCK_R, BLOCK_C, BM, BK, True, True)
    else:
        w = w_desc.load([srow + r0, c0])
    return w


@triton.jit
def _rect_origin(tile, GH, GW, TN: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr):
    """``(n0, h0, w0)`` of rectangle ``tile`` of a ``GN x GH x GW`` grid of ``TN x TH x TW`` rectangles."""
    tw = tile % GW
    rest = tile // GW
    return (rest // GH) * TN, (rest % GH) * TH, tw * TW


@triton.jit
def _bsconv_fwd_tma_kernel(
    x_desc,
    w_desc,
    es_ptr,
    bias_ptr,
    y_desc,
    row_offsets_ptr,
    tab_ptr,
    aux_ptr,
    row_order_ptr,
    GH,
    GW,
    M,
    C_out,
    fixed_base,
    BM: tl.constexpr,
    BK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MIXED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    PHASED: tl.constexpr,
    TN: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """``y[rect, r*BM + j] = sum_blocks x_box(tap, channels) @ W_rc^T (+ bias)`` for one rectangle of pixels.

    CSR position ``p`` has ``(inner | phase << 24, slot * BM)`` and ``(dh, dw)`` in row ``p`` of
    ``tab`` (``bsconv_tables.rect_forward_table``): its x box starts at ``(n0, h0 + dh, phase, w0 + dw, inner)``
    of the stride-phase view (``PHASED``), or at ``(n0, h0 + dh, w0 + dw, inner)`` of plain NHWC for a
    stride-1 conv, whose phase is always 0.
    ``M`` is the rectangle count times ``BLOCK_M``; the grid is that of ``bsconv._bsconv_fwd_kernel``.
    """
    tl.static_assert(TN * TH * TW == BLOCK_M, "the rectangle must hold BLOCK_M tokens")
    SUB_N: tl.constexpr = BM // BLOCK_N
    SUB_K: tl.constexpr = BK // BLOCK_K
    LOG_SUB_K: tl.constexpr = (SUB_K >= 2) + (SUB_K >= 4) + (SUB_K >= 8)
    pid_m, sub_n, r, start, end = _line_program(row_order_ptr, row_offsets_ptr, M, BLOCK_M, SUB_N)
    n0, h0, w0 = _rect_origin(pid_m, GH, GW, TN, TH, TW)
    if SWAP_AB:
        acc = tl.full((BLOCK_N, BLOCK_M), 0.0, dtype=tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    row = tab_ptr + start
    srow, inner, dh, dw, a = _table_row(row, aux_ptr, start, HAS_MIXED)
    for it in range(start * SUB_K, end * SUB_K):
        # The next position's entry, loaded now: no load below feeds an address of this iteration.
        row = _next_row(row, tab_ptr, it, SUB_K)
        srow_n, inner_n, dh_n, dw_n, a_n = _table_row(row, aux_ptr, (it + 1) >> LOG_SUB_K, HAS_MIXED)
        kk = (it & (SUB_K - 1)) * BLOCK_K
        if PHASED:
            box = [n0, h0 + dh, inner >> PHASE_SHIFT, w0 + dw, (inner & (PHASE_ONE - 1)) + kk]
        else:  # stride 1: plain NHWC, no phase to unpack
            box = [n0, h0 + dh, w0 + dw, inner + kk]
        x = x_desc.load(box).reshape(BLOCK_M, BLOCK_K)
        w = _weight_rows(w_desc, es_ptr, srow, a, fixed_base, sub_n * BLOCK_N, kk, BLOCK_N, BLOCK_K, BM, BK, HAS_MIXED)
        acc = _mma_weight(x, w, acc, True, SWAP_AB, DOT_PRECISION, UPCAST)
        inner, srow, dh, dw, a = inner_n, srow_n, dh_n, dw_n, a_n

    n_first = r * BM + sub_n * BLOCK_N
    offs_n = n_first + tl.arange(0, BLOCK_N)
    acc = _add_bias(acc, bias_ptr, offs_n, offs_n < C_out, HAS_BIAS, SWAP_AB)
    # The descriptor clips pixels past the image and channels past C_out.
    y_desc.store([n0, h0, w0, n_first], acc.reshape(TN, TH, TW, BLOCK_N).to(y_desc.dtype))


@triton.jit
def _bsconv_dx_tma_kernel(
    dy_desc,
    w_desc,
    es_ptr,
    dx_ptr,
    line_offsets_ptr,
    tab_ptr,
    line_aux_ptr,
    line_order_ptr,
    GH,
    GW,
    M,
    N,
    C_in,
    H,
    W,
    CPB,
    fixed_base,
    conv_stride_h,
    conv_stride_w,
    pad_h,
    pad_w,
    stride_dxn,
    stride_dxc,
    stride_dxh,
    stride_dxw,
    BM: tl.constexpr,
    BK: tl.constexpr,
    HAS_MIXED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    TN: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """``dx`` of a rectangle of one stride phase's pixels: ``sum_entries dy_box(hq + oh, wq + ow) @ W_rc``.

    Lines, entries and the phase's pixels ``h = h_first + hq*conv_stride_h`` are those of
    ``bsconv._bsconv_dx_kernel``, each entry a row ``(r * BM, slot * BM), (oh, ow)`` of ``tab``
    (``bsconv_tables.rect_input_grad_table``); the rectangle is ``TN x TH x TW`` of ``(n, hq, wq)``, and its dy box
    for entry ``(oh, ow)`` starts at ``(n0, hq0 + oh, wq0 + ow, r*BM + nn)``, zero-filled outside dy.
    """
    tl.static_assert(TN * TH * TW == BLOCK_M, "the rectangle must hold BLOCK_M tokens")
    SUB_N: tl.constexpr = BM // BLOCK_N
    SUB_K: tl.constexpr = BK // BLOCK_K
    LOG_SUB_N: tl.constexpr = (SUB_N >= 2) + (SUB_N >= 4) + (SUB_N >= 8)
    pid_m, sub_k, line, start, end = _line_program(line_order_ptr, line_offsets_ptr, M, BLOCK_M, SUB_K)
    n0, hq0, wq0 = _rect_origin(pid_m, GH, GW, TN, TH, TW)
    if SWAP_AB:
        acc = tl.full((BLOCK_K, BLOCK_M), 0.0, dtype=tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_K), 0.0, dtype=tl.float32)
    row = tab_ptr + start
    srow, rrow, oh, ow, a = _table_row(row, line_aux_ptr, start, HAS_MIXED)
    for it in range(start * SUB_N, end * SUB_N):
        row = _next_row(row, tab_ptr, it, SUB_N)
        srow_n, rrow_n, oh_n, ow_n, a_n = _table_row(row, line_aux_ptr, (it + 1) >> LOG_SUB_N, HAS_MIXED)
        nn = (it & (SUB_N - 1)) * BLOCK_N
        dy = dy_desc.load([n0, hq0 + oh, wq0 + ow, rrow + nn]).reshape(BLOCK_M, BLOCK_N)
        wt = _weight_rows(w_desc, es_ptr, srow, a, fixed_base, nn, sub_k * BLOCK_K, BLOCK_N, BLOCK_K, BM, BK, HAS_MIXED)
        acc = _mma_weight(dy, wt, acc, False, SWAP_AB, DOT_PRECISION, UPCAST)
        rrow, srow, oh, ow, a = rrow_n, srow_n, oh_n, ow_n, a_n
    if SWAP_AB:
        acc = tl.trans(acc)

    phase = line // CPB
    cb = line - phase * CPB
    ph = phase // conv_stride_w
    pw = phase - ph * conv_stride_w
    h_first = ((ph - pad_h) % conv_stride_h + conv_stride_h) % conv_stride_h
    w_first = ((pw - pad_w) % conv_stride_w + conv_stride_w) % conv_stride_w
    offs_m = tl.arange(0, BLOCK_M)  # (i, j, k) of the rectangle: divisions by powers of two
    img = n0 + offs_m // (TH * TW)
    h = h_first + (hq0 + (offs_m // TW) % TH) * conv_stride_h
    w = w_first + (wq0 + offs_m % TW) * conv_stride_w
    mask_m = (img < N) & (h < H) & (w < W)
    offs_c = cb * BK + sub_k * BLOCK_K + tl.arange(0, BLOCK_K)
    dx_tok = dx_ptr + img.to(tl.int64) * stride_dxn + h.to(tl.int64) * stride_dxh + w.to(tl.int64) * stride_dxw
    dx_ptrs = dx_tok[:, None] + offs_c.to(tl.int64)[None, :] * stride_dxc
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_c < C_in)[None, :])


@triton.jit
def _bsconv_dw_tma_kernel(
    dy_desc,
    x_desc,
    es_ptr,
    dw_ptr,
    train_index_ptr,
    train_rank_ptr,
    train_left_ptr,
    row_indices_ptr,
    col_indices_ptr,
    aux_ptr,
    GH,
    GW,
    n_rects,
    C_in,
    KW,
    CPB,
    rects_per_split,
    conv_stride_h,
    conv_stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    stride_dws,
    BM: tl.constexpr,
    BK: tl.constexpr,
    HAS_MIXED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    PHASED: tl.constexpr,
    WRAP_W: tl.constexpr,
    BATCH_INNER: tl.constexpr,
    TN: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    """``dw[t] = sum_rects dy_box.T @ x_box(tap)`` for trainable block ``t``, over split ``program_id(1)``.

    Grid ``(n_train * (BM // BLOCK_N) * (BK // BLOCK_K), splits)``; split ``j`` reduces rectangles
    ``[j * rects_per_split, (j + 1) * rects_per_split)`` of the ``GN x GH x GW`` grid into ``dw[j]``.
    The rectangle's origin is carried in mixed radix (one conditional carry per digit), so the loop
    divides by nothing and its boxes' coordinates are scalars; ``WRAP_W`` is False when one rectangle
    spans the row (``GW == 1``), which drops the column digit.

    ``BATCH_INNER``: the descriptors are ordered ``[H, W, N, C]`` (``_batch_inner_desc``) and a tile is
    one output pixel of ``TN = BLOCK_M`` images (``TH = TW = 1``, :func:`wgrad_tiling`). Its boxes drop
    only unit dimensions, so ``dy^T`` reaches the wgmma's A side from shared memory as TMA wrote it.
    """
    tl.static_assert(GROUP == 1, "one block per program: a run's members have different taps")
    tl.static_assert(TN * TH * TW == BLOCK_M, "the rectangle must hold BLOCK_M tokens")
    SUB_N: tl.constexpr = BM // BLOCK_N
    SUB_K: tl.constexpr = BK // BLOCK_K
    _, t0, r, member, in_group, b, _, offs_bk, offs_bn = _wgrad_run(
        train_index_ptr, train_rank_ptr, train_left_ptr, row_indices_ptr, col_indices_ptr,
        BM, BK, BLOCK_N, BLOCK_K, GROUP,
    )  # fmt: skip
    c0 = tl.load(col_indices_ptr + tl.load(train_index_ptr + t0))
    tap = c0 // CPB
    kr = tap // KW
    # Offsets d = r*dil - pad split into (floor(d / stride), d mod stride), sign-safe: the remainder is
    # made non-negative first, so the division is exact (C and numpy agree on exact quotients).
    d_h = kr * dil_h - pad_h
    d_w = (tap - kr * KW) * dil_w - pad_w
    ph = (d_h % conv_stride_h + conv_stride_h) % conv_stride_h
    pw = (d_w % conv_stride_w + conv_stride_w) % conv_stride_w
    dh = (d_h - ph) // conv_stride_h
    dw = (d_w - pw) // conv_stride_w
    sub = tl.program_id(0) % (SUB_N * SUB_K)  # the tile's slice of the block, as _wgrad_run decodes it
    inner = pw * C_in + (c0 - tap * CPB) * BK + (sub % SUB_K) * BLOCK_K
    n_first = r * BM + (sub // SUB_K) * BLOCK_N

    split = tl.program_id(1)
    t_start = split * rects_per_split
    t_end = tl.minimum(n_rects, t_start + rects_per_split)
    n0, h0, w0 = _rect_origin(t_start, GH, GW, TN, TH, TW)
    h_end = GH * TH
    w_end = GW * TW
    acc = tl.full((BLOCK_N, BLOCK_K), 0.0, dtype=tl.float32)
    for _ in range(t_start, t_end):
        if BATCH_INNER:  # [H, W, N, C] boxes of one pixel: the reshapes drop unit dimensions only
            dyt = dy_desc.load([h0, w0, n0, n_first]).reshape(BLOCK_M, BLOCK_N)
            if PHASED:
                x = x_desc.load([h0 + dh, ph, w0 + dw, n0, inner]).reshape(BLOCK_M, BLOCK_K)
            else:
                x = x_desc.load([h0 + dh, w0 + dw, n0, inner]).reshape(BLOCK_M, BLOCK_K)
        else:
            dyt = dy_desc.load([n0, h0, w0, n_first]).reshape(BLOCK_M, BLOCK_N)
            if PHASED:
                x = x_desc.load([n0, h0 + dh, ph, w0 + dw, inner]).reshape(BLOCK_M, BLOCK_K)
            else:
                x = x_desc.load([n0, h0 + dh, w0 + dw, inner]).reshape(BLOCK_M, BLOCK_K)
        acc = _mma(tl.trans(dyt), x, acc, DOT_PRECISION, UPCAST)
        if WRAP_W:
            w0 += TW
            wrap_w = w0 == w_end
            w0 = tl.where(wrap_w, 0, w0)
            h0 += tl.where(wrap_w, TH, 0)
        else:  # one rectangle spans the row (GW == 1, the usual case): w0 stays 0
            h0 += TH
        wrap_h = h0 == h_end
        h0 = tl.where(wrap_h, 0, h0)
        n0 += tl.where(wrap_h, TN, 0)
    _wgrad_store(acc, dw_ptr, es_ptr, aux_ptr, stride_dws, t0, member, in_group, b, offs_bk, offs_bn, BM, BK, HAS_MIXED)


# ------------------------------------------------------------------ launchers
def rect_reason(geom: ConvGeom, bk: int, boxes: dict[str, torch.Tensor], phased: torch.Tensor | None = None,
                store: torch.Tensor | None = None) -> str | None:  # fmt: skip
    """Why these operands cannot run the descriptor kernels (``None``: they can).

    ``boxes`` are the 4-D activations read or written as plain NHWC boxes; ``phased`` is ``x`` when it is
    read through the stride-phase view of the module docstring (forward and weight gradient); ``store``
    the value store the forward and input gradient read their weight tiles from.
    """
    if TensorDescriptor is None:
        return "this Triton has no tensor descriptors"
    if store is not None:
        if not tma_ok(store_matrix(store)):
            return "the value store is not 16-byte aligned"
        why = table_reason(geom, store.shape[1], bk, store.shape[0] * store.shape[1])
        if why is not None:
            return why
    for name, t in {**boxes, **({"x": phased} if phased is not None else {})}.items():
        if t.stride(1) != 1:
            return f"{name} is not channels_last"
        elem = t.element_size()
        if t.data_ptr() % 16 or any(s * elem % 16 for i, s in enumerate(t.stride()) if i != 1):
            return f"{name}'s rows are not 16-byte aligned (channels a multiple of {16 // elem} are)"
    if phased is not None:
        if geom.stride_h > 1 and geom.h % geom.stride_h:
            return f"H={geom.h} is not a multiple of the stride {geom.stride_h}"
        if geom.stride_w > 1:
            if geom.w % geom.stride_w:
                return f"W={geom.w} is not a multiple of the stride {geom.stride_w}"
            if phased.stride(3) != geom.c_in or geom.c_in % bk:
                return f"a strided conv needs packed pixels and C_in a multiple of bk={bk} (C_in={geom.c_in})"
    return None


def _box_desc(t: torch.Tensor, block: list[int]):
    """A descriptor over a channels_last ``(N, C, H, W)`` tensor as ``[N, H, W, C]`` boxes."""
    n, c, h, w = t.shape
    return TensorDescriptor(t, [n, h, w, c], [t.stride(0), t.stride(2), t.stride(3), 1], block)


def _batch_inner_desc(t: torch.Tensor, block: list[int]):
    """A descriptor over a channels_last ``(N, C, H, W)`` tensor as ``[H, W, N, C]`` boxes: a box of
    ``[1, 1, TN, C]`` is one pixel of ``TN`` images (TMA takes the dimensions' strides in any order)."""
    n, c, h, w = t.shape
    return TensorDescriptor(t, [h, w, n, c], [t.stride(2), t.stride(3), t.stride(0), 1], block)


def _phased(geom: ConvGeom) -> bool:
    return geom.stride_h > 1 or geom.stride_w > 1


def _x_desc(x: torch.Tensor, geom: ConvGeom, tile: tuple[int, int, int], block_k: int, batch_inner: bool = False):
    """``x`` as the stride-phase view ``[N, H/sh, sh, W/sw, sw*C]`` of the module docstring (plain NHWC
    boxes for a stride-1 conv: the ``PHASED=False`` kernels); ``batch_inner`` moves ``N`` next to the
    channels (``[H/sh, sh, W/sw, N, sw*C]``, the weight gradient's one-pixel tiles)."""
    tn, th, tw = tile
    if not _phased(geom):
        return _batch_inner_desc(x, [th, tw, tn, block_k]) if batch_inner else _box_desc(x, [tn, th, tw, block_k])
    n, c, h, w = x.shape
    sh, sw = geom.stride_h, geom.stride_w
    dims = {"n": (n, x.stride(0)), "h": (h // sh, sh * x.stride(2)), "ph": (sh, x.stride(2)),
            "w": (w // sw, sw * x.stride(3)), "c": (sw * c, 1)}  # fmt: skip
    order = ("h", "ph", "w", "n", "c") if batch_inner else ("n", "h", "ph", "w", "c")
    box = {"n": tn, "h": th, "ph": 1, "w": tw, "c": block_k}
    return TensorDescriptor(x, [dims[d][0] for d in order], [dims[d][1] for d in order], [box[d] for d in order])


INT32_MAX = 2**31 - 1


def _grid_of(block_m: int, n: int, h: int, w: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``((TN, TH, TW), (GN, GH, GW))``: the rectangle for ``block_m`` tokens and how many cover the images.

    The rectangles' tokens, past-image pixels included, are counted in int32 by the kernels.
    """
    tn, th, tw = pixel_tile(block_m, n, h, w)
    grid = (triton.cdiv(n, tn), triton.cdiv(h, th), triton.cdiv(w, tw))
    if grid[0] * grid[1] * grid[2] * block_m > INT32_MAX:
        raise ValueError(f"{n}x{h}x{w} pixels in {tn}x{th}x{tw} rectangles exceed the int32 token index")
    return (tn, th, tw), grid


# One-pixel tiles are taken while they compute at most this fraction more tokens than the best
# rectangle: a rectangle's merged box costs the loop ~25 more non-MMA instructions per iteration (a
# register A: 114 against 90 at 64x64, Triton 3.9), a tile of padding costs its share of the MMAs.
PIXEL_TILE_SLACK = 1 / 8


def wgrad_tiling(block_m: int, n: int, h: int, w: int) -> tuple[tuple[int, int, int], tuple[int, int, int], bool]:
    """``(tile, grid, batch_inner)``: how the weight gradient cuts ``n`` images of ``h x w`` output pixels.

    A rectangle whose box merges dimensions (:func:`_grid_of`) reaches the wgmma's A side through
    registers (the module docstring); one pixel of ``block_m`` images (``batch_inner``) does not, and
    pads only the batch, to a multiple of ``block_m``. It is taken unless it computes more than
    ``PIXEL_TILE_SLACK`` more tokens than the best rectangle: 256 images of 14x14 take it (both exact),
    and so do 300 (1.07x the pixels against the rectangles' 1.01x); 48 images (1.33x against 1.0x)
    and 8 (8x against 1.14x) take rectangles.
    """
    tile, grid = _grid_of(block_m, n, h, w)
    gn = triton.cdiv(n, block_m)
    if gn * block_m * h * w <= grid[0] * grid[1] * grid[2] * block_m * (1 + PIXEL_TILE_SLACK):
        if gn * h * w * block_m > INT32_MAX:  # may exceed the rectangles' count, which _grid_of checked
            raise ValueError(f"{n}x{h}x{w} pixels in tiles of {block_m} images exceed the int32 token index")
        return (block_m, 1, 1), (gn, h, w), True
    return tile, grid, False


def _programs(count: int, what: str) -> int:
    if count > INT32_MAX:
        raise ValueError(f"{what} needs {count} programs, over the grid limit of {INT32_MAX}")
    return count


def forward_tables(meta: Meta, geom: ConvGeom, bm: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's per-launch ``(table, aux)`` (built once per call, shared by the autotuner's launches)."""
    return rect_forward_table(meta, geom, bm, bk), padded_aux(meta.aux)


def forward(x, store, bias, y, meta: Meta, geom: ConvGeom, bm: int, bk: int, fixed_base: int, cfg, boxes=None):
    """Launch the descriptor forward with ``cfg``; returns the compiled kernel (for the autotuner).

    ``boxes``: ``(table, aux)`` of :func:`bsconv_tables.rect_forward_table` and :func:`bsconv_tables.padded_aux`,
    when the caller built them already (the autotuner launches several configs).
    """
    kw = cfg.kwargs
    (tn, th, tw), (gn, gh, gw) = _grid_of(kw["BLOCK_M"], geom.n, geom.h_out, geom.w_out)
    tab, aux = forward_tables(meta, geom, bm, bk) if boxes is None else boxes
    rb = meta.row_offsets.numel() - 1
    m = gn * gh * gw * kw["BLOCK_M"]
    programs = _programs(gn * gh * gw * rb * (bm // kw["BLOCK_N"]), "the conv forward")
    return _bsconv_fwd_tma_kernel[(programs,)](
        _x_desc(x, geom, (tn, th, tw), kw["BLOCK_K"]),
        descriptor(store_matrix(store), [kw["BLOCK_N"], kw["BLOCK_K"]]), meta.element_state,
        bias if bias is not None else x, _box_desc(y, [tn, th, tw, kw["BLOCK_N"]]),
        meta.row_offsets, tab, aux, meta.row_order,
        gh, gw, m, geom.c_out, fixed_base,
        HAS_BIAS=bias is not None, PHASED=_phased(geom), TN=tn, TH=th, TW=tw,
        **kernel_constexprs(bm, bk, meta, x.dtype, x.device, cfg),
    )  # fmt: skip


def input_grad(dy, store, dx, meta: Meta, geom: ConvGeom, bm: int, bk: int, fixed_base: int, lines, cfg):
    """Launch the descriptor input gradient over ``lines`` (``bsconv_tables.input_grad_lines``)."""
    kw = cfg.kwargs
    cpb = geom.c_pad // bk
    hq, wq = triton.cdiv(geom.h, geom.stride_h), triton.cdiv(geom.w, geom.stride_w)
    (tn, th, tw), (gn, gh, gw) = _grid_of(kw["BLOCK_M"], geom.n, hq, wq)
    offsets, pairs, aux, order = lines
    tab, aux = rect_input_grad_table(pairs, bm), padded_aux(aux)
    n_lines = geom.stride_h * geom.stride_w * cpb
    programs = _programs(gn * gh * gw * n_lines * (bk // kw["BLOCK_K"]), "the conv input gradient")
    return _bsconv_dx_tma_kernel[(programs,)](
        _box_desc(dy, [tn, th, tw, kw["BLOCK_N"]]),
        descriptor(store_matrix(store), [kw["BLOCK_N"], kw["BLOCK_K"]]), meta.element_state, dx,
        offsets, tab, aux, order,
        gh, gw, gn * gh * gw * kw["BLOCK_M"], geom.n, geom.c_in, geom.h, geom.w, cpb, fixed_base,
        geom.stride_h, geom.stride_w, geom.pad_h, geom.pad_w, *dx.stride(),
        TN=tn, TH=th, TW=tw, **kernel_constexprs(bm, bk, meta, dy.dtype, dy.device, cfg),
    )  # fmt: skip


def weight_grad(dy, x, meta: Meta, geom: ConvGeom, bm: int, bk: int, cfg, target, rects_per_split, nsplit, stride_dws):
    """Launch the descriptor weight gradient's ``nsplit`` splits of ``rects_per_split`` rectangles into ``target``."""
    kw = cfg.kwargs
    (tn, th, tw), (gn, gh, gw), inner = wgrad_tiling(kw["BLOCK_M"], geom.n, geom.h_out, geom.w_out)
    sub = (bm // kw["BLOCK_N"]) * (bk // kw["BLOCK_K"])
    bn = kw["BLOCK_N"]
    dy_desc = _batch_inner_desc(dy, [th, tw, tn, bn]) if inner else _box_desc(dy, [tn, th, tw, bn])
    return _bsconv_dw_tma_kernel[(meta.train_index.numel() * sub, nsplit)](
        dy_desc, _x_desc(x, geom, (tn, th, tw), kw["BLOCK_K"], inner),
        meta.element_state, target,
        meta.train_index, meta.train_rank, meta.train_left, meta.row_indices, meta.col_indices, meta.aux,
        gh, gw, gn * gh * gw, geom.c_in, geom.kw, geom.c_pad // bk, rects_per_split,
        geom.stride_h, geom.stride_w, geom.pad_h, geom.pad_w, geom.dil_h, geom.dil_w, stride_dws,
        PHASED=_phased(geom), WRAP_W=gw > 1, BATCH_INNER=inner, TN=tn, TH=th, TW=tw,
        **kernel_constexprs(bm, bk, meta, x.dtype, x.device, cfg),
    )  # fmt: skip


def rect_count(block_m: int, n: int, h: int, w: int) -> int:
    """How many ``block_m``-token tiles of :func:`wgrad_tiling` cover ``n`` images of ``h x w`` (the weight
    gradient's reduction)."""
    _, (gn, gh, gw), _ = wgrad_tiling(block_m, n, h, w)
    return gn * gh * gw
