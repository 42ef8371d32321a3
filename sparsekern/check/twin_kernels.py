"""Dense Triton GEMMs with the block-sparse kernels' tiles: the "twins" of ``twins.py`` (not public API).

Each twin is the dense product its kernel computes block by block, with the same tile roles:

* ``_twin_fwd``: ``Y[M, N] = X[M, K] @ W[N, K]^T``; output tile ``BLOCK_M x BLOCK_N``, reduction ``BLOCK_K``.
* ``_twin_dx``: ``dX[M, K] = dY[M, N] @ W[N, K]``; output tile ``BLOCK_M x BLOCK_K``, reduction ``BLOCK_N``.
* ``_twin_dw``: ``dW[N, G*K] = dY[M, N]^T @ X[M, G*K]``; output tile ``BLOCK_N x (GROUP*BLOCK_K)``,
  reduction ``BLOCK_M`` over tokens.

``SWAP_AB`` keeps the accumulator transposed (tokens on the MMA's N side), as the kernels do. Per
operand, ``*_TMA`` picks the load mechanism: a host tensor descriptor (TMA) or pointers (cp.async once
pipelined). The pointer loads are plain dense, unmasked ``(rows, cols)`` tiles whose addresses advance
by a constant each iteration (tutorial-03 style): for the conv kernels, whose activation operand is
an im2col gather, this is the dense pointer load of the same tile, not a gather. The reduction length
is assumed to be a multiple of the step; these kernels are compiled, never launched.
"""

import triton
import triton.language as tl


@triton.jit
def _twin_fwd(
    x,
    w,
    y,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    X_TMA: tl.constexpr,
    W_TMA: tl.constexpr,
    Y_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    if not X_TMA:
        x_ptrs = x + offs_m[:, None] * stride_xm + offs_k[None, :]
    if not W_TMA:
        w_ptrs = w + offs_n[:, None] * stride_wn + offs_k[None, :]
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if X_TMA:
            xt = x.load([pid_m * BLOCK_M, k])
        else:
            xt = tl.load(x_ptrs)
            x_ptrs += BLOCK_K
        if W_TMA:
            wt = w.load([pid_n * BLOCK_N, k])
        else:
            wt = tl.load(w_ptrs)
            w_ptrs += BLOCK_K
        if SWAP_AB:
            acc = tl.dot(wt, xt.T, acc)
        else:
            acc = tl.dot(xt, wt.T, acc)
    if SWAP_AB:
        out = tl.trans(acc)
    else:
        out = acc
    _store(y, out, pid_m * BLOCK_M, pid_n * BLOCK_N, stride_ym, Y_TMA, BLOCK_M, BLOCK_N)


@triton.jit
def _twin_dx(
    dy,
    w,
    dx,
    M,
    N,
    K,
    stride_dym,
    stride_wn,
    stride_dxm,
    DY_TMA: tl.constexpr,
    W_TMA: tl.constexpr,
    DX_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)) % K
    offs_n = tl.arange(0, BLOCK_N)
    if not DY_TMA:
        dy_ptrs = dy + offs_m[:, None] * stride_dym + offs_n[None, :]
    if not W_TMA:
        w_ptrs = w + offs_n[:, None] * stride_wn + offs_k[None, :]
    if SWAP_AB:
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n in range(0, N, BLOCK_N):
        if DY_TMA:
            dyt = dy.load([pid_m * BLOCK_M, n])
        else:
            dyt = tl.load(dy_ptrs)
            dy_ptrs += BLOCK_N
        if W_TMA:
            wt = w.load([n, pid_k * BLOCK_K])
        else:
            wt = tl.load(w_ptrs)
            w_ptrs += BLOCK_N * stride_wn
        if SWAP_AB:
            acc = tl.dot(wt.T, dyt.T, acc)
        else:
            acc = tl.dot(dyt, wt, acc)
    if SWAP_AB:
        out = tl.trans(acc)
    else:
        out = acc
    _store(dx, out, pid_m * BLOCK_M, pid_k * BLOCK_K, stride_dxm, DX_TMA, BLOCK_M, BLOCK_K)


@triton.jit
def _twin_dw(
    dy,
    x,
    dw,
    M,
    N,
    K,
    stride_dym,
    stride_xm,
    stride_dwn,
    DY_TMA: tl.constexpr,
    X_TMA: tl.constexpr,
    DW_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):
    WIDE: tl.constexpr = GROUP * BLOCK_K
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = (pid_k * WIDE + tl.arange(0, WIDE)) % K
    offs_m = tl.arange(0, BLOCK_M)
    if not DY_TMA:
        dy_ptrs = dy + offs_m[:, None] * stride_dym + offs_n[None, :]
    if not X_TMA:
        x_ptrs = x + offs_m[:, None] * stride_xm + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, WIDE), dtype=tl.float32)
    for m in range(0, M, BLOCK_M):
        if DY_TMA:
            dyt = dy.load([m, pid_n * BLOCK_N])
        else:
            dyt = tl.load(dy_ptrs)
            dy_ptrs += BLOCK_M * stride_dym
        if X_TMA:
            xt = x.load([m, pid_k * WIDE])
        else:
            xt = tl.load(x_ptrs)
            x_ptrs += BLOCK_M * stride_xm
        acc = tl.dot(dyt.T, xt, acc)
    _store(dw, acc, pid_n * BLOCK_N, pid_k * WIDE, stride_dwn, DW_TMA, BLOCK_N, WIDE)


@triton.jit
def _store(c, tile, row0, col0, stride_cm, C_TMA: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Store an fp32 tile in the output's dtype, through a descriptor or pointers."""
    if C_TMA:
        c.store([row0, col0], tile.to(c.dtype))
    else:
        rows = row0 + tl.arange(0, ROWS)
        cols = col0 + tl.arange(0, COLS)
        tl.store(c + rows[:, None] * stride_cm + cols[None, :], tile.to(c.dtype.element_ty))
