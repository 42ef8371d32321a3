"""CPU path for the block-sparse matmul: native kernels, gathered block GEMMs, or one dense GEMM.

Import path: ``sparsekern.kernels.bsmm_cpu`` (this folder, ``kernels/``, installs as ``sparsekern.kernels``).

Same operands and results as the Triton launchers in ``bsmm.py`` (see there
for shapes). Four implementations, chosen per call by :func:`path`:

* ``csr``: fp32 or bf16 with the native kernels built, for a layout whose kept
  elements are few and scattered (mostly mixed blocks: an element mask). The
  kept elements run as CSR (``csr_cpu.py``), so the mixed blocks' pruned
  elements cost nothing: below ``CSR_CROSSOVER`` element density where the
  block kernels would fall back to dense, and below ``CSR_FILL`` of the computed
  blocks where they would run.

* ``native``: fp32 or bf16 with the native kernels built (``native.py``).
  They read only the computed blocks and keep a block row's sums in registers
  (fp32 sums for bf16 too, rounded once).
* ``gathered``: fp16, or no native build. Each block row (forward,
  weight gradient) or block column (input gradient) becomes one GEMM over the
  gathered slices of the activations, so the GEMMs keep BLAS-sized inner
  dimensions while only computed blocks are touched. The loop runs over block
  rows or columns, never over blocks, and empty ones are skipped.
* ``dense``: above a measured block density, one dense GEMM on the masked
  weight beats both (see ``DENSE_CROSSOVER`` and ``NATIVE_CROSSOVER``).

The gathered path transposes activations once per call (``(K, M)`` rows of
``bk`` can then be gathered as contiguous slabs); that copy is the fixed
overhead that makes the dense path win early for it, see :func:`use_dense`.
"""

from __future__ import annotations

import itertools

import torch

from . import csr_cpu, native
from .store import effective_blocks
from .workspace import release_workspace, workspace  # noqa: F401 (release_workspace: the README calls it here)

# Above this block density (keyed by the block's smaller side) the gathered
# path loses to one dense GEMM on the masked weight: the per-block-row GEMMs
# have only bm output rows, which MKL runs well below its dense rate. Measured
# on this project's 2-core CPU (fp32, 4096x4096 weight, 2048 tokens, full
# SparseLinear step, `python -m bench`): 64x64 gathered is 1.25x dense at
# density 0.25 but slower at 0.36; 32x32 is 1.9x at 0.1 but 0.81x at 0.25.
# The 16 and 128 entries are not measured: 16 extrapolates the trend, 128
# reuses 64's value.
DENSE_CROSSOVER = {16: 0.05, 32: 0.15, 64: 0.3, 128: 0.3}

# The same crossover for the native kernels (fp32, used for bf16 too), from the full SparseLinear
# step's CPU time on one thread against nn.Linear's, timed in turn (2-core AVX2 EPYC, 4096x4096, 2048
# tokens, slab-packed blocks and huge-page outputs): 64x64 blocks 1.28x at density 0.7, 1.11x at
# 0.8, 1.06x at 0.85, 0.98x at 0.9; 32x32 1.22x at 0.7, 1.08x at 0.8; 16x16 1.30x at 0.6, 1.13x at
# 0.7; 128x128 1.25x at 0.7, 1.06x at 0.8, 0.96x at 0.9.
NATIVE_CROSSOVER = {16: 0.7, 32: 0.8, 64: 0.85, 128: 0.8}


# The element-sparse route (``csr_cpu``, the native CSR kernels) for layouts of mostly mixed blocks
# (element masks). fp32 full step, 4096x4096, 2048 tokens, 32x32 blocks, l1_unstructured at amount
# 1 - density, interleaved with nn.Linear (`python bench/unstructured_cpu.py --split`, load average
# 1.1 before, 1.9 after, this run's own 2 threads included): the CSR route is 0.67x nn.Linear at
# element density 0.5, 0.81x at 0.4, 1.07x at 0.3, 1.54x at 0.2, 2.58x at 0.1, 3.37x at 0.05, where
# the route it replaces (every block computed: the dense fallback) is 0.85-0.94x. Against that
# fallback it breaks even near 0.37, against nn.Linear near 0.32: so CSR_CROSSOVER (element density)
# is 0.32, and l1_unstructured's 0.7 (density 0.3000001) is in.
CSR_CROSSOVER = 0.32
# Where the block kernels would run instead (block density at most NATIVE_CROSSOVER), the CSR route
# also needs the kept elements to fill at most CSR_FILL of the computed blocks. Measured the same way
# on block masks whose blocks keep each element with probability `fill`, against the AVX2-sized
# block kernels (`python bench/unstructured_cpu.py --amounts --fills 0.2 0.35 0.5 0.7 --blocks 0.1
# --reps 3`, load 0.4 before, 2.4 after): at block density 0.1, CSR vs the block kernels is 7.48x vs
# 5.50x nn.Linear at fill 0.2, 6.10x vs 5.48x at 0.35, 4.59x vs 5.12x at 0.5, 4.09x vs 4.96x at 0.7:
# break-even near 0.42. Re-measured against the slab-packed block kernels (`--amounts --fills 0.2 0.35
# 0.5 --blocks 0.1 --reps 3`, 2 threads, load 0.8 before, 1.4 after): CSR 10.33x vs 7.09x at fill 0.2,
# 7.96x vs 7.10x at 0.35, 6.69x vs 6.95x at 0.5, so 0.4 still holds. (At block density 0.3 CSR ran
# 3.71x at fill 0.2 and 2.13x at 0.5, measured while the block kernels were still slow; they are not
# re-measured there.)
CSR_FILL = 0.4


def native_applies(dtype: torch.dtype) -> bool:
    """Whether the native kernels run this dtype here (fp32 or bf16, built, not disabled)."""
    return dtype in native.DTYPES and native.available()


def path(meta, dtype: torch.dtype = torch.float32) -> str:
    """``"dense"``, ``"csr"``, ``"native"`` or ``"gathered"``: which implementation runs this layout and dtype."""
    nat = native_applies(dtype)
    rb, cb = meta.row_offsets.numel() - 1, meta.col_offsets.numel() - 1
    side = min(meta.element_state.shape[1:])  # (n_mixed, bm, bk) even when n_mixed == 0
    crossover = (NATIVE_CROSSOVER if nat else DENSE_CROSSOVER).get(side, 0.3)
    blocks_dense = meta.col_indices.numel() > crossover * rb * cb
    computed = meta.col_indices.numel() > 0
    # The element counts are cached per layout (csr_cpu). An edge block's overhang counts as pruned in
    # the fill, so a small layer looks a little sparser than it is.
    if nat and computed and csr_cpu.element_density(meta) <= CSR_CROSSOVER and csr_cpu.fits(meta):
        if blocks_dense or csr_cpu.fill(meta) <= CSR_FILL:
            return "csr"
    if blocks_dense:
        return "dense"
    return "native" if nat else "gathered"


def use_dense(meta, dtype: torch.dtype = torch.float32) -> bool:
    """Whether this layout runs as one dense GEMM on the masked weight (see :func:`path`)."""
    return path(meta, dtype) == "dense"


def transposed_output(meta, m: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the CPU path returns ``(M, N)`` results as a transposed view: the gathered path, for the
    dtypes the native kernels never take (fp16).

    A function of the layout's density and the dtype only, never of whether the native kernels
    were built in this process: compiled graphs bake these strides in, and a graph cached with
    the kernels available must stay valid without them. When fp32/bf16 falls back to the gathered
    path, that path copies its result to row-major instead.

    The GEMMs run as ``(bm, L) @ (L, M)`` because that orientation is 1.8x
    faster here than ``(M, L) @ (L, bm)``; the result is ``Y.T`` in memory.
    Handing it on as ``yt.t()`` instead of copying saves a full pass over ``Y``
    (memory bandwidth is the bottleneck on this CPU, about 3 GB/s), and the
    next sparse layer's own transpose of its input then costs nothing.
    """
    return m > 0 and dtype not in native.DTYPES and path(meta, dtype) == "gathered"


def _transposed(t: torch.Tensor, rows: int, slot: str) -> torch.Tensor:
    """``t.T`` as a contiguous ``(rows, M)`` tensor, zero-padded past ``t.shape[1]``.

    Free when ``t`` already is a transposed view of a contiguous tensor.
    """
    if t.shape[1] == rows and t.t().is_contiguous():
        return t.t()
    out = workspace.get(slot, (rows, t.shape[0]), t)
    out[: t.shape[1]].copy_(t.t())
    out[t.shape[1] :].zero_()
    return out


def _unit_cols(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit column stride, as the native kernels read rows in place (a copy only when needed)."""
    return t if t.stride(1) == 1 else t.contiguous()


def dense_weight(w_train, w_frozen, meta, n_frozen, n, k, slot: str | None = None) -> torch.Tensor:
    """The effective weight as a dense ``(n, k)`` tensor.

    Each block is copied once, straight into its place in the row-major
    result (a permuted view of it). With ``slot`` the result lives in that
    reused workspace buffer, valid until the next call with the same slot:
    a fresh 64 MB tensor costs about 15 ms of page faults here, as much as
    the copy itself.
    """
    bm, bk = w_train.shape[1:]
    rb, cb = meta.row_offsets.numel() - 1, meta.col_offsets.numel() - 1
    vals = effective_blocks(w_train, w_frozen, meta.storage, meta.aux, meta.element_state, n_frozen)
    shape = (rb * bm, cb * bk)
    out = vals.new_empty(shape) if slot is None else workspace.get(slot, shape, vals)
    grid = out.view(rb, bm, cb, bk).transpose(1, 2)  # (rb, cb, bm, bk) view of the row-major result
    if vals.shape[0] == rb * cb:  # every block computed: CSR order is the row-major block order
        grid.copy_(vals.view(rb, cb, bm, bk))
    else:
        out.zero_()
        grid[meta.row_indices.long(), meta.col_indices.long()] = vals
    return out[:n, :k]


# A row's gathered reduction is cut into chunks of about this many elements:
# MKL runs (64, 448) @ (448, 2048) at 167 GFLOP/s but (64, 2048) @ (2048, 2048)
# at 66 GFLOP/s on this CPU, and a small slab stays in cache between gather and GEMM.
CHUNK_ELEMS = 512


def _chunks(s: int, e: int, step: int):
    for c0 in range(s, e, step):
        yield c0, min(e, c0 + step)


def gathered_mm(lhs_of, src, index, offsets, width, out, gather=None):
    """``out[g] = sum_j lhs_of(j0, j1) @ src[index[j0:j1]]`` over the group ``g`` of ``offsets``.

    ``src`` is ``(G, width, M)``; groups are block rows (forward) or block
    columns (input gradient). Gathered slabs go through one reused buffer.
    ``gather(j0, j1, slab)``, when given, fills ``slab`` ``(j1 - j0, width, M)``
    instead of the ``index_select`` from ``src`` (the conv path gathers from
    per-tap views of its input).
    """
    m = out.shape[-1]
    step = max(1, CHUNK_ELEMS // width)
    buf = workspace.get("gather", (step * width * m,), out)
    offs = offsets.tolist()
    for g, (s, e) in enumerate(itertools.pairwise(offs)):
        if s == e:
            out[g].zero_()
        for j0, j1 in _chunks(s, e, step):
            slab = buf[: (j1 - j0) * width * m].view(j1 - j0, width, m)
            if gather is None:
                torch.index_select(src, 0, index[j0:j1], out=slab)
            else:
                gather(j0, j1, slab)
            lhs = lhs_of(j0, j1)
            if j0 == s:
                torch.mm(lhs, slab.view(-1, m), out=out[g])
            else:
                out[g].addmm_(lhs, slab.view(-1, m))


def forward(x, w_train, w_frozen, bias, meta, n_out, n_frozen) -> torch.Tensor:
    bm, bk = w_train.shape[1:]
    m, k = x.shape
    how = path(meta, x.dtype)
    if how == "dense" or m == 0:
        w = dense_weight(w_train, w_frozen, meta, n_frozen, n_out, k, slot="dense_w")
        return torch.nn.functional.linear(x, w, bias)
    if how == "csr":
        return csr_cpu.forward(x, w_train, w_frozen, bias, meta, n_out)
    vals = effective_blocks(w_train, w_frozen, meta.storage, meta.aux, meta.element_state, n_frozen)
    if how == "native":  # the kernel reads the blocks transposed, (bk, bm), as it repacks them
        b = None if bias is None else bias.float().contiguous()
        wt = vals.float().contiguous()
        return native.group_mm(_unit_cols(x), wt, meta.row_offsets, meta.col_indices, None, b, n_out, transposed=True)
    rb, cb = meta.row_offsets.numel() - 1, meta.col_offsets.numel() - 1
    xt = _transposed(x, cb * bk, "xt").view(cb, bk, m)
    # (bm, nnzb, bk): a block row's blocks side by side are then a (bm, L) view.
    w_rows = vals.transpose(0, 1).contiguous()
    yt = x.new_empty(rb * bm, m)
    gathered_mm(
        lambda s, e: w_rows[:, s:e].reshape(bm, (e - s) * bk),
        xt, meta.col_indices.long(), meta.row_offsets, bk, yt.view(rb, bm, m),
    )  # fmt: skip
    if bias is not None:
        yt[:n_out] += bias[:, None]
    y = yt[:n_out].t()
    return y if transposed_output(meta, m, x.dtype) else y.contiguous()


def input_grad(dy, w_train, w_frozen, meta, n_in, n_frozen) -> torch.Tensor:
    bm, bk = w_train.shape[1:]
    m, n = dy.shape
    how = path(meta, dy.dtype)
    if how == "dense" or m == 0:
        return dy @ dense_weight(w_train, w_frozen, meta, n_frozen, n, n_in, slot="dense_w")
    if how == "csr":
        return csr_cpu.input_grad(dy, w_train, w_frozen, meta, n_in)
    vals = effective_blocks(w_train, w_frozen, meta.storage, meta.aux, meta.element_state, n_frozen)
    if how == "native":  # the transposed walk reads the blocks in place, through block_index_t
        return native.group_mm(
            _unit_cols(dy),
            vals.float().contiguous(),
            meta.col_offsets,
            meta.row_indices_t,
            meta.block_index_t,
            None,
            n_in,
        )
    rb, cb = meta.row_offsets.numel() - 1, meta.col_offsets.numel() - 1
    dyt = _transposed(dy, rb * bm, "dyt").view(rb, bm, m)
    # Column order, each block transposed: a column's blocks stack into (bk, L).
    w_cols = vals[meta.block_index_t.long()].permute(2, 0, 1).contiguous()
    dxt = dy.new_empty(cb * bk, m)
    gathered_mm(
        lambda s, e: w_cols[:, s:e].reshape(bk, (e - s) * bm),
        dyt, meta.row_indices_t.long(), meta.col_offsets, bm, dxt.view(cb, bk, m),
    )  # fmt: skip
    dx = dxt[:n_in].t()
    return dx if transposed_output(meta, m, dy.dtype) else dx.contiguous()


def weight_grad(dy, x, meta, block_size) -> torch.Tensor:
    bm, bk = block_size
    m, n = dy.shape
    k = x.shape[1]
    tidx = meta.train_index.long()
    n_train = tidx.numel()
    if n_train == 0:
        return x.new_zeros(0, bm, bk)
    rb, cb = meta.row_offsets.numel() - 1, meta.col_offsets.numel() - 1
    how = path(meta, x.dtype)
    if how == "csr" and m > 0:
        return csr_cpu.weight_grad(dy, x, meta, block_size)
    if how == "native" and m > 0:
        rows, cols = meta.row_indices[tidx].contiguous(), meta.col_indices[tidx].contiguous()
        dw = native.sampled_mm(_unit_cols(dy), _unit_cols(x), rows, cols, bm, bk)
        return mask_mixed_grad_(dw.to(x.dtype), meta)
    t_rows = meta.row_indices.long()[tidx]
    t_cols = meta.col_indices.long()[tidx]
    if how == "dense" or m == 0:
        # The dense product goes to a reused buffer (no page faults); only dW itself is fresh.
        g = workspace.get("dense_g", (rb * bm, cb * bk), x)
        if m == 0 or (rb * bm, cb * bk) != (n, k):
            g.zero_()
        if m:
            torch.mm(dy.t(), x, out=g[:n, :k])
        if n_train == rb * cb:  # every block trainable: a permuted copy, no indexed gather
            dw = x.new_empty(n_train, bm, bk)  # never a view of the workspace, even when the copy is trivial
            dw.view(rb, cb, bm, bk).copy_(g.view(rb, bm, cb, bk).transpose(1, 2))
        else:
            dw = g.view(rb, bm, cb, bk)[t_rows, :, t_cols, :]
    else:
        xt = _transposed(x, cb * bk, "xt").view(cb, bk, m)
        dw = gathered_weight_grad(
            dy.t(), t_rows, rb, bm, bk, lambda j0, j1, slab: torch.index_select(xt, 0, t_cols[j0:j1], out=slab)
        )
    return mask_mixed_grad_(dw, meta)


def gathered_weight_grad(dyt, t_rows, rb, bm, bk, gather) -> torch.Tensor:
    """``dW_b = dyt[rows of b] @ slab_b.T`` for the trainable blocks, ``(n_train, bm, bk)``.

    ``dyt`` is ``(>= rb*bm or N, M)`` (any strides; block-row slices are read in
    place as BLAS operands). ``t_rows`` gives each trainable block's block row,
    in CSR order so a block row's blocks are contiguous; ``gather(j0, j1, slab)``
    fills ``slab`` ``(j1 - j0, bk, M)`` with the activations of blocks ``j0:j1``.
    """
    m = dyt.shape[1]
    n_train = t_rows.numel()
    offs = torch.searchsorted(t_rows, torch.arange(rb + 1, device=dyt.device))
    dw_t = dyt.new_zeros(bm, n_train * bk)
    step = max(1, CHUNK_ELEMS // bk)
    buf = workspace.get("gather", (step * bk * m,), dyt)
    pos = offs.tolist()
    for r, (s, e) in enumerate(itertools.pairwise(pos)):
        dy_r = dyt[r * bm : (r + 1) * bm]
        for j0, j1 in _chunks(s, e, step):
            slab = buf[: (j1 - j0) * bk * m].view(j1 - j0, bk, m)
            gather(j0, j1, slab)
            torch.mm(dy_r, slab.view(-1, m).t(), out=dw_t[: dy_r.shape[0], j0 * bk : j1 * bk])
    return dw_t.view(bm, n_train, bk).transpose(0, 1).contiguous()


def mask_mixed_grad_(dw: torch.Tensor, meta) -> torch.Tensor:
    """Zero, in place, the non-trainable elements of trainable mixed blocks in ``dw`` (``train_index`` order)."""
    aux = meta.aux.long()[meta.train_index.long()]
    mixed = (aux >= 0).nonzero().squeeze(1)
    es = meta.element_state
    if mixed.numel() == aux.numel() == es.shape[0]:  # the trainable blocks are exactly the mixed ones, in order
        return dw.masked_fill_(es != 2, 0)
    if mixed.numel():
        dw[mixed] = torch.where(es[aux[mixed]] == 2, dw[mixed], 0)
    return dw
