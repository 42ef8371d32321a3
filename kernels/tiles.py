"""Tile helpers shared by the block-sparse kernels of ``bsmm.py`` (linear) and ``bsconv.py`` (conv).

Import path: ``sparsekern.kernels.tiles`` (this folder, ``kernels/``, installs as ``sparsekern.kernels``).

Each is a ``@triton.jit`` function inlined into the kernels that call it: the
MMA with its precision switch, the metadata prefetch that keeps the main loops
pipelinable, the weight-tile load from the joined value store (TMA or
pointers, with the mixed-block merge), the weight-tile MMA in both operand
orders, the decoding of a program id into its work and the weight-gradient
run decode/store. Like the kernels, they use only Triton builtins, so they
also run under the interpreter (see ``bsmm.py``).

Why the prefetch: Triton's software pipeliner gives a chain of dependent loads
``(num_stages - 1) / (levels + 1)`` stages each, so a block index loaded in
the loop and then used as an address leaves one tile in flight whatever
``num_stages`` says (compiled offline: two shared buffers and a wait-all per
iteration, against the dense GEMM's ``num_stages``). The kernels therefore load
the index and slot of the *next* iteration into loop-carried scalars; no load
of an iteration then feeds another load's address in the same iteration.
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
def _unpack(v):
    """``(index, slot)`` of one packed int64 metadata entry (``layout.col_slot``: index low, slot high)."""
    return v.to(tl.int32), (v >> 32).to(tl.int32)


@triton.jit
def _prefetch_packed(pair_ptr, aux_ptr, p, end, HAS_MIXED: tl.constexpr):
    """``(index, slot, aux)`` of traversal position ``p``, or zeros (aux -1) past ``end``.

    For the first block of a line, before its loop: the line may be empty, so the loads are
    masked. ``pair_ptr`` holds packed ``(index, slot)`` pairs: one 8-byte load instead of two.

    The packed form saves the second load, its address and the reload of its
    base pointer in every iteration of the main loop (3 SASS instructions of
    about 100 on sm_90).
    """
    live = p < end
    idx, slot = _unpack(tl.load(pair_ptr + p, mask=live, other=0))
    if HAS_MIXED:
        a = tl.load(aux_ptr + p, mask=live, other=-1)
    else:
        a = -1
    return idx, slot, a


@triton.jit
def _prefetch_packed_next(pair_ptr, aux_ptr, p, end, HAS_MIXED: tl.constexpr):
    """The block at ``p`` for the next iteration, clamped to the line's last block ``end - 1``.

    Inside the loop the line is not empty, so clamping is safe and needs no predicated loads
    (the value read past the last block is never used).
    """
    q = tl.minimum(p, end - 1)
    idx, slot = _unpack(tl.load(pair_ptr + q))
    if HAS_MIXED:
        a = tl.load(aux_ptr + q)
    else:
        a = -1
    return idx, slot, a


@triton.jit
def _block_tile(w_ptr, slot, r0, c0, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BM: tl.constexpr,
                BK: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """Rows ``[r0, r0 + BLOCK_R)`` x columns ``[c0, c0 + BLOCK_C)`` of the stored block at ``slot``.

    One address formula for every block (``kernels/store.py``): ``w_ptr`` is the
    joined store, as a ``(n_slots * BM, BK)`` tensor descriptor with TMA or as
    a pointer to ``(n_slots, BM, BK)`` values. Blocks are stored whole (the
    overhang of edge blocks holds zeros), so no mask is needed.
    """
    if USE_TMA:
        w = w_ptr.load([slot * BM + r0, c0])
    else:
        offs_r = r0 + tl.arange(0, BLOCK_R)
        offs_c = c0 + tl.arange(0, BLOCK_C)
        w = tl.load(w_ptr + slot.to(tl.int64) * (BM * BK) + offs_r[:, None] * BK + offs_c[None, :])
    return w


@triton.jit
def _weight_tile(w_ptr, es_ptr, slot, a, fixed_base, r0, c0, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                 BM: tl.constexpr, BK: tl.constexpr, HAS_MIXED: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """The ``(BLOCK_R, BLOCK_C)`` tile of a computed block's effective values.

    A trainable mixed block (``a >= 0``) takes its non-trainable elements from
    its fixed slot ``fixed_base + a``, so optimizer drift in those positions is
    never seen. The merge is branch-free (other blocks read their own slot
    twice and keep it), which keeps the loop a single basic block.
    """
    w = _block_tile(w_ptr, slot, r0, c0, BLOCK_R, BLOCK_C, BM, BK, USE_TMA)
    if HAS_MIXED:
        mixed = a >= 0
        f = _block_tile(w_ptr, tl.where(mixed, fixed_base + a, slot), r0, c0, BLOCK_R, BLOCK_C, BM, BK, USE_TMA)
        offs = (r0 + tl.arange(0, BLOCK_R))[:, None] * BK + (c0 + tl.arange(0, BLOCK_C))[None, :]
        live = offs * 0 + a >= 0  # a tensor-shaped mask: the interpreter rejects a broadcast scalar bool
        e = tl.load(es_ptr + tl.maximum(a, 0).to(tl.int64) * (BM * BK) + offs, mask=live, other=2)
        w = tl.where(e == 2, w, f)
    return w


@triton.jit
def _mma_weight(act, w, acc, TRANS_W: tl.constexpr, SWAP_AB: tl.constexpr, DOT_PRECISION: tl.constexpr,
                UPCAST: tl.constexpr):  # fmt: skip
    """``acc += act @ op(w)`` for a weight tile ``w`` loaded as stored, ``(rows, cols)`` of the block.

    ``op`` is the transpose for the forward (``TRANS_W``: ``act`` holds input
    features, the result output features) and the identity for the input
    gradient. With ``SWAP_AB`` the accumulator is held transposed and the
    product runs as ``op(w)^T @ act^T``, which puts the tokens on the MMA's
    wide side (wgmma is m64nNk16) instead of the block's narrow side.
    """
    if TRANS_W:
        if SWAP_AB:
            acc = _mma(w, tl.trans(act), acc, DOT_PRECISION, UPCAST)
        else:
            acc = _mma(act, tl.trans(w), acc, DOT_PRECISION, UPCAST)
    else:
        if SWAP_AB:
            acc = _mma(tl.trans(w), tl.trans(act), acc, DOT_PRECISION, UPCAST)
        else:
            acc = _mma(act, w, acc, DOT_PRECISION, UPCAST)
    return acc


@triton.jit
def _add_bias(acc, bias_ptr, offs_n, mask_n, HAS_BIAS: tl.constexpr, SWAP_AB: tl.constexpr):
    """The forward epilogue: ``acc + bias[offs_n]`` (fp32), returned as ``(tokens, out)`` whatever ``SWAP_AB``."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if SWAP_AB:
            acc += bias[:, None]
        else:
            acc += bias[None, :]
    if SWAP_AB:
        acc = tl.trans(acc)
    return acc


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
    All of it is loaded before the token loop, so that loop has no index load.
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
