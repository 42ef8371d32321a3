"""CPU path for the block-sparse convolution: per-tap gathers feeding the block-row GEMMs of ``bsmm_cpu``.

Same operands and results as the Triton launchers in ``bsconv.py``: ``x``
``(N, Cin, H, W)`` and ``dy`` ``(N, Cout, Ho, Wo)`` in any memory format, the
weight in the matrix view of ``sparsekern/convview.py`` (a block is ``bm``
output channels by ``bk`` input channels at one filter tap).

How the work is skipped. The input is copied once, channel-major and
zero-padded, to ``xp (c_pad, N, Hp, Wp)``. For a tap ``(r, s)`` the slab of
channel block ``cb`` that the tap multiplies is then a strided *view*
``xp[cb, :, r*dh::sh, s*dw::sw]``, so only the block columns that hold a
computed block are gathered, one ``index_select`` per tap (a loop over taps,
never over blocks). The gathered slabs ``(n_used, bk, M)`` are the
transposed activations of a linear layer whose block columns are the used
ones, and the forward and weight-gradient GEMMs are exactly those of
``bsmm_cpu``. The input gradient runs the transposed GEMMs into the used
columns and adds each tap's slabs back into a padded ``dx`` (``index_add_``
per tap). Nothing of size ``kh*kw*Cin*M`` (a full im2col) is built unless
every block column is used.

Conversions: an NCHW input costs one transposing copy into ``xp``; so does a
channels_last one (this path wants channels outermost). Outputs come back
as views of channel-major buffers (``y`` is ``(Cout, N, Ho, Wo)`` in memory),
which saves a copy; ``functional.conv`` reports the same strides to
``torch.compile``. Above the dense crossover (``bsmm_cpu.use_dense``) the
layer runs as one ``F.conv2d`` on the masked weight instead.
"""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F

from . import bsmm_cpu
from .bsmm_cpu import _ws
from .meta import ConvGeom


def _padding(g: ConvGeom) -> tuple[int, int, int, int]:
    """Padded input extents ``(Hp, Wp)`` and the bottom/right padding the output needs (may be < 0)."""
    hp = (g.h_out - 1) * g.stride_h + g.dil_h * (g.kh - 1) + 1
    wp = (g.w_out - 1) * g.stride_w + g.dil_w * (g.kw - 1) + 1
    return hp, wp, hp - g.pad_h - g.h, wp - g.pad_w - g.w


def _padded_input(x: torch.Tensor, g: ConvGeom, hp: int, wp: int) -> torch.Tensor:
    """``x`` channel-major and zero-padded: ``(c_pad, N, Hp, Wp)``, a reused buffer.

    ``Hp``/``Wp`` are exactly the rows/columns the output reads, so input rows
    beyond them (a stride that does not divide) are dropped.
    """
    xp = _ws.get("conv_xp", (g.c_pad, g.n, hp, wp), x)
    h1, w1 = max(0, min(g.h, hp - g.pad_h)), max(0, min(g.w, wp - g.pad_w))
    top, left = g.pad_h, g.pad_w
    # Zero only what the copy below does not overwrite: the padding ring and the padding channels.
    xp[g.c_in :].zero_()
    xp[: g.c_in, :, :top].zero_()
    xp[: g.c_in, :, top + h1 :].zero_()
    xp[: g.c_in, :, top : top + h1, :left].zero_()
    xp[: g.c_in, :, top : top + h1, left + w1 :].zero_()
    xp[: g.c_in, :, top : top + h1, left : left + w1].copy_(x[:, :, :h1, :w1].transpose(0, 1))
    return xp


def _tap_view(xp: torch.Tensor, g: ConvGeom, bk: int, r: int, s: int) -> torch.Tensor:
    """The ``(CBin, bk, N, Ho, Wo)`` strided view of padded ``xp`` that tap ``(r, s)`` multiplies."""
    cpad, n, hp, wp = xp.shape
    sc, sn, sh, sw = xp.stride()
    return xp.as_strided(
        (cpad // bk, bk, n, g.h_out, g.w_out),
        (bk * sc, sc, sn, g.stride_h * sh, g.stride_w * sw),
        xp.storage_offset() + r * g.dil_h * sh + s * g.dil_w * sw,
    )


def _used_columns(col_indices: torch.Tensor) -> torch.Tensor:
    """The distinct block columns holding a computed block, sorted (so grouped by tap)."""
    return torch.unique(col_indices.long())


class _TapGather:
    """Fills slabs of the implicit im2col for runs of blocks: one ``index_select`` per (block row, tap) segment.

    ``rows``/``cols`` are the blocks' block rows and columns in CSR order, so
    within a block row the blocks of one tap are adjacent (columns are
    tap-major). Segment bounds are found with vectorised ops once per call;
    the Python loop then runs over segments, at most ``RB * kh * kw``.
    """

    def __init__(self, xp: torch.Tensor, g: ConvGeom, bk: int, rows: torch.Tensor, cols: torch.Tensor):
        per_tap = g.c_pad // bk
        cols, rows = cols.long(), rows.long()
        tap = torch.div(cols, per_tap, rounding_mode="floor")
        self.cb = cols - tap * per_tap
        brk = torch.ones(cols.numel(), dtype=torch.bool, device=cols.device)
        brk[1:] = (tap[1:] != tap[:-1]) | (rows[1:] != rows[:-1])
        starts = brk.nonzero().squeeze(1)
        self.starts = starts.tolist() + [cols.numel()]
        self.taps = tap[starts].tolist()
        self.views = {t: _tap_view(xp, g, bk, *divmod(t, g.kw)) for t in set(self.taps)}
        self.shape = (bk, g.n, g.h_out, g.w_out)

    def __call__(self, j0: int, j1: int, slab: torch.Tensor) -> None:
        i = bisect.bisect_right(self.starts, j0) - 1
        pos = j0
        while pos < j1:
            end = min(self.starts[i + 1], j1)
            out = slab[pos - j0 : end - j0].view(end - pos, *self.shape)
            torch.index_select(self.views[self.taps[i]], 0, self.cb[pos:end], out=out)
            pos, i = end, i + 1


def _dense_padding(g: ConvGeom):
    """``F.conv2d`` arguments for the dense fallback: symmetric padding, or an explicit pad first."""
    _, _, pb, pr = _padding(g)
    if pb == g.pad_h and pr == g.pad_w:
        return (g.pad_h, g.pad_w), None
    return 0, (g.pad_w, pr, g.pad_h, pb)


def _dense_weight4d(w_train, w_frozen, meta, n_frozen, g: ConvGeom) -> torch.Tensor:
    bm, bk = w_train.shape[1:]
    wm = bsmm_cpu._dense_weight(w_train, w_frozen, meta, n_frozen, g.c_out, g.kh * g.kw * g.c_pad)
    return wm.view(g.c_out, g.kh, g.kw, g.c_pad)[..., : g.c_in].permute(0, 3, 1, 2)


def _dense_pad_input(x, g: ConvGeom):
    padding, explicit = _dense_padding(g)
    if explicit is not None:
        # Negative amounts crop rows the strided output never reads.
        x = F.pad(x, explicit)
    return x, padding


def gathered(meta) -> bool:
    """Whether the gathered path runs (else the dense fallback); decides the output strides."""
    return not bsmm_cpu.use_dense(meta)


def forward(x, w_train, w_frozen, bias, meta, g: ConvGeom, n_frozen) -> torch.Tensor:
    bm, bk = w_train.shape[1:]
    m = g.n * g.h_out * g.w_out
    if not gathered(meta) or m == 0:
        xin, padding = _dense_pad_input(x, g)
        w4 = _dense_weight4d(w_train, w_frozen, meta, n_frozen, g)
        y = F.conv2d(xin, w4, bias, (g.stride_h, g.stride_w), padding, (g.dil_h, g.dil_w))
        return y.contiguous()
    rb = meta.row_offsets.numel() - 1
    yt = x.new_empty(rb * bm, g.n, g.h_out, g.w_out)
    if meta.col_indices.numel() == 0:
        yt.zero_()
    else:
        hp, wp, _, _ = _padding(g)
        gather = _TapGather(_padded_input(x, g, hp, wp), g, bk, meta.row_indices, meta.col_indices)
        vals = bsmm_cpu.effective_blocks(w_train, w_frozen, meta.storage, meta.aux, meta.element_state, n_frozen)
        w_rows = vals.transpose(0, 1).contiguous()
        bsmm_cpu._gathered_mm(
            lambda s, e: w_rows[:, s:e].reshape(bm, (e - s) * bk),
            None, None, meta.row_offsets, bk, yt.view(rb, bm, m), gather=gather,
        )  # fmt: skip
    y = yt[: g.c_out]
    if bias is not None:
        y += bias.view(-1, 1, 1, 1)
    return y.transpose(0, 1)


def _dyt(dy: torch.Tensor, rows: int) -> torch.Tensor:
    """``dy`` channel-major ``(rows, M)``, zero past ``Cout``; free when ``dy`` is such a view already."""
    n, c, ho, wo = dy.shape
    t = dy.transpose(0, 1)
    if rows == c and t.is_contiguous():
        return t.reshape(c, -1)
    out = _ws.get("conv_dyt", (rows, n, ho, wo), dy)
    out[:c].copy_(t)
    out[c:].zero_()
    return out.view(rows, -1)


def input_grad(dy, w_train, w_frozen, meta, g: ConvGeom, n_frozen) -> torch.Tensor:
    bm, bk = w_train.shape[1:]
    m = g.n * g.h_out * g.w_out
    if not gathered(meta) or m == 0:
        w4 = _dense_weight4d(w_train, w_frozen, meta, n_frozen, g)
        _, explicit = _dense_padding(g)
        if explicit is None:
            shape = (g.n, g.c_in, g.h, g.w)
            dx = torch.nn.grad.conv2d_input(
                shape, w4, dy, (g.stride_h, g.stride_w), (g.pad_h, g.pad_w), (g.dil_h, g.dil_w)
            )
            return dx.contiguous()
        hp, wp, _, _ = _padding(g)
        dxp = torch.nn.grad.conv2d_input((g.n, g.c_in, hp, wp), w4, dy, (g.stride_h, g.stride_w), 0, (g.dil_h, g.dil_w))
        dx = dy.new_zeros(g.n, g.c_in, g.h, g.w)
        h1, w1 = max(0, min(g.h, hp - g.pad_h)), max(0, min(g.w, wp - g.pad_w))
        dx[:, :, :h1, :w1] = dxp[:, :, g.pad_h : g.pad_h + h1, g.pad_w : g.pad_w + w1]
        return dx
    hp, wp, _, _ = _padding(g)
    hp, wp = max(hp, g.pad_h + g.h), max(wp, g.pad_w + g.w)
    dxp = dy.new_zeros(g.c_pad, g.n, hp, wp)
    if meta.col_indices.numel():
        rb = meta.row_offsets.numel() - 1
        used, per_tap = _used_columns(meta.col_indices), g.c_pad // bk
        dyt = _dyt(dy, rb * bm).view(rb, bm, m)
        vals = bsmm_cpu.effective_blocks(w_train, w_frozen, meta.storage, meta.aux, meta.element_state, n_frozen)
        w_cols = vals[meta.block_index_t.long()].permute(2, 0, 1).contiguous()
        # Empty block columns have empty ranges, so the used columns' ranges abut.
        offsets = torch.cat([meta.col_offsets.long()[used], meta.col_offsets.long()[-1:]])
        dcols = _ws.get("conv_cols", (used.numel(), bk, m), dy)
        bsmm_cpu._gathered_mm(
            lambda s, e: w_cols[:, s:e].reshape(bk, (e - s) * bm),
            dyt, meta.row_indices_t.long(), offsets, bm, dcols,
        )  # fmt: skip
        dcols = dcols.view(used.numel(), bk, g.n, g.h_out, g.w_out)
        # Add each tap's slabs back where the tap read them, one strided add_ per run of adjacent
        # channel blocks (index_add_ on the strided view measured 6x slower than add_ here).
        tap = torch.div(used, per_tap, rounding_mode="floor")
        brk = torch.ones(used.numel(), dtype=torch.bool, device=used.device)
        brk[1:] = used[1:] != used[:-1] + 1
        brk[1:] |= tap[1:] != tap[:-1]
        starts = brk.nonzero().squeeze(1).tolist() + [used.numel()]
        first = (used - tap * per_tap).tolist() if len(starts) > 1 else []
        taps = tap.tolist()
        for u0, u1 in zip(starts[:-1], starts[1:], strict=True):
            r, s = divmod(taps[u0], g.kw)
            c0 = first[u0]
            _tap_view(dxp, g, bk, r, s)[c0 : c0 + u1 - u0].add_(dcols[u0:u1])
    dx = dxp[: g.c_in, :, g.pad_h : g.pad_h + g.h, g.pad_w : g.pad_w + g.w]
    if dx.shape != dxp.shape:
        dx = dx.contiguous()
    return dx.transpose(0, 1)


def weight_grad(dy, x, meta, g: ConvGeom, block_size) -> torch.Tensor:
    bm, bk = block_size
    tidx = meta.train_index.long()
    n_train = tidx.numel()
    if n_train == 0:
        return x.new_zeros(0, bm, bk)
    m = g.n * g.h_out * g.w_out
    rb, cb = meta.row_offsets.numel() - 1, meta.col_offsets.numel() - 1
    t_rows = meta.row_indices.long()[tidx]
    t_cols = meta.col_indices.long()[tidx]
    if not gathered(meta) or m == 0:
        xin, padding = _dense_pad_input(x, g)
        w_shape = (g.c_out, g.c_in, g.kh, g.kw)
        g4 = torch.nn.grad.conv2d_weight(xin, w_shape, dy, (g.stride_h, g.stride_w), padding, (g.dil_h, g.dil_w))
        gm = F.pad(g4.permute(0, 2, 3, 1), (0, g.c_pad - g.c_in, 0, 0, 0, 0, 0, rb * bm - g.c_out))
        dw = gm.reshape(rb, bm, cb, bk)[t_rows, :, t_cols, :]
        return bsmm_cpu.mask_mixed_grad_(dw, meta)
    hp, wp, _, _ = _padding(g)
    gather = _TapGather(_padded_input(x, g, hp, wp), g, bk, t_rows, t_cols)
    dw = bsmm_cpu.gathered_weight_grad(_dyt(dy, rb * bm), t_rows, rb, bm, bk, gather)
    return bsmm_cpu.mask_mixed_grad_(dw, meta)
