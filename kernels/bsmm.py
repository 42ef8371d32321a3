"""Block-sparse matmul for ``Y = X @ W.T`` with a three-state block-sparse ``W``.

Why one file of this size: it is one operation family (STYLE.md 2), the forward, input-gradient
and weight-gradient kernels with their launchers, under the 600 lines STYLE.md sets for a split;
the autotuner and configs are in ``configs.py``, the checks in ``launch.py``, tiles in ``tiles.py``.

Import path: ``sparsekern.kernels.bsmm`` (this folder, ``kernels/``, installs as ``sparsekern.kernels``).

Shapes and conventions (``M`` tokens, ``N`` out features, ``K`` in features):

* ``x``: ``(M, K)``, any strides. ``dy``: ``(M, N)``, any strides.
* ``W`` is ``(N, K)`` cut into ``(bm, bk)`` blocks. Its values live in
  ``w_train (n_train, bm, bk)`` and ``w_frozen (n_frozen + n_mixed, bm, bk)``,
  which the kernels read as one store ``[w_train | w_frozen]``
  (``kernels/store.py``): block ``p`` is ``store[storage[p]]``, one address
  formula for trainable and frozen blocks alike (see ``sparsekern/layout.py``
  for the worked example).

=================  =======================  ====================================
pass               product                  traversal
=================  =======================  ====================================
forward            ``Y = X @ W.T (+ b)``    computed blocks of each block row
input gradient     ``dX = dY @ W``          computed blocks of each block column
weight gradient    ``dW_b = dY_r.T @ X_c``  one program per trainable block
=================  =======================  ====================================

The sparsity block is independent of the kernel tile: a program covers
``BLOCK_N`` of a block's ``bm`` rows and steps through its ``bk`` columns in
``BLOCK_K`` chunks, so any block size in {16, 32, 64, 128} (square or not) runs.
Edges need no divisibility: loads past ``M``/``N``/``K`` are masked, and the
overhang of edge blocks holds zeros.

Main loops: a line's next block index and slot are loaded one iteration
ahead into loop-carried scalars (``tiles._prefetch_packed``), so the pipeliner keeps
``num_stages`` tiles in flight; the input gradient reads ``storage_t`` (slots
in transposed order), one indirection like the forward. On sm_90 the dense
operands, the value store and the outputs go through TMA descriptors
(``launch.use_tma``), whose bounds replace edge masks; elsewhere (sm_80,
operands a descriptor cannot describe) the same loops run on pointers with
masked loads, pipelined by cp.async.

Load balance: forward and input-gradient programs visit block rows (columns)
longest first (``row_order``/``col_order``), so a dense row starts in the first
wave instead of serialising the tail. The weight gradient splits the token
reduction when there are too few trainable blocks to fill the GPU.

Precision: operands are loaded in their dtype and accumulated in fp32. fp32
uses TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` is set. Under
Triton's interpreter, bf16 ``tl.dot`` is wrong, so bf16 tiles are upcast to
fp32 there (``UPCAST``); compiled kernels never upcast.

The kernels use only Triton builtins (no ``tl.cdiv``/``tl.zeros``, which are
``@jit`` helpers): if ``triton`` was imported before the interpreter was
switched on, those helpers stay compiled-only and fail inside interpreted
kernels.

Offsets into activations are int64, so ``M * K`` beyond 2**31 is safe; block
indices are int32 (at most 2**31 blocks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs as cfgs
from .launch import (
    INTERPRET,
    check,
    check_bias,
    check_dtype,
    check_values,
    descriptor,
    kernel_constexprs,
    use_tma,
    weight_operand,
)
from .meta import Meta
from .splits import launch_split, split_rows, wgrad_splits
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

# split_rows and wgrad_splits stay importable from here (splits.py holds them since issue 13).
__all__ = [
    "INTERPRET",
    "Meta",
    "bsmm_forward",
    "bsmm_input_grad",
    "bsmm_weight_grad",
    "split_rows",
    "tuned_records",
    "wgrad_splits",
]
tuned_records = cfgs.tuned_records


# --------------------------------------------------------------------- kernels
@triton.jit
def _bsmm_fwd_kernel(
    # pointers (x, w, y: tensor descriptors when USE_TMA)
    x_ptr,
    w_ptr,
    es_ptr,
    bias_ptr,
    y_ptr,
    # layout
    row_offsets_ptr,
    col_slot_ptr,
    aux_ptr,
    row_order_ptr,
    # shapes
    M,
    N,
    K,
    fixed_base,
    # strides
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yn,
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
    """``y[m, r*BM + n] = sum_blocks x[m, c*BK + k] * W_rc[n, k] (+ bias)``.

    Grid: ``cdiv(M, BLOCK_M) * RB * (BM // BLOCK_N)``, token tiles fastest so
    that the programs of one (long) block row are launched together. With
    ``USE_TMA``, ``x_ptr``/``y_ptr`` are descriptors over ``(M, K)``/``(M, N)``
    with blocks ``[BLOCK_M, BLOCK_K]``/``[BLOCK_M, BLOCK_N]`` and ``w_ptr`` one
    over the store as ``(n_slots * BM, BK)`` with blocks ``[BLOCK_N, BLOCK_K]``.
    """
    tl.static_assert(BM % BLOCK_N == 0, "BLOCK_N must divide the block's rows")
    tl.static_assert(BK % BLOCK_K == 0, "BLOCK_K must divide the block's columns")
    SUB_N: tl.constexpr = BM // BLOCK_N
    SUB_K: tl.constexpr = BK // BLOCK_K
    LOG_SUB_K: tl.constexpr = (SUB_K >= 2) + (SUB_K >= 4) + (SUB_K >= 8)
    pid_m, sub_n, r, start, end = _line_program(row_order_ptr, row_offsets_ptr, M, BLOCK_M, SUB_N)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    if not USE_TMA:
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    # SWAP_AB computes the tile as y^T = W x^T: tokens then sit on the MMA's
    # wide N side (wgmma is m64nNk16) instead of the block's narrow BLOCK_N.
    if SWAP_AB:
        acc = tl.full((BLOCK_N, BLOCK_M), 0.0, dtype=tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    c, s, a = _prefetch_packed(col_slot_ptr, aux_ptr, start, end, HAS_MIXED)
    for it in range(start * SUB_K, end * SUB_K):
        # The next iteration's block, loaded now: no load below feeds an address of this iteration.
        # (it >= 0, so a shift and a mask stand in for // and %, which on signed ints cost a sign fix.)
        c_n, s_n, a_n = _prefetch_packed_next(col_slot_ptr, aux_ptr, (it + 1) >> LOG_SUB_K, end, HAS_MIXED)
        kk = (it & (SUB_K - 1)) * BLOCK_K
        k0 = c * BK + kk
        if USE_TMA:
            x = x_ptr.load([m0, k0])
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_rows + offs_k.to(tl.int64)[None, :] * stride_xk,
                mask=mask_m[:, None] & (offs_k < K)[None, :],
                other=0.0,
            )
        w = _weight_tile(w_ptr, es_ptr, s, a, fixed_base, sub_n * BLOCK_N, kk, BLOCK_N, BLOCK_K, BM, BK,
                         HAS_MIXED, USE_TMA)  # fmt: skip
        acc = _mma_weight(x, w, acc, True, SWAP_AB, DOT_PRECISION, UPCAST)
        c, s, a = c_n, s_n, a_n

    n0 = r * BM + sub_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = _add_bias(acc, bias_ptr, offs_n, mask_n, HAS_BIAS, SWAP_AB)
    if USE_TMA:  # the descriptor clips the tile at M and N
        y_ptr.store([m0, n0], acc.to(y_ptr.dtype))
    else:
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _bsmm_dx_kernel(
    # pointers (dy, w, dx: tensor descriptors when USE_TMA)
    dy_ptr,
    w_ptr,
    es_ptr,
    dx_ptr,
    # layout
    col_offsets_ptr,
    row_slot_t_ptr,
    aux_t_ptr,
    col_order_ptr,
    # shapes
    M,
    N,
    K,
    fixed_base,
    # strides
    stride_dym,
    stride_dyn,
    stride_dxm,
    stride_dxk,
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
    """``dx[m, c*BK + k] = sum_blocks dy[m, r*BM + n] * W_rc[n, k]``.

    Walks block column ``c`` through the transposed traversal (``row_slot_t``,
    each block's row and slot in one entry: one indirection); ``BLOCK_K`` is the output slice of the
    block's columns, ``BLOCK_N`` the reduction step. Descriptors (``USE_TMA``):
    ``dy`` blocks ``[BLOCK_M, BLOCK_N]``, ``w`` ``[BLOCK_N, BLOCK_K]``, ``dx``
    ``[BLOCK_M, BLOCK_K]``.
    """
    tl.static_assert(BM % BLOCK_N == 0, "BLOCK_N must divide the block's rows")
    tl.static_assert(BK % BLOCK_K == 0, "BLOCK_K must divide the block's columns")
    SUB_N: tl.constexpr = BM // BLOCK_N
    SUB_K: tl.constexpr = BK // BLOCK_K
    LOG_SUB_N: tl.constexpr = (SUB_N >= 2) + (SUB_N >= 4) + (SUB_N >= 8)
    pid_m, sub_k, c, start, end = _line_program(col_order_ptr, col_offsets_ptr, M, BLOCK_M, SUB_K)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    if not USE_TMA:
        dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
    if SWAP_AB:  # dx^T = W^T dy^T, as in the forward kernel
        acc = tl.full((BLOCK_K, BLOCK_M), 0.0, dtype=tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_K), 0.0, dtype=tl.float32)
    r, s, a = _prefetch_packed(row_slot_t_ptr, aux_t_ptr, start, end, HAS_MIXED)
    for it in range(start * SUB_N, end * SUB_N):
        r_n, s_n, a_n = _prefetch_packed_next(row_slot_t_ptr, aux_t_ptr, (it + 1) >> LOG_SUB_N, end, HAS_MIXED)
        nn = (it & (SUB_N - 1)) * BLOCK_N
        n0 = r * BM + nn
        if USE_TMA:
            dy = dy_ptr.load([m0, n0])
        else:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            dy = tl.load(
                dy_rows + offs_n.to(tl.int64)[None, :] * stride_dyn,
                mask=mask_m[:, None] & (offs_n < N)[None, :],
                other=0.0,
            )
        w = _weight_tile(w_ptr, es_ptr, s, a, fixed_base, nn, sub_k * BLOCK_K, BLOCK_N, BLOCK_K, BM, BK,
                         HAS_MIXED, USE_TMA)  # fmt: skip
        acc = _mma_weight(dy, w, acc, False, SWAP_AB, DOT_PRECISION, UPCAST)
        r, s, a = r_n, s_n, a_n
    if SWAP_AB:
        acc = tl.trans(acc)

    k0 = c * BK + sub_k * BLOCK_K
    if USE_TMA:
        dx_ptr.store([m0, k0], acc.to(dx_ptr.dtype))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k.to(tl.int64)[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_k < K)[None, :])


@triton.jit
def _bsmm_dw_kernel(
    # pointers (dy, and x when GROUP == 1: tensor descriptors when USE_TMA)
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
    N,
    K,
    rows_per_split,
    # strides
    stride_dym,
    stride_dyn,
    stride_xm,
    stride_xk,
    stride_dws,
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
    GROUP: tl.constexpr,
):
    """``dw[t] = (dy[:, rows of r].T @ x[:, cols of c]) * trainable`` for trainable blocks ``t``.

    A program owns a run of up to ``GROUP`` trainable blocks of one block row:
    ``dy`` is loaded once per token step and the blocks' ``x`` columns are
    gathered side by side into one ``(BLOCK_M, GROUP * BLOCK_K)`` operand, so
    the MMA is ``GROUP`` times wider than a block. Programs whose block does
    not start a run (``train_rank % GROUP != 0``) exit at once. Every index is
    loaded before the token loop, so the loop pipelines as a dense GEMM's.

    With ``USE_TMA`` the ``dy`` tile (and with ``GROUP == 1`` the ``x`` tile)
    comes through a descriptor with blocks ``[BLOCK_M, BLOCK_N]``
    (``[BLOCK_M, BLOCK_K]``); ``rows_per_split`` is then a multiple of
    ``BLOCK_M``, so only the last split reaches the descriptor's bound ``M``.

    Grid: ``(n_train * (BM // BLOCK_N) * (BK // BLOCK_K), splits)``. Split
    ``j`` reduces tokens ``[j * rows_per_split, (j + 1) * rows_per_split)`` and
    writes ``dw[j]`` (``stride_dws`` apart); the launcher sums the splits.
    Positions that are not trainable (mixed blocks) and the overhang get 0.
    """
    tl.static_assert(BM % BLOCK_N == 0, "BLOCK_N must divide the block's rows")
    tl.static_assert(BK % BLOCK_K == 0, "BLOCK_K must divide the block's columns")
    tl.static_assert(GROUP == 1 or BLOCK_K == BK, "grouped blocks are gathered whole")
    WIDE: tl.constexpr = GROUP * BLOCK_K
    X_TMA: tl.constexpr = USE_TMA and GROUP == 1
    leads, t0, r, member, in_group, b, c, offs_bk, offs_bn = _wgrad_run(
        train_index_ptr, train_rank_ptr, train_left_ptr, row_indices_ptr, col_indices_ptr,
        BM, BK, BLOCK_N, BLOCK_K, GROUP,
    )  # fmt: skip
    if not leads:
        return
    offs_k = c * BK + offs_bk
    mask_k = in_group & (offs_k < K)
    offs_n = r * BM + offs_bn
    mask_n = offs_n < N
    # Tile corners for the descriptors: the run's first block (the only one when X_TMA).
    sub = tl.program_id(0) % ((BM // BLOCK_N) * (BK // BLOCK_K))
    n0 = r * BM + (sub // (BK // BLOCK_K)) * BLOCK_N
    k0 = tl.load(col_indices_ptr + tl.load(train_index_ptr + t0)) * BK + (sub % (BK // BLOCK_K)) * BLOCK_K

    split = tl.program_id(1)
    m_start = split * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    acc = tl.full((BLOCK_N, WIDE), 0.0, dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        if USE_TMA:
            dyt = tl.trans(dy_ptr.load([m0, n0]))  # wgmma reads the transposed tile from shared memory
        else:
            # Loaded as dy^T: a transposed register tile would not be pipelined through shared memory
            # on sm_80 (compiled offline, one dy buffer instead of num_stages - 1).
            dyt = tl.load(
                dy_ptr + offs_n.to(tl.int64)[:, None] * stride_dyn + offs_m.to(tl.int64)[None, :] * stride_dym,
                mask=mask_n[:, None] & mask_m[None, :],
                other=0.0,
            )
        if X_TMA:
            x = x_ptr.load([m0, k0])
        else:
            x = tl.load(
                x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
        acc = _mma(dyt, x, acc, DOT_PRECISION, UPCAST)
    _wgrad_store(acc, dw_ptr, es_ptr, aux_ptr, stride_dws, t0, member, in_group, b, offs_bk, offs_bn, BM, BK, HAS_MIXED)


# ------------------------------------------------------------------ launchers
def bsmm_forward(
    x: torch.Tensor,
    w_train: torch.Tensor,
    w_frozen: torch.Tensor,
    bias: torch.Tensor | None,
    meta: Meta,
    n_out: int,
    n_frozen: int,
    *,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``y = x @ W.T + bias`` over the computed blocks; returns ``(M, n_out)``."""
    bm, bk = check_values(w_train, w_frozen, x.dtype, x.device)
    check("x", x, 2, x.dtype, x.device)
    m, k = x.shape
    check_bias(bias, n_out, x.dtype, x.device)
    y = out if out is not None else x.new_empty(m, n_out)
    rb = meta.row_offsets.numel() - 1
    if not (m and rb):
        return y
    store = value_store(w_train, w_frozen)
    tma = use_tma(x.device, x, y, store_matrix(store))

    def run(cfg):
        kw = cfg.kwargs
        tm, tn, tk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
        xa, ya = (descriptor(x, [tm, tk]), descriptor(y, [tm, tn])) if tma else (x, y)
        grid = (triton.cdiv(m, tm) * rb * (bm // tn),)
        return _bsmm_fwd_kernel[grid](
            xa, weight_operand(store, tma, tn, tk), meta.element_state, bias if bias is not None else x, ya,
            meta.row_offsets, meta.col_slot.view(torch.int64), meta.aux, meta.row_order,
            m, n_out, k, w_train.shape[0] + n_frozen,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, USE_TMA=tma, **kernel_constexprs(bm, bk, meta, x.dtype, x.device, cfg),
        )  # fmt: skip

    run(cfgs.pick_config("fwd", x.dtype, x.device, bm, bk, m, run, config))
    return y


def bsmm_input_grad(
    dy: torch.Tensor,
    w_train: torch.Tensor,
    w_frozen: torch.Tensor,
    meta: Meta,
    n_in: int,
    n_frozen: int,
    *,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``dx = dy @ W`` over the computed blocks; returns ``(M, n_in)``."""
    bm, bk = check_values(w_train, w_frozen, dy.dtype, dy.device)
    check("dy", dy, 2, dy.dtype, dy.device)
    m, n = dy.shape
    dx = out if out is not None else dy.new_empty(m, n_in)
    cb = meta.col_offsets.numel() - 1
    if not (m and cb):
        return dx
    store = value_store(w_train, w_frozen)
    tma = use_tma(dy.device, dy, dx, store_matrix(store))

    def run(cfg):
        kw = cfg.kwargs
        tm, tn, tk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
        da, xa = (descriptor(dy, [tm, tn]), descriptor(dx, [tm, tk])) if tma else (dy, dx)
        grid = (triton.cdiv(m, tm) * cb * (bk // tk),)
        return _bsmm_dx_kernel[grid](
            da, weight_operand(store, tma, tn, tk), meta.element_state, xa,
            meta.col_offsets, meta.row_slot_t.view(torch.int64), meta.aux_t, meta.col_order,
            m, n, n_in, w_train.shape[0] + n_frozen,
            dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
            USE_TMA=tma, **kernel_constexprs(bm, bk, meta, dy.dtype, dy.device, cfg),
        )  # fmt: skip

    run(cfgs.pick_config("dx", dy.dtype, dy.device, bm, bk, m, run, config))
    return dx


def bsmm_weight_grad(
    dy: torch.Tensor,
    x: torch.Tensor,
    meta: Meta,
    block_size: tuple[int, int],
    *,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Gradient of the trainable blocks, ``(n_train, bm, bk)`` in ``w_train`` order."""
    bm, bk = block_size
    check_dtype(x.dtype)
    check("dy", dy, 2, x.dtype, x.device)
    check("x", x, 2, x.dtype, x.device)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy has {dy.shape[0]} rows, x has {x.shape[0]}")
    m, n = dy.shape
    k = x.shape[1]
    n_train = meta.train_index.numel()
    dw = out if out is not None else x.new_empty(n_train, bm, bk)
    if n_train == 0:
        return dw
    if m == 0:
        return dw.zero_()
    tma = use_tma(x.device, dy, x)

    def run(cfg):
        kw = cfg.kwargs
        tm, group = kw["BLOCK_M"], kw.get("GROUP", 1)
        sub = (bm // kw["BLOCK_N"]) * (bk // kw["BLOCK_K"])
        da = descriptor(dy, [tm, kw["BLOCK_N"]]) if tma else dy
        xa = descriptor(x, [tm, kw["BLOCK_K"]]) if tma and group == 1 else x

        def launch(target, rows_per_split, nsplit, stride_dws):
            return _bsmm_dw_kernel[(n_train * sub, nsplit)](
                da, xa, meta.element_state, target,
                meta.train_index, meta.train_rank, meta.train_left, meta.row_indices, meta.col_indices, meta.aux,
                m, n, k, rows_per_split,
                dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), stride_dws,
                USE_TMA=tma, **kernel_constexprs(bm, bk, meta, x.dtype, x.device, cfg),
            )  # fmt: skip

        return launch_split(dw, (n_train, bm, bk), m, triton.cdiv(n_train, group) * sub, tm, splits, launch)

    # The best grouping and split depend on how many blocks there are, so the key carries that too.
    run(cfgs.pick_config("wgrad", x.dtype, x.device, bm, bk, m, run, config, blocks=n_train))
    return dw
