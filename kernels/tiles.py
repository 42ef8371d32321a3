"""Tile helpers shared by the block-sparse kernels of ``bsmm.py`` (linear) and ``bsconv.py`` (conv).

Each is a ``@triton.jit`` function inlined into the kernels that call it: the
MMA with its precision switch, the three-state weight-tile load, and the
decoding of a program id into its work (a weight line for the forward and
input-gradient kernels, a run of trainable blocks for the weight gradient)
with the matching weight-gradient store. Like the kernels, they use only
Triton builtins, so they also run under the interpreter (see ``bsmm.py``).
"""

import triton
import triton.language as tl


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _load_w_tile(
    wt_ptr,
    wf_ptr,
    es_ptr,
    s,
    a,
    n_frozen,
    offs,
    BLOCK_ELEMS: tl.constexpr,
    HAS_MIXED: tl.constexpr,
):
    """Load a tile of one weight block at in-block offsets ``offs``.

    ``s >= 0`` reads the trainable store, ``s < 0`` the frozen slot ``-s - 1``.
    A trainable mixed block (``a >= 0``) takes its non-trainable elements from
    its fixed slot, so optimizer drift in those positions is never seen.
    """
    base = tl.where(s >= 0, wt_ptr + s.to(tl.int64) * BLOCK_ELEMS, wf_ptr + (-s - 1).to(tl.int64) * BLOCK_ELEMS)
    w = tl.load(base + offs)
    if HAS_MIXED:
        if a >= 0:
            e = tl.load(es_ptr + a.to(tl.int64) * BLOCK_ELEMS + offs)
            f = tl.load(wf_ptr + (n_frozen + a).to(tl.int64) * BLOCK_ELEMS + offs)
            w = tl.where(e == 2, w, f)
    return w


@triton.jit
def _line_program(order_ptr, offsets_ptr, M, BLOCK_M: tl.constexpr, SUB: tl.constexpr):
    """Decode a forward/input-gradient program id into its token tile and weight line.

    A *line* is a block row (forward) or block column (input gradient); lines
    are visited in ``order`` (longest first), each split into ``SUB`` output
    slices, with token tiles fastest so that a line's programs launch together.
    Returns ``(pid_m, sub, line, start, end)``, ``[start, end)`` being the
    line's positions in the traversal.
    """
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M  # not tl.cdiv: see the module docstring
    rest = pid // num_m
    line = tl.load(order_ptr + rest // SUB)
    return pid % num_m, rest % SUB, line, tl.load(offsets_ptr + line), tl.load(offsets_ptr + line + 1)


@triton.jit
def _wgrad_run(
    train_index_ptr,
    train_rank_ptr,
    train_left_ptr,
    row_indices_ptr,
    col_indices_ptr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    """Decode a weight-gradient program: its run of up to ``GROUP`` trainable blocks of one block row.

    Returns ``(leads, t0, r, member, in_group, b, c, offs_bk, offs_bn)``:
    ``leads`` is False for a program whose block does not start a run (it has
    nothing to do); column ``j`` of the wide ``GROUP * BLOCK_K`` tile is column
    ``offs_bk[j]`` of run member ``member[j]`` (CSR position ``b[j]``, block
    column ``c[j]``); ``offs_bn`` are the tile's rows within the block row ``r``.
    """
    SUB_N: tl.constexpr = BM // BLOCK_N
    SUB_K: tl.constexpr = BK // BLOCK_K
    WIDE: tl.constexpr = GROUP * BLOCK_K
    pid = tl.program_id(0)
    t0 = pid // (SUB_N * SUB_K)
    sub = pid % (SUB_N * SUB_K)
    leads = tl.load(train_rank_ptr + t0) % GROUP == 0
    count = tl.minimum(tl.load(train_left_ptr + t0), GROUP)
    r = tl.load(row_indices_ptr + tl.load(train_index_ptr + t0))
    offs_j = tl.arange(0, WIDE)
    member = offs_j // BLOCK_K
    in_group = member < count
    b = tl.load(train_index_ptr + t0 + member, mask=in_group, other=0)
    c = tl.load(col_indices_ptr + b, mask=in_group, other=0)
    offs_bk = (sub % SUB_K) * BLOCK_K + offs_j % BLOCK_K
    offs_bn = (sub // SUB_K) * BLOCK_N + tl.arange(0, BLOCK_N)
    return leads, t0, r, member, in_group, b, c, offs_bk, offs_bn


@triton.jit
def _wgrad_store(
    acc,
    dw_ptr,
    es_ptr,
    aux_ptr,
    stride_dws,
    t0,
    member,
    in_group,
    b,
    offs_bk,
    offs_bn,
    BM: tl.constexpr,
    BK: tl.constexpr,
    HAS_MIXED: tl.constexpr,
):
    """Store a run's ``(BLOCK_N, GROUP * BLOCK_K)`` tile into ``dw[split]``, zero off the trainable elements."""
    local = offs_bn[:, None] * BK + offs_bk[None, :]
    if HAS_MIXED:
        a = tl.load(aux_ptr + b, mask=in_group, other=-1)
        e = tl.load(es_ptr + a.to(tl.int64)[None, :] * (BM * BK) + local, mask=(a >= 0)[None, :], other=2)
        acc = tl.where(e == 2, acc, 0.0)
    t = (t0 + member).to(tl.int64)
    dw_ptrs = dw_ptr + tl.program_id(1).to(tl.int64) * stride_dws + t[None, :] * (BM * BK) + local
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=in_group[None, :])


@triton.jit
def _mma_weight(
    act,
    acc,
    wt_ptr,
    wf_ptr,
    es_ptr,
    s,
    a,
    n_frozen,
    w_rows,
    w_cols,
    BM: tl.constexpr,
    BK: tl.constexpr,
    HAS_MIXED: tl.constexpr,
    TRANS_W: tl.constexpr,
    SWAP_AB: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``acc += act @ op(W_tile)`` for the tile ``w_rows x w_cols`` of one stored block.

    ``op`` is the transpose for the forward (``TRANS_W``: ``act`` holds input
    features, the result output features) and the identity for the input
    gradient. With ``SWAP_AB`` the accumulator is held transposed and the
    product runs as ``op(W)^T @ act^T``, which puts the tokens on the MMA's
    wide side (wgmma is m64nNk16) instead of the block's narrow side.
    """
    if TRANS_W != SWAP_AB:  # the tile is loaded as W^T: (w_cols, w_rows)
        offs = w_rows[None, :] * BK + w_cols[:, None]
    else:  # as W: (w_rows, w_cols)
        offs = w_rows[:, None] * BK + w_cols[None, :]
    w = _load_w_tile(wt_ptr, wf_ptr, es_ptr, s, a, n_frozen, offs, BM * BK, HAS_MIXED)
    if SWAP_AB:
        acc = _mma(w, tl.trans(act), acc, DOT_PRECISION, UPCAST)
    else:
        acc = _mma(act, w, acc, DOT_PRECISION, UPCAST)
    return acc
