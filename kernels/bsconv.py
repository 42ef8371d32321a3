"""Block-sparse 2-D convolution as an implicit GEMM, with a three-state block-sparse weight.

The weight is the matrix view of ``sparsekern/convview.py``: ``(Cout, Cin, kh, kw)``
becomes ``(Cout, kh*kw*c_pad)`` with ``K`` ordered ``(kh, kw, Cin)`` and ``Cin``
padded to ``c_pad`` (a multiple of ``bk``) inside each tap, so block column ``c``
is tap ``t = c // CPB`` (``CPB = c_pad // bk`` channel blocks per tap),
``(r, s) = divmod(t, kw)``, input channels ``(c % CPB)*bk + [0, bk)``. Its values,
``Meta`` and ``n_frozen`` are exactly those of ``kernels/bsmm.py``.

Shapes and conventions:

* ``x``: ``(N, Cin, H, W)``; ``dy``/``y``: ``(N, Cout, Ho, Wo)``; ``dx``:
  ``(N, Cin, H, W)``. Any strides: the kernels take all four, so NCHW and
  channels_last both run without a copy. channels_last (channels contiguous) is
  the native case: a tile's channel slice is one contiguous run per pixel.
  Outputs the launchers allocate are channels_last.
* A *token* is an output pixel ``m = (n*Ho + ho)*Wo + wo`` (``M = N*Ho*Wo``); the
  input pixel of token ``m`` at tap ``(r, s)`` is
  ``(ho*stride_h - pad_h + r*dil_h, wo*stride_w - pad_w + s*dil_w)``.
  ``pad_h``/``pad_w`` are the top/left paddings; bottom/right are implied by
  ``Ho``/``Wo`` (asymmetric ``'same'`` padding works).
* ``geom`` is a :class:`~sparsekern.kernels.meta.ConvGeom`
  (``sparsekern.convview.conv_geometry``).

=================  ==========================================  =========================================
pass               product                                     traversal
=================  ==========================================  =========================================
forward            ``Y = im2col(X) @ W.T (+ b)``               computed blocks of each block row (CSR)
input gradient     ``dX = col2im(dY @ W)``, as a transposed    per (input-channel block, stride phase):
                   conv: ``dx[p] += dy[q] @ W_t`` for the      each tap that hits the phase, then the
                   output pixel ``q`` that reads ``p`` at tap  computed blocks of column ``(tap,
                   ``t``                                       channel block)`` (transposed traversal)
weight gradient    ``dW_b = dY_r.T @ im2col(X)_c``             runs of up to ``GROUP`` trainable blocks
                                                               of a block row, sharing ``dy``
=================  ==========================================  =========================================

``im2col(X)`` is never built: each ``(tokens x channels)`` tile is gathered
straight from ``x`` with masked loads (zero outside the image and for
channels ``>= Cin``). The input gradient is a gather too, never a scatter:
a program owns a tile of input pixels and a channel slice, and for each tap
reads the ``dy`` pixel ``ho = (h + pad_h - r*dil_h) / stride_h`` where that is
a whole number inside the output (masked to zero elsewhere). Strided convs are
split into stride phases (pixels with the same ``(h + pad_h) % stride_h`` and
``(w + pad_w) % stride_w``), one phase per program, so that a program runs
only the taps that hit its phase (a quarter of them at stride 2). Each ``dx``
element is written once, so no atomics and no zero-fill are needed.

Load balance: forward programs visit block rows longest first (``row_order``);
input-gradient programs visit input-channel blocks by their block count over
all taps, longest first (computed per launch from ``col_offsets`` with
vectorised torch). The weight gradient splits the token reduction when there
are too few trainable blocks to fill the GPU (``bsmm.wgrad_splits``).

Precision, configs, the interpreter's bf16 upcast and the builtins-only rule
are those of ``kernels/bsmm.py``, whose jit helpers (``kernels/tiles.py``)
and config machinery this module reuses;
a conv kind (``conv_fwd``/``conv_dx``/``conv_wgrad``) shares its matmul twin's
candidates and default but is tuned under its own key.

Known limits:

* Input-gradient programs of a stride phase cover ``cdiv(H, stride_h)`` rows
  (``W`` likewise); when ``stride_h`` does not divide ``H`` some phases have a
  masked last row. Pixels no tap reaches (``stride > dilation*(k-1)+1``) are
  still visited and written as zeros.
* Groups (depthwise/grouped conv), 1-D/3-D convs and padding modes other than
  zeros are not supported.
* Offsets into activations are int64; block indices and the token count
  ``N*Ho*Wo`` (and ``N*H*W``) are int32, as are the per-tap pixel coordinates.
* Gathering the ``x`` tile costs integer work a dense ``(M, K)`` operand does
  not (one division per token per program, a bounds mask per tap), and NCHW
  inputs read a channel slice with a stride of ``H*W`` elements; use
  channels_last for speed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import bsmm
from .meta import ConvGeom, Meta
from .tiles import _line_program, _mma, _mma_weight, _wgrad_run, _wgrad_store

__all__ = ["bsconv_forward", "bsconv_input_grad", "bsconv_weight_grad", "ConvGeom", "Meta"]

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
    # pointers
    x_ptr,
    wt_ptr,
    wf_ptr,
    es_ptr,
    bias_ptr,
    y_ptr,
    # layout
    row_offsets_ptr,
    col_indices_ptr,
    storage_ptr,
    aux_ptr,
    row_order_ptr,
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
    n_frozen,
    conv_stride_h,
    conv_stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """``y[n, r*BM + j, ho, wo] = sum_blocks x[n, ch, hi, wi] * W_rc[j, k] (+ bias)``.

    Block ``(r, c)`` at tap ``t = c // CPB``, ``(kr, ks) = divmod(t, KW)``, reads
    channels ``ch = (c % CPB)*BK + k`` at ``hi = ho*conv_stride_h - pad_h +
    kr*dil_h`` (``wi`` likewise); out-of-image pixels and ``ch >= C_in`` read 0.
    Tokens ``m = (n*H_out + ho)*W_out + wo``, ``M = N*H_out*W_out``.

    Grid: ``cdiv(M, BLOCK_M) * RB * (BM // BLOCK_N)``, as ``_bsmm_fwd_kernel``.
    """
    tl.static_assert(BM % BLOCK_N == 0, "BLOCK_N must divide the block's rows")
    tl.static_assert(BK % BLOCK_K == 0, "BLOCK_K must divide the block's columns")
    SUB_N: tl.constexpr = BM // BLOCK_N
    SUB_K: tl.constexpr = BK // BLOCK_K
    pid_m, sub_n, r, start, end = _line_program(row_order_ptr, row_offsets_ptr, M, BLOCK_M, SUB_N)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_bn = sub_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_bk = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    img, ho, wo = _pixel_coords(offs_m, H_out, W_out)
    h0 = ho * conv_stride_h - pad_h
    w0 = wo * conv_stride_w - pad_w
    x_img = x_ptr + img.to(tl.int64) * stride_xn
    if SWAP_AB:  # tokens on the MMA's wide side, as in _bsmm_fwd_kernel
        acc = tl.full((BLOCK_N, BLOCK_M), 0.0, dtype=tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for it in range(start * SUB_K, end * SUB_K):
        p = it // SUB_K
        kk = (it % SUB_K) * BLOCK_K
        c = tl.load(col_indices_ptr + p)
        s = tl.load(storage_ptr + p)
        a = tl.load(aux_ptr + p) if HAS_MIXED else -1
        tap = c // CPB
        hi = h0 + (tap // KW) * dil_h
        wi = w0 + (tap % KW) * dil_w
        inside = mask_m & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        offs_c = (c % CPB) * BK + kk + offs_bk
        x_rows = x_img + hi.to(tl.int64) * stride_xh + wi.to(tl.int64) * stride_xw
        x = tl.load(
            x_rows[:, None] + offs_c.to(tl.int64)[None, :] * stride_xc,
            mask=inside[:, None] & (offs_c < C_in)[None, :],
            other=0.0,
        )
        acc = _mma_weight(
            x, acc, wt_ptr, wf_ptr, es_ptr, s, a, n_frozen, offs_bn, kk + offs_bk,
            BM, BK, HAS_MIXED, True, SWAP_AB, DOT_PRECISION, UPCAST,
        )  # fmt: skip
    if SWAP_AB:
        acc = tl.trans(acc)

    offs_n = r * BM + offs_bn
    mask_n = offs_n < C_out
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_rows = y_ptr + img.to(tl.int64) * stride_yn + ho.to(tl.int64) * stride_yh + wo.to(tl.int64) * stride_yw
    y_ptrs = y_rows[:, None] + offs_n.to(tl.int64)[None, :] * stride_yc
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _bsconv_dx_kernel(
    # pointers
    dy_ptr,
    wt_ptr,
    wf_ptr,
    es_ptr,
    dx_ptr,
    # layout
    col_offsets_ptr,
    row_indices_t_ptr,
    block_index_t_ptr,
    storage_ptr,
    aux_ptr,
    chan_order_ptr,
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
    KH,
    KW,
    CPB,
    n_frozen,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """``dx[n, cb*BK + k, h, w] = sum_taps sum_blocks dy[n, r*BM + j, ho, wo] * W_rc[j, k]``.

    For tap ``t = (kr, ks)`` the block column is ``c = t*CPB + cb`` and
    ``ho = (h + pad_h - kr*dil_h) / conv_stride_h`` (``wo`` likewise) counts only
    when it divides exactly and lies in ``[0, H_out)``.

    Stride phases: input pixels with the same ``((h + pad_h) % conv_stride_h,
    (w + pad_w) % conv_stride_w)`` are hit by the same taps, so a program owns
    pixels of one phase ``(ph, pw)`` only, ``h = h_first + hq*conv_stride_h``
    (``h_first`` the first row of the phase, ``hq < HQ = cdiv(H,
    conv_stride_h)``, rows past ``H`` masked), and skips the taps that miss its
    phase outright: with stride 2 a program runs a quarter of the taps, not
    all of them on mostly masked operands. ``M = N*HQ*WQ`` pixels per phase,
    ``(n*HQ + hq)*WQ + wq``. ``BLOCK_K`` is the output slice of the block's
    columns, ``BLOCK_N`` the reduction step, as in ``_bsmm_dx_kernel``.

    Grid: ``cdiv(M, BLOCK_M) * (BK // BLOCK_K) * conv_stride_h*conv_stride_w *
    CPB``, pixel tiles fastest, channel blocks slowest, in ``chan_order`` (most
    blocks over all taps first).
    """
    tl.static_assert(BM % BLOCK_N == 0, "BLOCK_N must divide the block's rows")
    tl.static_assert(BK % BLOCK_K == 0, "BLOCK_K must divide the block's columns")
    SUB_N: tl.constexpr = BM // BLOCK_N
    SUB_K: tl.constexpr = BK // BLOCK_K
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M  # not tl.cdiv: see bsmm's module docstring
    rest = pid // num_m
    sub_k = rest % SUB_K
    rest = rest // SUB_K
    phases = conv_stride_h * conv_stride_w
    cb = tl.load(chan_order_ptr + rest // phases)
    ph = (rest % phases) // conv_stride_w
    pw = (rest % phases) % conv_stride_w

    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_bk = sub_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_bn = tl.arange(0, BLOCK_N)
    img, hq, wq = _pixel_coords(offs_m, HQ, WQ)
    # First row/column of the phase; "+ stride) % stride" keeps it non-negative under C and numpy remainders.
    h = ((ph - pad_h) % conv_stride_h + conv_stride_h) % conv_stride_h + hq * conv_stride_h
    w = ((pw - pad_w) % conv_stride_w + conv_stride_w) % conv_stride_w + wq * conv_stride_w
    mask_m = (offs_m < M) & (h < H) & (w < W)
    dy_img = dy_ptr + img.to(tl.int64) * stride_dyn
    if SWAP_AB:  # dx^T = W^T dy^T, as in _bsmm_dx_kernel
        acc = tl.full((BLOCK_K, BLOCK_M), 0.0, dtype=tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_K), 0.0, dtype=tl.float32)
    for t in range(0, KH * KW):
        c = t * CPB + cb
        tap_h = (t // KW) * dil_h
        tap_w = (t % KW) * dil_w
        start = tl.load(col_offsets_ptr + c)
        end = tl.load(col_offsets_ptr + c + 1)
        # A tap either hits every pixel of the phase at a whole output pixel or none: skip the misses.
        phase_hit = ((ph - tap_h) % conv_stride_h == 0) & ((pw - tap_w) % conv_stride_w == 0)
        end = tl.where(phase_hit, end, start)
        hn = h + pad_h - tap_h  # a multiple of conv_stride_h whenever the tap runs
        wn = w + pad_w - tap_w
        ho = hn // conv_stride_h
        wo = wn // conv_stride_w
        hit = mask_m & (hn >= 0) & (wn >= 0) & (ho < H_out) & (wo < W_out)
        dy_rows = dy_img + ho.to(tl.int64) * stride_dyh + wo.to(tl.int64) * stride_dyw
        for it in range(start * SUB_N, end * SUB_N):
            q = it // SUB_N
            nn = (it % SUB_N) * BLOCK_N
            r = tl.load(row_indices_t_ptr + q)
            b = tl.load(block_index_t_ptr + q)
            s = tl.load(storage_ptr + b)
            a = tl.load(aux_ptr + b) if HAS_MIXED else -1
            offs_n = r * BM + nn + offs_bn
            dy = tl.load(
                dy_rows[:, None] + offs_n.to(tl.int64)[None, :] * stride_dyc,
                mask=hit[:, None] & (offs_n < C_out)[None, :],
                other=0.0,
            )
            acc = _mma_weight(
                dy, acc, wt_ptr, wf_ptr, es_ptr, s, a, n_frozen, nn + offs_bn, offs_bk,
                BM, BK, HAS_MIXED, False, SWAP_AB, DOT_PRECISION, UPCAST,
            )  # fmt: skip
    if SWAP_AB:
        acc = tl.trans(acc)

    offs_c = cb * BK + offs_bk
    dx_rows = dx_ptr + img.to(tl.int64) * stride_dxn + h.to(tl.int64) * stride_dxh + w.to(tl.int64) * stride_dxw
    dx_ptrs = dx_rows[:, None] + offs_c.to(tl.int64)[None, :] * stride_dxc
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
    tap = c // CPB
    tap_h = (tap // KW) * dil_h - pad_h
    tap_w = (tap % KW) * dil_w - pad_w
    offs_c = (c % CPB) * BK + offs_bk
    mask_k = in_group & (offs_c < C_in)
    x_cols = offs_c.to(tl.int64) * stride_xc
    offs_n = r * BM + offs_bn
    mask_n = offs_n < C_out
    dy_cols = offs_n.to(tl.int64) * stride_dyc

    split = tl.program_id(1)
    m_start = split * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    acc = tl.full((BLOCK_N, WIDE), 0.0, dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        img, ho, wo = _pixel_coords(offs_m, H_out, W_out)
        img64 = img.to(tl.int64)
        dy_rows = dy_ptr + img64 * stride_dyn + ho.to(tl.int64) * stride_dyh + wo.to(tl.int64) * stride_dyw
        dy = tl.load(dy_rows[:, None] + dy_cols[None, :], mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        hi = (ho * conv_stride_h)[:, None] + tap_h[None, :]
        wi = (wo * conv_stride_w)[:, None] + tap_w[None, :]
        inside = (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        x_ptrs = x_ptr + (img64 * stride_xn)[:, None] + hi.to(tl.int64) * stride_xh + wi.to(tl.int64) * stride_xw
        x = tl.load(x_ptrs + x_cols[None, :], mask=inside & mask_m[:, None] & mask_k[None, :], other=0.0)
        acc = _mma(tl.trans(dy), x, acc, DOT_PRECISION, UPCAST)

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
    bsmm._check(name, t, 4, dtype, device)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape} from the conv geometry")


def _new_act(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def _geom_args(geom: ConvGeom) -> tuple[int, ...]:
    return geom.stride_h, geom.stride_w, geom.pad_h, geom.pad_w, geom.dil_h, geom.dil_w


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
        w_train, w_frozen: the layout's value stores (see ``kernels/bsmm.py``).
        bias: ``(Cout,)`` or ``None``.
        meta: the layout's index tensors (of the ``(Cout, kh*kw*c_pad)`` matrix view).
        geom: the conv geometry (``sparsekern.convview.conv_geometry`` with the block's ``bk``).
        n_frozen: ``layout.n_frozen``.
        out: optional ``(N, Cout, Ho, Wo)`` output, any strides.
        config: explicit kernel config (else tuned data, autotuning or the default).

    Returns:
        ``(N, Cout, Ho, Wo)``; channels_last when allocated here.
    """
    bm, bk = bsmm._check_values(w_train, w_frozen, x.dtype, x.device)
    cpb = _check_geom(geom, meta, bm, bk, x.device)
    _check_frozen_slots(w_frozen, meta, n_frozen)
    _check_act("x", x, (geom.n, geom.c_in, geom.h, geom.w), x.dtype, x.device)
    if bias is not None:
        bsmm._check("bias", bias, 1, x.dtype, x.device)
        if bias.shape[0] != geom.c_out:
            raise ValueError(f"bias has {bias.shape[0]} elements, expected {geom.c_out}")
    y_shape = (geom.n, geom.c_out, geom.h_out, geom.w_out)
    if out is not None:
        _check_act("out", out, y_shape, x.dtype, x.device)
    y = out if out is not None else _new_act(x, y_shape)
    m = geom.n * geom.h_out * geom.w_out
    rb = meta.row_offsets.numel() - 1
    has_mixed = meta.element_state.shape[0] > 0

    def run(cfg):
        programs = triton.cdiv(m, cfg.kwargs["BLOCK_M"]) * rb * (bm // cfg.kwargs["BLOCK_N"])
        _check_grid(programs, "the conv forward")
        return _bsconv_fwd_kernel[(programs,)](
            x, w_train, w_frozen, meta.element_state, bias if bias is not None else x, y,
            meta.row_offsets, meta.col_indices, meta.storage, meta.aux, meta.row_order,
            m, geom.c_in, geom.h, geom.w, geom.c_out, geom.h_out, geom.w_out, geom.kw, cpb, n_frozen,
            *_geom_args(geom),
            *x.stride(), *y.stride(),
            BM=bm, BK=bk, HAS_BIAS=bias is not None, HAS_MIXED=has_mixed,
            DOT_PRECISION=bsmm._dot_precision(x.dtype, x.device),
            UPCAST=bsmm.INTERPRET and x.dtype == torch.bfloat16,
            **bsmm._launch_kw(cfg),
        )  # fmt: skip

    if m and rb:
        run(bsmm._pick_config("conv_fwd", x.dtype, x.device, bm, bk, m, run, config))
    return y


def channel_order(meta: Meta, geom: ConvGeom, bk: int) -> torch.Tensor:
    """Input-channel blocks by their computed-block count over all taps, longest first (int32).

    Example: ``kh*kw = 2`` taps, ``CPB = 2`` channel blocks, ``col_offsets
    [0, 1, 4, 4, 5]`` (columns ``(tap 0, cb 0), (0, 1), (1, 0), (1, 1)`` hold
    1, 3, 0, 1 blocks): counts per channel block ``[1, 4]``, order ``[1, 0]``.
    """
    counts = meta.col_offsets.diff().view(geom.kh * geom.kw, geom.c_pad // bk).sum(0)
    return torch.argsort(counts, descending=True, stable=True).to(torch.int32)


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
    bm, bk = bsmm._check_values(w_train, w_frozen, dy.dtype, dy.device)
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
    phases = geom.stride_h * geom.stride_w
    has_mixed = meta.element_state.shape[0] > 0

    def run(cfg, order):
        programs = triton.cdiv(m, cfg.kwargs["BLOCK_M"]) * cpb * (bk // cfg.kwargs["BLOCK_K"]) * phases
        _check_grid(programs, "the conv input gradient")
        return _bsconv_dx_kernel[(programs,)](
            dy, w_train, w_frozen, meta.element_state, dx,
            meta.col_offsets, meta.row_indices_t, meta.block_index_t, meta.storage, meta.aux, order,
            m, hq, wq, geom.c_in, geom.h, geom.w, geom.c_out, geom.h_out, geom.w_out, geom.kh, geom.kw, cpb,
            n_frozen,
            *_geom_args(geom),
            *dy.stride(), *dx.stride(),
            BM=bm, BK=bk, HAS_MIXED=has_mixed,
            DOT_PRECISION=bsmm._dot_precision(dy.dtype, dy.device),
            UPCAST=bsmm.INTERPRET and dy.dtype == torch.bfloat16,
            **bsmm._launch_kw(cfg),
        )  # fmt: skip

    if m and cpb:
        order = channel_order(meta, geom, bk)
        cfg = bsmm._pick_config("conv_dx", dy.dtype, dy.device, bm, bk, m, lambda c: run(c, order), config)
        run(cfg, order)
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
            ``bsmm.wgrad_splits``); out: optional ``(n_train, bm, bk)`` output.
    """
    bm, bk = block_size
    if x.dtype not in bsmm._SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {x.dtype}; supported: {bsmm._SUPPORTED_DTYPES}")
    cpb = _check_geom(geom, meta, bm, bk, x.device)
    _check_act("x", x, (geom.n, geom.c_in, geom.h, geom.w), x.dtype, x.device)
    _check_act("dy", dy, (geom.n, geom.c_out, geom.h_out, geom.w_out), x.dtype, x.device)
    n_train = meta.train_index.numel()
    if out is not None:
        bsmm._check("out", out, 3, x.dtype, x.device)
        if tuple(out.shape) != (n_train, bm, bk) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {(n_train, bm, bk)} tensor, got {tuple(out.shape)}")
    dw = out if out is not None else x.new_empty(n_train, bm, bk)
    m = geom.n * geom.h_out * geom.w_out
    if n_train == 0:
        return dw
    if m == 0:
        return dw.zero_()
    has_mixed = meta.element_state.shape[0] > 0

    def run(cfg):
        kw = cfg.kwargs
        sub = (bm // kw["BLOCK_N"]) * (bk // kw["BLOCK_K"])
        _check_grid(n_train * sub, "the conv weight gradient")
        nsplit = splits or bsmm.wgrad_splits(m, triton.cdiv(n_train, kw.get("GROUP", 1)) * sub, x.device)
        rows_per_split = triton.cdiv(triton.cdiv(m, nsplit), 128) * 128
        nsplit = triton.cdiv(m, rows_per_split)
        target = dw if nsplit == 1 else torch.empty(nsplit, n_train, bm, bk, device=x.device, dtype=torch.float32)
        kernel = _bsconv_dw_kernel[(n_train * sub, nsplit)](
            dy, x, meta.element_state, target,
            meta.train_index, meta.train_rank, meta.train_left, meta.row_indices, meta.col_indices, meta.aux,
            m, geom.c_in, geom.h, geom.w, geom.c_out, geom.h_out, geom.w_out, geom.kw, cpb, rows_per_split,
            *_geom_args(geom),
            *dy.stride(), *x.stride(), target.stride(0) if nsplit > 1 else 0,
            BM=bm, BK=bk, HAS_MIXED=has_mixed,
            DOT_PRECISION=bsmm._dot_precision(x.dtype, x.device),
            UPCAST=bsmm.INTERPRET and x.dtype == torch.bfloat16,
            **bsmm._launch_kw(cfg),
        )  # fmt: skip
        if nsplit > 1:
            torch.sum(target, dim=0, out=dw) if dw.dtype == torch.float32 else dw.copy_(target.sum(0))
        return kernel

    run(bsmm._pick_config("conv_wgrad", x.dtype, x.device, bm, bk, m, run, config, blocks=n_train))
    return dw
