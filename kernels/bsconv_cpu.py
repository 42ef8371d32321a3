"""CPU path for the block-sparse convolution: GEMMs over the computed blocks, no im2col.

Why one file of this size: one operation family's CPU path (STYLE.md 2 splits past about 600 lines):
the route choice (:func:`path` and its crossovers), the output strides ``functional.conv`` promises
(:func:`output_view`) and the three passes of every route, which must all agree on one padded input
``xp`` and one output layout. The native kernels are ``native/bsconv.cpp``; the workspace, the
gathered GEMMs and the block values are shared with the linear path (``workspace.py``, ``bsmm_cpu.py``).

Import path: ``sparsekern.kernels.bsconv_cpu`` (this folder, ``kernels/``, installs as ``sparsekern.kernels``).

Same operands and results as the Triton launchers in ``bsconv.py``: ``x``
``(N, Cin, H, W)`` and ``dy`` ``(N, Cout, Ho, Wo)`` in any memory format, the
weight in the matrix view of ``sparsekern/convview.py`` (a block is ``bm``
output channels by ``bk`` input channels at one filter tap). The input is
first copied once, channel-major and zero-padded, to ``xp (c_pad, N, Hp, Wp)``.
Four ways to run, chosen by :func:`path`:

* ``native`` (fp32 and bf16, block sides multiples of 16, the native build
  present): the kernels in ``native/bsconv.cpp`` run all three passes over
  the computed blocks (see that file); ``y`` is channels_last and ``dx`` takes
  ``x``'s memory format (:func:`dx_format`). The routes below are what fp16 and
  a machine without a C++ compiler run; for fp32 and bf16 they copy their
  results to those strides too (:func:`native_strides`).

* ``plane`` (stride 1, padded planes at most ``PLANE_MAX_WASTE`` times the
  output): every position is computed in padded-plane coordinates
  ``p = (n*Hp + h)*Wp + w``. Tap ``(r, s)`` then reads ``xp`` at ``p + r*dh*Wp
  + s*dw``, so the operand of a block is a plain strided 2-D view of ``xp``
  (channels x positions, shifted) that BLAS reads in place: one GEMM per
  computed block, nothing gathered. The forward writes ``(Cout, N, Hp, Wp)``
  and hands back the ``Ho x Wo`` window as a view; the input gradient adds
  ``W_b^T dy`` into the shifted window of a padded ``dx``; the weight gradient
  is ``dy_row @ window^T``. The price is the positions outside the output
  window (``Hp*Wp / (Ho*Wo)``: 1.07 at 56x56, 1.31 at 14x14 for a 3x3 conv).
* ``gather`` (strided convolutions): for a tap the slab of a channel block is
  the strided view ``xp[cb, :, r*dh::sh, s*dw::sw]``; the slabs of a block
  row are gathered (one ``index_select`` per run of blocks at one tap) into
  ``bsmm_cpu``'s block-row GEMMs. The input gradient runs the block-column
  GEMMs and adds each tap's slabs back into a padded ``dx``.
* ``dense``: above the dense crossover (:func:`gathered`), one ``F.conv2d`` on
  the masked weight.

Loops run in Python over blocks (plane) or over block rows/columns and tap
runs (gather), never over elements; the index metadata comes from the layout.

Measured on this project's 2-core CPU (fp32, 3x3 256->256 at 14x14, batch 32,
32x32 blocks, density 0.1, one call each): forward / input gradient / weight
gradient 9.5 / 10.4 / 14.5 ms on planes against 11 / 16 / 21 ms gathered.

Conversions: NCHW and channels_last inputs both cost the one copy into
``xp``. Outputs are views of channel-major buffers (``y`` lives as
``(Cout, N, ., .)``), which saves a copy; :func:`output_view` builds them,
and ``functional.conv`` reports the same strides to ``torch.compile``.
"""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F

from . import bsmm_cpu, native
from .meta import ConvGeom
from .workspace import workspace


def _padding(g: ConvGeom) -> tuple[int, int, int, int]:
    """Padded input extents ``(Hp, Wp)`` and the bottom/right padding the output needs (may be < 0)."""
    hp = (g.h_out - 1) * g.stride_h + g.dil_h * (g.kh - 1) + 1
    wp = (g.w_out - 1) * g.stride_w + g.dil_w * (g.kw - 1) + 1
    return hp, wp, hp - g.pad_h - g.h, wp - g.pad_w - g.w


def _padded_input(x: torch.Tensor, g: ConvGeom, hp: int, wp: int, xp: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` channel-major and zero-padded: ``(c_pad, N, Hp, Wp)``, into ``xp`` or a reused buffer.

    ``Hp``/``Wp`` are exactly the rows/columns the output reads, so input rows
    beyond them (a stride that does not divide) are dropped.
    """
    if xp is None:
        xp = workspace.get("conv_xp", (g.c_pad, g.n, hp, wp), x)
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
    """``F.conv2d`` arguments for the dense fallback: symmetric padding, or an explicit pad first.

    Symmetric padding serves whenever it yields the geometry's output size, also when the strided
    output never reads the last padded rows (a 7x7 stride-2 stem at 224: 3 rows above, 2 read below).
    An explicit ``F.pad`` there had cost that stem's step a copy of ``x`` per pass and a zero-filled
    ``dx`` (about 30 ms of 420, batch 32). Only asymmetric padding (``padding='same'`` with an even
    kernel) needs the explicit pad.
    """
    _, _, pb, pr = _padding(g)
    h_sym = (g.h + 2 * g.pad_h - g.dil_h * (g.kh - 1) - 1) // g.stride_h + 1
    w_sym = (g.w + 2 * g.pad_w - g.dil_w * (g.kw - 1) - 1) // g.stride_w + 1
    if (h_sym, w_sym) == (g.h_out, g.w_out):
        return (g.pad_h, g.pad_w), None
    return 0, (g.pad_w, pr, g.pad_h, pb)


def _dense_weight4d(w_train, w_frozen, meta, n_frozen, g: ConvGeom) -> torch.Tensor:
    bm, bk = w_train.shape[1:]
    wm = bsmm_cpu.dense_weight(w_train, w_frozen, meta, n_frozen, g.c_out, g.kh * g.kw * g.c_pad)
    # A fresh NCHW copy, not the permuted view: a (Cout, kh, kw, Cin)-strided weight (and, for 1x1 kernels,
    # even .contiguous() of it) looks channels_last to torch, which then runs the conv channels_last and
    # converts x, dy and the results (1x1 1024->256 at 14x14: about 20 ms of copies per step).
    w4 = wm.view(g.c_out, g.kh, g.kw, g.c_pad)[..., : g.c_in].permute(0, 3, 1, 2)
    return w4.clone(memory_format=torch.contiguous_format)


def _dense_pad_input(x, g: ConvGeom):
    padding, explicit = _dense_padding(g)
    if explicit is not None:
        # Negative amounts crop rows the strided output never reads.
        x = F.pad(x, explicit)
    return x, padding


# Above this share of the dense conv's work (keyed by the block's smaller side) the blocks lose to one
# F.conv2d on the masked weight. Measured on this project's 2-core CPU (fp32, batch 32, full step):
# with 32x32 blocks the block path wins up to 0.3 for 3x3 256->256 at 14x14 (106.9 vs 110.6 ms) and
# 3x3 64->64 at 56x56 (113 vs 148 ms), loses at 0.4, and wins up to 0.4 for 1x1 1024->256 at 14x14;
# with 64x64 blocks it still wins at 0.5 on 3x3 256->256 (132 vs 166 ms). 16 and 128 are not measured.
DENSE_CROSSOVER = {16: 0.15, 32: 0.3, 64: 0.6, 128: 0.6}

# The same for the native kernels (fp32 and bf16; block sides multiples of 16), from the full step's
# CPU time on one thread against nn.Conv2d's, timed in turn (2-core AVX2 EPYC, batch 32, slab-packed
# blocks, huge-page outputs, dx in x's memory format): 3x3 256->256 at 14x14, 32x32 blocks, 1.29x at
# density 0.75, 1.14x at 0.85, 1.09x at 0.9. Measured before those changes (the kernels were slower
# then, so these stay on the safe side): 64x64 1.41x at 0.6, 1.15x at 0.7, 1.02x at 0.8; 16x16 1.31x
# at 0.7. 128 is not measured and takes 64's value.
NATIVE_CROSSOVER = {16: 0.8, 32: 0.85, 64: 0.75, 128: 0.75}
# A 1x1 conv is a plain GEMM over channels, which oneDNN runs near its peak, while the kernels still
# repack x (a transpose for NCHW): 1x1 1024->256 at 14x14, 32x32 blocks, 1.21x at density 0.6, 1.05x
# at 0.7, about 1.0x at 0.8 (measured as above). The other block sizes take 32's value.
NATIVE_CROSSOVER_1X1 = {16: 0.65, 32: 0.65, 64: 0.65, 128: 0.65}


def gathered(meta, g: ConvGeom, crossover: dict | None = None) -> bool:
    """Whether the block path runs (else the dense fallback).

    Decided on the computed blocks' share of the dense conv's FLOPs, padding
    channels and rows included, against ``DENSE_CROSSOVER``: a 3-channel stem
    in 32-wide blocks computes 10x its dense work even at block density 1.
    """
    bm, bk = meta.element_state.shape[1:]  # (n_mixed, bm, bk) even when n_mixed == 0
    work = meta.col_indices.numel() * bm * bk
    crossover = DENSE_CROSSOVER if crossover is None else crossover
    return work <= crossover.get(min(bm, bk), 0.3) * g.c_out * g.c_in * g.kh * g.kw


# The plane path computes Hp*Wp positions per image for Ho*Wo outputs; beyond this ratio the gathered
# path is used instead (3x3 at 14x14 is 1.31, measured 1.4x faster on planes; 7x7 maps would be 1.65).
PLANE_MAX_WASTE = 1.5


def _plane(g: ConvGeom):
    """``(Hp, Wp, tail)`` of the plane path, or ``None`` when it does not apply (see :func:`path`)."""
    if (g.stride_h, g.stride_w) != (1, 1):
        return None
    hp, wp, _, _ = _padding(g)
    hp, wp = max(hp, g.pad_h + g.h), max(wp, g.pad_w + g.w)
    if hp * wp > PLANE_MAX_WASTE * g.h_out * g.w_out:
        return None
    # Shifted windows of the last image reach this far past the planes.
    return hp, wp, (g.kh - 1) * g.dil_h * wp + (g.kw - 1) * g.dil_w


def native_strides(meta, dtype: torch.dtype) -> bool:
    """Whether the block path of this layout and dtype returns channels_last results (the native
    kernels' layout): fp32 or bf16 with block sides that are multiples of 16.

    A function of the layout and dtype only, never of whether the native kernels were built in this
    process: compiled graphs bake these strides in (see ``bsmm_cpu.transposed_output``). Without the
    native build, the torch-level paths copy their results into the same strides.
    """
    bm, bk = meta.element_state.shape[1:]  # (n_mixed, bm, bk) even when n_mixed == 0
    return dtype in native.DTYPES and bm % 16 == 0 and bk % 16 == 0


def path(meta, g: ConvGeom, dtype: torch.dtype = torch.float32) -> str:
    """``"dense"``, ``"native"``, ``"plane"`` or ``"gather"``: how this layout, geometry and dtype run
    (module docstring)."""
    nat = native_strides(meta, dtype)
    crossover = (NATIVE_CROSSOVER_1X1 if g.kh * g.kw == 1 else NATIVE_CROSSOVER) if nat else DENSE_CROSSOVER
    if g.n * g.h_out * g.w_out == 0 or not gathered(meta, g, crossover):
        return "dense"
    if nat and native.available():
        return "native"
    return "plane" if _plane(g) is not None else "gather"


def _torch_output(like: torch.Tensor, g: ConvGeom, meta, pass_: str, route: str):
    """``(buffer, view)``: where a torch-level pass (``route``: dense, plane, gather) writes, and the
    ``(N, C, H, W)`` view of it that pass produces."""
    c = g.c_out if pass_ == "forward" else g.c_in
    shape = (g.n, c, *((g.h_out, g.w_out) if pass_ == "forward" else (g.h, g.w)))
    if route == "dense":
        view = like.new_empty(shape)
        return view, view
    bm, bk = meta.element_state.shape[1:]
    rows = (meta.row_offsets.numel() - 1) * bm if pass_ == "forward" else g.c_pad
    if route == "plane":
        hp, wp, tail = _plane(g)
        planes = g.n * hp * wp
        buf = like.new_empty(rows, planes + (0 if pass_ == "forward" else tail))
        full = buf[:, :planes].view(rows, g.n, hp, wp)
        if pass_ == "forward":
            return buf, full[:c, :, : g.h_out, : g.w_out].transpose(0, 1)
        return buf, full[:c, :, g.pad_h : g.pad_h + g.h, g.pad_w : g.pad_w + g.w].transpose(0, 1)
    if pass_ == "forward":
        buf = like.new_empty(rows, g.n, g.h_out, g.w_out)
        return buf, buf[:c].transpose(0, 1)
    buf = like.new_empty(c, g.n, g.h, g.w)
    return buf, buf.transpose(0, 1)


def output_view(like: torch.Tensor, g: ConvGeom, meta, pass_: str) -> torch.Tensor:
    """An empty ``forward`` or ``input_grad`` result with the strides this path returns (for fake tensors).

    ``like`` gives the dtype and device; for ``input_grad`` it is ``x``, whose memory format ``dx``
    takes on the block paths and the dense route (as ``nn.Conv2d``'s does): a channels_last ``dx`` for an NCHW leaf
    would cost autograd a full copy into ``x``'s strides (27 ms of a 117 ms step for 1x1 1024->256 at
    14x14, batch 32), and the kernels write any strides at the same cost.
    """
    route = path(meta, g, like.dtype)
    dx_shape = (g.n, g.c_in, g.h, g.w)
    if route != "dense" and native_strides(meta, like.dtype):
        if pass_ == "forward":
            return _channels_last(like, (g.n, g.c_out, g.h_out, g.w_out))
        return torch.empty(dx_shape, dtype=like.dtype, device=like.device, memory_format=dx_format(like))
    if route == "dense" and pass_ == "input_grad":  # as nn.Conv2d's dx
        return torch.empty(dx_shape, dtype=like.dtype, device=like.device, memory_format=dx_format(like))
    return _torch_output(like, g, meta, pass_, route)[1]  # never "native" here


def dx_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of ``dx`` on the block paths: channels_last for a channels_last ``x`` (one
    that is not also NCHW-contiguous), else NCHW."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _channels_last(like: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=torch.channels_last)


def _promised(t: torch.Tensor, meta, fmt: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """A torch-level block result in the strides :func:`output_view` promises (a copy without the native build)."""
    return t.contiguous(memory_format=fmt) if native_strides(meta, t.dtype) else t


def _tap_offset(g: ConvGeom, t: int, wp: int) -> int:
    r, s = divmod(t, g.kw)
    return r * g.dil_h * wp + s * g.dil_w


def _plane_input(x: torch.Tensor, g: ConvGeom) -> torch.Tensor:
    """Padded channel-major ``x`` as ``(c_pad, N*Hp*Wp + tail)`` rows (a reused buffer), tail zeroed."""
    hp, wp, tail = _plane(g)
    planes = g.n * hp * wp
    buf = workspace.get("conv_plane_x", (g.c_pad, planes + tail), x)
    buf[:, planes:].zero_()
    _padded_input(x, g, hp, wp, buf[:, :planes].view(g.c_pad, g.n, hp, wp))
    return buf


def _plane_dy(dy: torch.Tensor, g: ConvGeom, rows: int) -> torch.Tensor:
    """``dy`` in the output window of zeroed planes: ``(rows, N*Hp*Wp)``, a reused buffer."""
    hp, wp, _ = _plane(g)
    buf = workspace.get("conv_plane_dy", (rows, g.n, hp, wp), dy)
    buf[g.c_out :].zero_()
    buf[: g.c_out, :, g.h_out :].zero_()
    buf[: g.c_out, :, : g.h_out, g.w_out :].zero_()
    buf[: g.c_out, :, : g.h_out, : g.w_out].copy_(dy.transpose(0, 1))
    return buf.view(rows, -1)


def _block_walk(meta, g: ConvGeom, bk: int, order=None):
    """Per computed block (CSR order, or ``order``): ``(block row, channel block, tap)`` as Python lists."""
    rows, cols = meta.row_indices.long(), meta.col_indices.long()
    if order is not None:
        rows, cols = rows[order], cols[order]
    per_tap = g.c_pad // bk
    tap = torch.div(cols, per_tap, rounding_mode="floor")
    return rows.tolist(), (cols - tap * per_tap).tolist(), tap.tolist()


def _plane_forward(x, vals, bias, meta, g: ConvGeom, buf: torch.Tensor) -> None:
    """``buf[rows of r] = bias + sum_b W_b @ window_b`` over each block row's computed blocks."""
    bm, bk = vals.shape[1:]
    xs = _plane_input(x, g)
    _, wp, _ = _plane(g)
    planes = buf.shape[1]
    rows, cbs, taps = _block_walk(meta, g, bk)
    bounds = meta.row_offsets.tolist()
    if bias is not None:
        bias = F.pad(bias, (0, buf.shape[0] - bias.shape[0])).view(-1, 1)
    for r in range(len(bounds) - 1):
        out = buf[r * bm : (r + 1) * bm]
        if bounds[r] == bounds[r + 1]:
            out.copy_(bias[r * bm : (r + 1) * bm].expand_as(out)) if bias is not None else out.zero_()
        for j in range(bounds[r], bounds[r + 1]):
            off = _tap_offset(g, taps[j], wp)
            window = xs[cbs[j] * bk : (cbs[j] + 1) * bk, off : off + planes]
            if j > bounds[r]:
                out.addmm_(vals[j], window)
            elif bias is not None:  # the bias rides on the first GEMM of the row (beta = 1)
                torch.addmm(bias[r * bm : (r + 1) * bm], vals[j], window, out=out)
            else:
                torch.mm(vals[j], window, out=out)


def forward(x, w_train, w_frozen, bias, meta, g: ConvGeom, n_frozen) -> torch.Tensor:
    route = path(meta, g, x.dtype)
    if route == "dense":
        xin, padding = _dense_pad_input(x, g)
        w4 = _dense_weight4d(w_train, w_frozen, meta, n_frozen, g)
        y = F.conv2d(xin, w4, bias, (g.stride_h, g.stride_w), padding, (g.dil_h, g.dil_w))
        return y.contiguous()
    vals = bsmm_cpu.effective_blocks(w_train, w_frozen, meta.storage, meta.aux, meta.element_state, n_frozen)
    if route == "native":
        y = _channels_last(x, (g.n, g.c_out, g.h_out, g.w_out))
        b = None if bias is None else bias.float().contiguous()
        return native.conv_forward(x, list(g), vals.float().contiguous(), meta.row_offsets, meta.col_indices, b, y)
    return _promised(_torch_forward(x, vals, bias, meta, g, route), meta)


def _torch_forward(x, vals, bias, meta, g: ConvGeom, route: str) -> torch.Tensor:
    bm, bk = vals.shape[1:]
    buf, y = _torch_output(x, g, meta, "forward", route)
    if route == "plane":
        _plane_forward(x, vals, bias, meta, g, buf)
        return y
    if meta.col_indices.numel() == 0:
        buf.zero_()
    else:
        hp, wp, _, _ = _padding(g)
        gather = _TapGather(_padded_input(x, g, hp, wp), g, bk, meta.row_indices, meta.col_indices)
        w_rows = vals.transpose(0, 1).contiguous()
        rb = meta.row_offsets.numel() - 1
        bsmm_cpu.gathered_mm(
            lambda s, e: w_rows[:, s:e].reshape(bm, (e - s) * bk),
            None, None, meta.row_offsets, bk, buf.view(rb, bm, -1), gather=gather,
        )  # fmt: skip
    if bias is not None:
        y += bias.view(1, -1, 1, 1)
    return y


def _dyt(dy: torch.Tensor, rows: int) -> torch.Tensor:
    """``dy`` channel-major ``(rows, M)``, zero past ``Cout``; free when ``dy`` is such a view already."""
    n, c, ho, wo = dy.shape
    t = dy.transpose(0, 1)
    if rows == c and t.is_contiguous():
        return t.reshape(c, -1)
    out = workspace.get("conv_dyt", (rows, n, ho, wo), dy)
    out[:c].copy_(t)
    out[c:].zero_()
    return out.view(rows, -1)


def backward(dy, x, w_train, w_frozen, meta, g: ConvGeom, n_frozen, input_grad: bool, weight_grad: bool):
    """``(dx or None, dw or None)``: both gradients from one preparation of ``dy``.

    ``dw`` holds the trainable blocks (``train_index`` order), zero off their
    trainable elements.
    """
    bm, bk = w_train.shape[1:]
    route = path(meta, g, dy.dtype)
    if route == "dense":
        return _dense_backward(dy, x, w_train, w_frozen, meta, g, n_frozen, input_grad, weight_grad)
    if route == "native":
        dx, dw = _native_backward(dy, x, w_train, w_frozen, meta, g, n_frozen, input_grad, weight_grad)
    else:
        dx, dw = _torch_backward(dy, x, w_train, w_frozen, meta, g, n_frozen, input_grad, weight_grad, route)
        dx = None if dx is None else _promised(dx, meta, dx_format(x))
    return dx, None if dw is None else bsmm_cpu.mask_mixed_grad_(dw, meta)


def _native_backward(dy, x, w_train, w_frozen, meta, g: ConvGeom, n_frozen, input_grad: bool, weight_grad: bool):
    bm, bk = w_train.shape[1:]
    tidx = meta.train_index.long()
    dx = torch.empty_like(x, memory_format=dx_format(x)) if input_grad else None
    dw = x.new_empty(tidx.numel(), bm, bk, dtype=torch.float32) if weight_grad else None
    if dx is None and dw is None:
        return None, None
    vals = bsmm_cpu.effective_blocks(w_train, w_frozen, meta.storage, meta.aux, meta.element_state, n_frozen)
    t_rows = meta.row_indices[tidx].contiguous() if weight_grad else None
    t_cols = meta.col_indices[tidx].contiguous() if weight_grad else None
    native.conv_backward(
        dy, x, list(g), vals.float().contiguous(), meta.col_offsets, meta.row_indices_t, meta.block_index_t,
        dx, t_rows, t_cols, dw,
    )  # fmt: skip
    return dx, None if dw is None else dw.to(x.dtype)


def _torch_backward(dy, x, w_train, w_frozen, meta, g, n_frozen, input_grad: bool, weight_grad: bool, route: str):
    bm, bk = w_train.shape[1:]
    rb = meta.row_offsets.numel() - 1
    n_train = meta.train_index.numel()
    dx = dw = None
    if route == "plane":
        dys = _plane_dy(dy, g, rb * bm) if meta.col_indices.numel() else None
        if input_grad:
            dx = _plane_input_grad(dys, w_train, w_frozen, meta, g, n_frozen)
        if weight_grad:
            dw = _plane_weight_grad(dys, x, meta, g, bm, bk) if n_train else x.new_zeros(0, bm, bk)
    else:
        dyt = _dyt(dy, rb * bm) if meta.col_indices.numel() else None
        if input_grad:
            dx = _gather_input_grad(dyt, w_train, w_frozen, meta, g, n_frozen)
        if weight_grad:
            dw = _gather_weight_grad(dyt, x, meta, g, bm, bk) if n_train else x.new_zeros(0, bm, bk)
    return dx, dw


def _dense_backward(dy, x, w_train, w_frozen, meta, g: ConvGeom, n_frozen, input_grad: bool, weight_grad: bool):
    """Both gradients in one ``convolution_backward`` call on the masked weight, as ``nn.Conv2d`` runs them."""
    bm, bk = w_train.shape[1:]
    xin, padding = _dense_pad_input(x, g)
    w4 = _dense_weight4d(w_train, w_frozen, meta, n_frozen, g)
    stride, dilation = (g.stride_h, g.stride_w), (g.dil_h, g.dil_w)
    padding = (padding, padding) if isinstance(padding, int) else padding
    gx, gw, _ = torch.ops.aten.convolution_backward(
        dy, xin, w4, None, stride, padding, dilation, False, [0, 0], 1, [input_grad, weight_grad, False]
    )
    dx = dw = None
    if input_grad:
        if tuple(gx.shape) != (g.n, g.c_in, g.h, g.w):  # explicitly padded (or cropped) input
            _, _, hp, wp = xin.shape
            dx = torch.zeros_like(x, dtype=dy.dtype, memory_format=dx_format(x))
            h1, w1 = max(0, min(g.h, hp - g.pad_h)), max(0, min(g.w, wp - g.pad_w))
            dx[:, :, :h1, :w1] = gx[:, :, g.pad_h : g.pad_h + h1, g.pad_w : g.pad_w + w1]
        else:
            dx = gx.contiguous(memory_format=dx_format(x))
    if weight_grad:
        tidx = meta.train_index.long()
        rb, cb = meta.row_offsets.numel() - 1, meta.col_offsets.numel() - 1
        gm = F.pad(gw.permute(0, 2, 3, 1), (0, g.c_pad - g.c_in, 0, 0, 0, 0, 0, rb * bm - g.c_out))
        dw = gm.reshape(rb, bm, cb, bk)[meta.row_indices.long()[tidx], :, meta.col_indices.long()[tidx], :]
        dw = bsmm_cpu.mask_mixed_grad_(dw, meta)
    return dx, dw


def _plane_input_grad(dys, w_train, w_frozen, meta, g: ConvGeom, n_frozen) -> torch.Tensor:
    """``dx`` on planes: each block adds ``W_b^T @ dy_row`` into the window its tap read."""
    bm, bk = w_train.shape[1:]
    buf, dx = _torch_output(w_train, g, meta, "input_grad", "plane")
    buf.zero_()
    if meta.col_indices.numel() == 0:
        return dx
    _, wp, tail = _plane(g)
    planes = buf.shape[1] - tail
    vals = bsmm_cpu.effective_blocks(w_train, w_frozen, meta.storage, meta.aux, meta.element_state, n_frozen)
    rows, cbs, taps = _block_walk(meta, g, bk)
    for j, (r, cb, t) in enumerate(zip(rows, cbs, taps, strict=True)):
        off = _tap_offset(g, t, wp)
        # addmm_ writes the strided window in place (rows of buf, shifted by the tap).
        buf[cb * bk : (cb + 1) * bk, off : off + planes].addmm_(vals[j].t(), dys[r * bm : (r + 1) * bm])
    return dx


def _plane_weight_grad(dys, x, meta, g: ConvGeom, bm: int, bk: int) -> torch.Tensor:
    """``dW_b = dy_row @ window_b^T`` on planes; ``dys`` is zero outside the output window."""
    xs = _plane_input(x, g)
    _, wp, tail = _plane(g)
    planes = xs.shape[1] - tail
    rows, cbs, taps = _block_walk(meta, g, bk, meta.train_index.long())
    dw = x.new_empty(len(rows), bm, bk)
    for j, (r, cb, t) in enumerate(zip(rows, cbs, taps, strict=True)):
        off = _tap_offset(g, t, wp)
        torch.mm(dys[r * bm : (r + 1) * bm], xs[cb * bk : (cb + 1) * bk, off : off + planes].t(), out=dw[j])
    return dw


def _gather_input_grad(dyt, w_train, w_frozen, meta, g: ConvGeom, n_frozen) -> torch.Tensor:
    """``dx`` by block-column GEMMs into the used columns, each tap's slabs added back where they were read."""
    bm, bk = w_train.shape[1:]
    m = g.n * g.h_out * g.w_out
    hp, wp, _, _ = _padding(g)
    hp, wp = max(hp, g.pad_h + g.h), max(wp, g.pad_w + g.w)
    dxp = workspace.get("conv_dxp", (g.c_pad, g.n, hp, wp), w_train)
    dxp.zero_()
    if meta.col_indices.numel():
        rb = meta.row_offsets.numel() - 1
        used, per_tap = _used_columns(meta.col_indices), g.c_pad // bk
        vals = bsmm_cpu.effective_blocks(w_train, w_frozen, meta.storage, meta.aux, meta.element_state, n_frozen)
        w_cols = vals[meta.block_index_t.long()].permute(2, 0, 1).contiguous()
        # Empty block columns have empty ranges, so the used columns' ranges abut.
        offsets = torch.cat([meta.col_offsets.long()[used], meta.col_offsets.long()[-1:]])
        dcols = workspace.get("conv_cols", (used.numel(), bk, m), w_train)
        bsmm_cpu.gathered_mm(
            lambda s, e: w_cols[:, s:e].reshape(bk, (e - s) * bm),
            dyt.view(rb, bm, m), meta.row_indices_t.long(), offsets, bm, dcols,
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
    buf, dx = _torch_output(w_train, g, meta, "input_grad", "gather")
    buf.copy_(dxp[: g.c_in, :, g.pad_h : g.pad_h + g.h, g.pad_w : g.pad_w + g.w])
    return dx


def _gather_weight_grad(dyt, x, meta, g: ConvGeom, bm: int, bk: int) -> torch.Tensor:
    tidx = meta.train_index.long()
    t_rows, t_cols = meta.row_indices.long()[tidx], meta.col_indices.long()[tidx]
    hp, wp, _, _ = _padding(g)
    gather = _TapGather(_padded_input(x, g, hp, wp), g, bk, t_rows, t_cols)
    return bsmm_cpu.gathered_weight_grad(dyt, t_rows, meta.row_offsets.numel() - 1, bm, bk, gather)
