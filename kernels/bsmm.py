"""Block-sparse matmul for ``Y = X @ W.T`` with a three-state block-sparse ``W``.

Shapes and conventions (``M`` tokens, ``N`` out features, ``K`` in features):

* ``x``: ``(M, K)``, any strides. ``dy``: ``(M, N)``, any strides.
* ``W`` is ``(N, K)`` cut into ``(bm, bk)`` blocks. Its values live in
  ``w_train (n_train, bm, bk)`` and ``w_frozen (n_frozen + n_mixed, bm, bk)``,
  both contiguous; ``Meta`` says where each computed block lives (see
  ``sparsekern/layout.py`` for the worked example).

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

import functools
import os

import torch
import triton
import triton.language as tl

from . import configs as cfgs
from .meta import Meta
from .tiles import _line_program, _mma, _mma_weight, _wgrad_run, _wgrad_store

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------- kernels
@triton.jit
def _bsmm_fwd_kernel(
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
    N,
    K,
    n_frozen,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """``y[m, r*BM + n] = sum_blocks x[m, c*BK + k] * W_rc[n, k] (+ bias)``.

    Grid: ``cdiv(M, BLOCK_M) * RB * (BM // BLOCK_N)``, token tiles fastest so
    that the programs of one (long) block row are launched together.
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
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    # SWAP_AB computes the tile as y^T = W x^T: tokens then sit on the MMA's
    # wide N side (wgmma is m64nNk16) instead of the block's narrow BLOCK_N.
    if SWAP_AB:
        acc = tl.full((BLOCK_N, BLOCK_M), 0.0, dtype=tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for it in range(start * SUB_K, end * SUB_K):
        p = it // SUB_K
        kk = (it % SUB_K) * BLOCK_K
        c = tl.load(col_indices_ptr + p)
        s = tl.load(storage_ptr + p)
        a = tl.load(aux_ptr + p) if HAS_MIXED else -1
        offs_k = c * BK + kk + offs_bk
        x = tl.load(
            x_rows + offs_k.to(tl.int64)[None, :] * stride_xk,
            mask=mask_m[:, None] & (offs_k < K)[None, :],
            other=0.0,
        )
        acc = _mma_weight(
            x, acc, wt_ptr, wf_ptr, es_ptr, s, a, n_frozen, offs_bn, kk + offs_bk,
            BM, BK, HAS_MIXED, True, SWAP_AB, DOT_PRECISION, UPCAST,
        )  # fmt: skip
    if SWAP_AB:
        acc = tl.trans(acc)

    offs_n = r * BM + offs_bn
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _bsmm_dx_kernel(
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
    col_order_ptr,
    # shapes
    M,
    N,
    K,
    n_frozen,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """``dx[m, c*BK + k] = sum_blocks dy[m, r*BM + n] * W_rc[n, k]``.

    Walks block column ``c`` through the transposed traversal; ``BLOCK_K`` is
    the output slice of the block's columns, ``BLOCK_N`` the reduction step.
    """
    tl.static_assert(BM % BLOCK_N == 0, "BLOCK_N must divide the block's rows")
    tl.static_assert(BK % BLOCK_K == 0, "BLOCK_K must divide the block's columns")
    SUB_N: tl.constexpr = BM // BLOCK_N
    SUB_K: tl.constexpr = BK // BLOCK_K
    pid_m, sub_k, c, start, end = _line_program(col_order_ptr, col_offsets_ptr, M, BLOCK_M, SUB_K)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_bk = sub_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_bn = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
    if SWAP_AB:  # dx^T = W^T dy^T, as in the forward kernel
        acc = tl.full((BLOCK_K, BLOCK_M), 0.0, dtype=tl.float32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_K), 0.0, dtype=tl.float32)
    for it in range(start * SUB_N, end * SUB_N):
        q = it // SUB_N
        nn = (it % SUB_N) * BLOCK_N
        r = tl.load(row_indices_t_ptr + q)
        b = tl.load(block_index_t_ptr + q)
        s = tl.load(storage_ptr + b)
        a = tl.load(aux_ptr + b) if HAS_MIXED else -1
        offs_n = r * BM + nn + offs_bn
        dy = tl.load(
            dy_rows + offs_n.to(tl.int64)[None, :] * stride_dyn,
            mask=mask_m[:, None] & (offs_n < N)[None, :],
            other=0.0,
        )
        acc = _mma_weight(
            dy, acc, wt_ptr, wf_ptr, es_ptr, s, a, n_frozen, nn + offs_bn, offs_bk,
            BM, BK, HAS_MIXED, False, SWAP_AB, DOT_PRECISION, UPCAST,
        )  # fmt: skip
    if SWAP_AB:
        acc = tl.trans(acc)

    offs_k = c * BK + offs_bk
    dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k.to(tl.int64)[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_k < K)[None, :])


@triton.jit
def _bsmm_dw_kernel(
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
    not start a run (``train_rank % GROUP != 0``) exit at once.

    Grid: ``(n_train * (BM // BLOCK_N) * (BK // BLOCK_K), splits)``. Split
    ``j`` reduces tokens ``[j * rows_per_split, (j + 1) * rows_per_split)`` and
    writes ``dw[j]`` (``stride_dws`` apart); the launcher sums the splits.
    Positions that are not trainable (mixed blocks) and the overhang get 0.
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
    offs_k = c * BK + offs_bk
    mask_k = in_group & (offs_k < K)
    offs_n = r * BM + offs_bn
    mask_n = offs_n < N

    split = tl.program_id(1)
    m_start = split * rows_per_split
    m_end = tl.minimum(M, m_start + rows_per_split)
    acc = tl.full((BLOCK_N, WIDE), 0.0, dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        dy = tl.load(
            dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym + offs_n.to(tl.int64)[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_n[None, :],
            other=0.0,
        )
        x = tl.load(
            x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        acc = _mma(tl.trans(dy), x, acc, DOT_PRECISION, UPCAST)
    _wgrad_store(acc, dw_ptr, es_ptr, aux_ptr, stride_dws, t0, member, in_group, b, offs_bk, offs_bn, BM, BK, HAS_MIXED)


# ------------------------------------------------------------------ launchers
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_tuned_cache: dict[tuple, triton.Config] = {}


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _check(name: str, t: torch.Tensor, ndim: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def _check_values(w_train: torch.Tensor, w_frozen: torch.Tensor, dtype, device) -> tuple[int, int]:
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {dtype}; supported: {_SUPPORTED_DTYPES}")
    _check("w_train", w_train, 3, dtype, device)
    _check("w_frozen", w_frozen, 3, dtype, device)
    bm, bk = w_train.shape[1:]
    if tuple(w_frozen.shape[1:]) != (bm, bk):
        raise ValueError(f"w_frozen blocks {tuple(w_frozen.shape[1:])} differ from w_train blocks {(bm, bk)}")
    if not (w_train.is_contiguous() and w_frozen.is_contiguous()):
        raise ValueError("w_train and w_frozen must be contiguous block stores")
    return bm, bk


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "interpreter"


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pick_config(kind, dtype, device, bm, bk, m, run, config, blocks=None):
    """Explicit override, then tuned data, then (CUDA) a one-off benchmark of the candidates."""
    elem = torch.empty((), dtype=dtype).element_size()
    if config is not None:
        return config
    if INTERPRET or device.type != "cuda":
        return cfgs.default_config(kind, bm, bk, elem)
    mb = cfgs.m_bucket(m)
    key = cfgs.tuned_key(kind, str(dtype).removeprefix("torch."), bm, bk, mb)
    if blocks is not None:
        key += f":b{cfgs.count_bucket(blocks)}"
    name = _device_name(device)
    cache_key = (name, key)
    if cache_key in _tuned_cache:
        return _tuned_cache[cache_key]
    found = cfgs.lookup(name, key)
    if found is None:
        base = cfgs.for_block(cfgs.candidates(kind), bm, bk)
        cands = cfgs.prune(base, elem, kind, cfgs.device_smem(device.index or 0))
        if os.environ.get("SPARSEKERN_AUTOTUNE", "1") == "0":
            found = cands[0]
        else:
            timings = []
            for cand in cands:
                try:
                    # A config that spills registers is slow by construction: never pick it.
                    if getattr(run(cand), "n_spills", 0):
                        continue
                    timings.append((triton.testing.do_bench(lambda c=cand: run(c), warmup=5, rep=20), cand))
                except Exception:  # a config the compiler rejects (e.g. out of resources)
                    continue
            if not timings:
                raise RuntimeError(f"no {kind} kernel config compiled for {key} on {name}")
            found = min(timings, key=lambda tc: tc[0])[1]
    _tuned_cache[cache_key] = found
    return found


def tuned_records() -> dict[str, dict]:
    """Configs chosen in this process, as ``{device: {key: record}}`` (for ``bench --tune``)."""
    out: dict[str, dict] = {}
    for (name, key), cfg in _tuned_cache.items():
        out.setdefault(name, {})[key] = cfgs.to_record(cfg)
    return out


def _launch_kw(cfg: triton.Config) -> dict:
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


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
    bm, bk = _check_values(w_train, w_frozen, x.dtype, x.device)
    _check("x", x, 2, x.dtype, x.device)
    m, k = x.shape
    if bias is not None:
        _check("bias", bias, 1, x.dtype, x.device)
        if bias.shape[0] != n_out:
            raise ValueError(f"bias has {bias.shape[0]} elements, expected {n_out}")
    y = out if out is not None else x.new_empty(m, n_out)
    rb = meta.row_offsets.numel() - 1
    has_mixed = meta.element_state.shape[0] > 0

    def run(cfg):
        grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]) * rb * (bm // cfg.kwargs["BLOCK_N"]),)
        return _bsmm_fwd_kernel[grid](
            x, w_train, w_frozen, meta.element_state, bias if bias is not None else x, y,
            meta.row_offsets, meta.col_indices, meta.storage, meta.aux, meta.row_order,
            m, n_out, k, n_frozen,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            BM=bm, BK=bk, HAS_BIAS=bias is not None, HAS_MIXED=has_mixed,
            DOT_PRECISION=_dot_precision(x.dtype, x.device),
            UPCAST=INTERPRET and x.dtype == torch.bfloat16,
            **_launch_kw(cfg),
        )  # fmt: skip

    if m and rb:
        run(_pick_config("fwd", x.dtype, x.device, bm, bk, m, run, config))
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
    bm, bk = _check_values(w_train, w_frozen, dy.dtype, dy.device)
    _check("dy", dy, 2, dy.dtype, dy.device)
    m, n = dy.shape
    dx = out if out is not None else dy.new_empty(m, n_in)
    cb = meta.col_offsets.numel() - 1
    has_mixed = meta.element_state.shape[0] > 0

    def run(cfg):
        grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]) * cb * (bk // cfg.kwargs["BLOCK_K"]),)
        return _bsmm_dx_kernel[grid](
            dy, w_train, w_frozen, meta.element_state, dx,
            meta.col_offsets, meta.row_indices_t, meta.block_index_t, meta.storage, meta.aux, meta.col_order,
            m, n, n_in, n_frozen,
            dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
            BM=bm, BK=bk, HAS_MIXED=has_mixed,
            DOT_PRECISION=_dot_precision(dy.dtype, dy.device),
            UPCAST=INTERPRET and dy.dtype == torch.bfloat16,
            **_launch_kw(cfg),
        )  # fmt: skip

    if m and cb:
        run(_pick_config("dx", dy.dtype, dy.device, bm, bk, m, run, config))
    return dx


def wgrad_splits(m: int, programs: int, device: torch.device) -> int:
    """How many token splits the weight gradient uses for ``programs`` programs per split.

    Few trainable blocks cannot fill the GPU with one program each, so the
    token reduction is split until there are about four programs per SM, but
    never into chunks of fewer than 512 tokens (below that the fp32 partial
    sums cost more than they save).
    """
    if device.type != "cuda" or programs == 0:
        return 1
    return max(1, min(triton.cdiv(4 * _sm_count(device), programs), m // 512))


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
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {x.dtype}; supported: {_SUPPORTED_DTYPES}")
    _check("dy", dy, 2, x.dtype, x.device)
    _check("x", x, 2, x.dtype, x.device)
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
    has_mixed = meta.element_state.shape[0] > 0

    def run(cfg):
        kw = cfg.kwargs
        sub = (bm // kw["BLOCK_N"]) * (bk // kw["BLOCK_K"])
        nsplit = splits or wgrad_splits(m, triton.cdiv(n_train, kw.get("GROUP", 1)) * sub, x.device)
        rows_per_split = triton.cdiv(triton.cdiv(m, nsplit), 128) * 128
        nsplit = triton.cdiv(m, rows_per_split)
        target = dw if nsplit == 1 else torch.empty(nsplit, n_train, bm, bk, device=x.device, dtype=torch.float32)
        kernel = _bsmm_dw_kernel[(n_train * sub, nsplit)](
            dy, x, meta.element_state, target,
            meta.train_index, meta.train_rank, meta.train_left, meta.row_indices, meta.col_indices, meta.aux,
            m, n, k, rows_per_split,
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), target.stride(0) if nsplit > 1 else 0,
            BM=bm, BK=bk, HAS_MIXED=has_mixed,
            DOT_PRECISION=_dot_precision(x.dtype, x.device),
            UPCAST=INTERPRET and x.dtype == torch.bfloat16,
            **_launch_kw(cfg),
        )  # fmt: skip
        if nsplit > 1:
            torch.sum(target, dim=0, out=dw) if dw.dtype == torch.float32 else dw.copy_(target.sum(0))
        return kernel

    # The best grouping and split depend on how many blocks there are, so the key carries that too.
    run(_pick_config("wgrad", x.dtype, x.device, bm, bk, m, run, config, blocks=n_train))
    return dw
