"""The CPU path's element-sparse route: a layout's kept elements as CSR, run by the native CSR kernels.

Import path: ``sparsekern.kernels.csr_cpu`` (this folder, ``kernels/``, installs as ``sparsekern.kernels``).

An element mask (what ``torch.nn.utils.prune.l1_unstructured`` leaves, converted with
``granularity="exact"``) makes nearly every block *mixed*, so the block kernels skip nothing.
Here the same three passes run over the kept elements only (``native/csr.cpp``), with math
identical to masked dense (fp32 sums; fp32 or bf16 activations):

===============  =======================================  ==============================
pass             computed as                              structure
===============  =======================================  ==============================
forward          ``y[t, n] = b[n] + sum W[n, k] x[t, k]``  CSR of the kept elements
input gradient   ``dx[t, k] = sum W[n, k] dy[t, n]``       the same elements as CSC
weight gradient  ``dW[n, k] = sum_t dy[t, n] x[t, k]``     CSR of the trainable elements
===============  =======================================  ==============================

The weight gradient comes back in the block store's format (``(n_train, bm, bk)`` in
``train_index`` order, zero at frozen and pruned elements), as ``bsmm_cpu.weight_grad``
returns it, so nothing upstream changes. ``bsmm_cpu.path`` decides when this route runs.

Index metadata (:class:`Plan`) is built once per layout with vectorised torch and cached
for the layout's lifetime; only the value gather (``store.flatten()[gather]``, one pass over
the kept values) runs per call, because values change every optimizer step. Pruned
elements are never gathered, so whatever the store holds there is never read.

Worked example, ``N = K = 2``, one 2x2 mixed block ``[[T, P], [F, T]]`` (trainable, pruned,
frozen), store slots ``[w_train: 0 | w_frozen: fixed 1]``: the kept elements in row-major
order are ``(0,0) (1,0) (1,1)``, so ``ptr [0, 1, 3]``, ``idx [0, 0, 1]``, ``gather
[0*4+0, 1*4+2, 0*4+3] = [0, 6, 3]`` (the frozen element is read from its fixed slot);
the transposed walk has ``ptr_t [0, 2, 3]``, ``idx_t [0, 1, 1]``, ``gather_t [0, 6, 3]``;
the trainable ones ``train_ptr [0, 1, 2]``, ``train_idx [0, 1]``, ``train_dst [0, 3]``.
"""

from __future__ import annotations

import threading
import weakref
from typing import NamedTuple

import torch

from . import native
from .store import adjacent, value_store

__all__ = ["MAX_KEPT", "Plan", "element_density", "fill", "fits", "forward", "input_grad", "plan", "weight_grad"]

#: The most kept elements a layout may have here: the kernels' pointers and indices are int32.
MAX_KEPT = 2**31 - 1


class Plan(NamedTuple):
    """CSR index tensors of one layout at one weight shape (int32 pointers and indices, int64 offsets)."""

    ptr: torch.Tensor  # (N + 1,) row pointers of the kept elements
    idx: torch.Tensor  # (nnz,) their columns
    gather: torch.Tensor  # (nnz,) int64 offsets of their values in the flattened store [w_train | w_frozen]
    ptr_t: torch.Tensor  # (K + 1,) the same elements by column ...
    idx_t: torch.Tensor  # ... their rows
    gather_t: torch.Tensor  # ... and value offsets
    train_ptr: torch.Tensor  # (N + 1,) row pointers of the trainable elements
    train_idx: torch.Tensor  # their columns
    train_dst: torch.Tensor  # int64 offsets of their gradients in the flattened (n_train, bm, bk) result


def _versions(tensors) -> tuple[int, ...]:
    # Inference tensors (a layout built under torch.inference_mode) have no version counter.
    return tuple(-1 if t.is_inference() else t._version for t in tensors)


class _Entry:
    """What is cached for one layout: its element counts and its plans by weight shape."""

    def __init__(self, tensors):
        self.refs = tuple(weakref.ref(t) for t in tensors)
        self.versions = _versions(tensors)
        self.counts: tuple[int, int] | None = None
        self.plans: dict[tuple[int, int], Plan] = {}


_lock = threading.Lock()
_cache: dict[int, _Entry] = {}


def _key_tensors(meta):
    # What defines a layout's elements and slots: its element states, block positions and slots.
    return (meta.element_state, meta.col_indices, meta.row_indices, meta.storage, meta.aux)


def _entry(meta) -> _Entry:
    """The cache entry of ``meta``'s layout, made on first use and dropped with its ``element_state``.

    Keyed by the identity of the layout's tensors (and their versions, so an in-place edit
    rebuilds), never by their addresses alone, which a later layout may reuse.
    """
    keys = _key_tensors(meta)
    es = keys[0]
    with _lock:
        got = _cache.get(id(es))
        if got is not None:
            alive = tuple(r() for r in got.refs)
            if all(a is b for a, b in zip(alive, keys, strict=True)) and got.versions == _versions(keys):
                return got
        entry = _Entry(keys)
        _cache[id(es)] = entry
        weakref.finalize(es, _drop, id(es), entry)
        return entry


def _drop(key: int, entry: _Entry) -> None:
    with _lock:
        if _cache.get(key) is entry:
            del _cache[key]


def _counts(meta) -> tuple[int, int]:
    """``(kept, computed)``: kept elements and elements of the computed blocks (edge overhang included)."""
    entry = _entry(meta)
    if entry.counts is None:
        es = meta.element_state
        block = es.shape[1] * es.shape[2]
        nnzb = meta.col_indices.numel()
        kept = (nnzb - es.shape[0]) * block + int(torch.count_nonzero(es))
        entry.counts = (kept, nnzb * block)
    return entry.counts


def fits(meta) -> bool:
    """Whether the layout's kept elements fit the kernels' int32 indices (at most :data:`MAX_KEPT`)."""
    return _counts(meta)[0] <= MAX_KEPT


def element_density(meta) -> float:
    """Kept elements over the block grid's elements (cached per layout)."""
    es = meta.element_state
    grid = (meta.row_offsets.numel() - 1) * (meta.col_offsets.numel() - 1) * es.shape[1] * es.shape[2]
    return _counts(meta)[0] / max(1, grid)


def fill(meta) -> float:
    """Kept elements over the computed blocks' elements: 1 for whole blocks (and for no blocks at all),
    low for an element mask."""
    kept, computed = _counts(meta)
    return kept / computed if computed else 1.0


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=out[1:])
    return out.to(torch.int32)


def _build(meta, n: int, k: int) -> Plan:
    es = meta.element_state
    bm, bk = es.shape[1:]
    rb, cb = meta.row_offsets.numel() - 1, meta.col_offsets.numel() - 1
    nnzb = meta.col_indices.numel()
    s, a = meta.storage.long(), meta.aux.long()
    n_train = meta.train_index.numel()
    # Slots from fixed_base on hold mixed blocks: the trainable ones' frozen parts (at fixed_base + aux)
    # and the mixed blocks without a trainable element (stored there directly).
    fixed_base = nnzb - (es.shape[0] - int((a >= 0).sum()))
    mixed = torch.where(a >= 0, a, torch.where(s >= fixed_base, s - fixed_base, -1))
    # Element states of every computed block (2 trainable, 1 frozen, 0 pruned), then the (N, K) map.
    states = torch.where(s < n_train, 2, 1).to(torch.int8)[:, None, None].expand(nnzb, bm, bk).clone()
    is_mixed = mixed >= 0
    states[is_mixed] = es[mixed[is_mixed]]
    rows_b, cols_b = meta.row_indices.long(), meta.col_indices.long()
    dev = es.device  # explicit everywhere: a default device set by the user must not move the plan
    grid = torch.zeros(rb, bm, cb, bk, dtype=torch.int8, device=dev)
    grid[rows_b, :, cols_b, :] = states
    dense = grid.view(rb * bm, cb * bk)[:n, :k]
    nz = dense.nonzero()  # kept elements, row-major
    rows, cols = nz[:, 0], nz[:, 1]
    state = dense[rows, cols]
    where = torch.full((rb, cb), -1, dtype=torch.int64, device=dev)
    where[rows_b, cols_b] = torch.arange(nnzb, device=dev)
    p = where[rows // bm, cols // bk]
    off = (rows % bm) * bk + cols % bk
    slot = torch.where((state == 1) & (a[p] >= 0), fixed_base + a[p], s[p])
    gather = slot * (bm * bk) + off
    by_col = torch.sort(cols, stable=True).indices  # rows ascend within a column
    train = (state == 2).nonzero().squeeze(1)
    return Plan(
        ptr=_offsets(torch.bincount(rows, minlength=n)),
        idx=cols.to(torch.int32),
        gather=gather,
        ptr_t=_offsets(torch.bincount(cols, minlength=k)),
        idx_t=rows[by_col].to(torch.int32),
        gather_t=gather[by_col],
        train_ptr=_offsets(torch.bincount(rows[train], minlength=n)),
        train_idx=cols[train].to(torch.int32),
        train_dst=s[p[train]] * (bm * bk) + off[train],
    )


def plan(meta, n: int, k: int) -> Plan:
    """The :class:`Plan` of ``meta``'s layout for an ``(n, k)`` weight, built on first use and cached."""
    entry = _entry(meta)
    got = entry.plans.get((n, k))
    if got is None:
        got = entry.plans[(n, k)] = _build(meta, n, k)
    return got


def _values(w_train, w_frozen, gather) -> torch.Tensor:
    """The kept values, ``[w_train | w_frozen].flatten()[gather]`` as fp32 (one pass over them)."""
    if w_train.shape[0] and w_frozen.shape[0] and not adjacent(w_train, w_frozen):
        store = torch.cat([w_train, w_frozen])  # the gather copies anyway: no warning, as effective_blocks
    else:
        store = value_store(w_train, w_frozen)
    return store.reshape(-1).index_select(0, gather).float()


def _unit_cols(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def forward(x, w_train, w_frozen, bias, meta, n_out: int) -> torch.Tensor:
    """``x @ W.T + bias`` over the kept elements, ``(M, n_out)`` row-major in ``x``'s dtype."""
    p = plan(meta, n_out, x.shape[1])
    b = None if bias is None else bias.float().contiguous()
    return native.csr_mm(_unit_cols(x), p.ptr, p.idx, _values(w_train, w_frozen, p.gather), b)


def input_grad(dy, w_train, w_frozen, meta, n_in: int) -> torch.Tensor:
    """``dy @ W`` over the kept elements (the transposed walk), ``(M, n_in)`` row-major in ``dy``'s dtype."""
    p = plan(meta, dy.shape[1], n_in)
    return native.csr_mm(_unit_cols(dy), p.ptr_t, p.idx_t, _values(w_train, w_frozen, p.gather_t), None)


def weight_grad(dy, x, meta, block_size) -> torch.Tensor:
    """``dy.T @ x`` at the trainable elements, as ``(n_train, bm, bk)`` in ``x``'s dtype, zero elsewhere."""
    bm, bk = block_size
    p = plan(meta, dy.shape[1], x.shape[1])
    n_train = meta.train_index.numel()
    dw = native.csr_sampled(_unit_cols(dy), _unit_cols(x), p.train_ptr, p.train_idx, p.train_dst, n_train * bm * bk)
    return dw.view(n_train, bm, bk).to(x.dtype)
