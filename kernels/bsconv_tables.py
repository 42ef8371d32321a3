"""The conv kernels' host-side tables: per-launch int32 arrays that keep divisions out of the main loops.

Import path: ``sparsekern.kernels.bsconv_tables`` (this folder, ``kernels/``, installs as
``sparsekern.kernels``); ``bsconv.py`` re-exports the public names, which its kernels' docstrings cite.

The forward kernel reads :func:`forward_taps` per CSR position, the input gradient the lines of
:func:`input_grad_lines`; :func:`channel_order` is the stride-1 ordering of the input-gradient work.
Each is built per launch with vectorised torch on the layout's device, with no host sync. Entries that
pair two int32 are packed into one int64, low word first, as ``tiles._unpack`` reads them back, so a
kernel prefetches a pair with one 8-byte load. The channel order, tap numbering and store slots are
those of ``bsconv.py``'s module docstring (matrix view ``(Cout, kh*kw*c_pad)``, ``K`` ordered
``(kh, kw, Cin)``, ``CPB = c_pad // bk`` channel blocks per tap).
"""

from __future__ import annotations

import functools

import torch

from .meta import ConvGeom, Meta

__all__ = [
    "channel_order",
    "forward_taps",
    "input_grad_lines",
    "padded_aux",
    "pixel_tile",
    "rect_forward_table",
    "rect_input_grad_table",
    "rect_table",
    "table_reason",
]


def _pack_pairs(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``(low, high)`` int32 pairs as one int64 per entry (low word first), as ``tiles._unpack`` reads them."""
    return torch.stack([low, high], -1).to(torch.int32).contiguous().view(torch.int64).squeeze(-1)


def forward_taps(meta: Meta, geom: ConvGeom, bk: int) -> torch.Tensor:
    """Per CSR position ``p``: ``[(c % CPB, slot), (r*dil_h, s*dil_w)]`` of its block, a ``(2, nnzb)`` int64 tensor.

    Each entry packs two int32 (low word first, ``tiles._unpack``). ``c % CPB``
    is the block's channel block within its tap ``t = c // CPB = r*kw + s``;
    the forward kernel prefetches both pairs with the block's aux, so its loop
    divides by nothing and loads two words. Example: ``kw = 2``, ``CPB = 2``,
    dilation 1, ``col_indices [0, 3, 2]`` (taps 0, 1, 1), ``storage [0, 2,
    1]``: pairs ``[(0, 0), (1, 2), (0, 1)]`` and ``[(0, 0), (0, 1), (0, 1)]``.
    """
    cpb = geom.c_pad // bk
    c = meta.col_indices
    tap = torch.div(c, cpb, rounding_mode="floor")
    kr = torch.div(tap, geom.kw, rounding_mode="floor")
    low = torch.stack([c - tap * cpb, kr * geom.dil_h])
    high = torch.stack([meta.storage, (tap - kr * geom.kw) * geom.dil_w])
    return _pack_pairs(low, high)


def _tap_phases(geom: ConvGeom, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tap_h, tap_w, phase)`` of taps ``0..kh*kw-1`` (int64): the stride phase each tap hits."""
    t = torch.arange(geom.kh * geom.kw, device=device)
    tap_h = torch.div(t, geom.kw, rounding_mode="floor") * geom.dil_h
    tap_w = (t % geom.kw) * geom.dil_w
    return tap_h, tap_w, (tap_h % geom.stride_h) * geom.stride_w + tap_w % geom.stride_w


def input_grad_lines(meta: Meta, geom: ConvGeom, bk: int) -> tuple[torch.Tensor, ...]:
    """The input gradient's lines: ``(offsets, pairs, aux, order)``.

    Line ``L = phase*CPB + cb`` (``phase = ph*stride_w + pw``) lists, in the
    transposed traversal's order, the blocks of every column ``t*CPB + cb``
    whose tap ``t = (r, s)`` hits stride phase ``(ph, pw) = (r*dil_h %
    stride_h, s*dil_w % stride_w)``. Per entry, ``pairs`` (``(2, nnzb)``
    int64, each two int32 as in :func:`forward_taps`) holds ``(block row,
    slot)`` and the output-pixel offsets ``(oh, ow)``, ``oh = (h_first + pad_h
    - r*dil_h) / stride_h`` (``h_first = (ph - pad_h) mod stride_h``, the
    phase's first input row; exact since ``r*dil_h = ph`` mod ``stride_h``),
    and ``aux`` (int32) the mixed index; ``offsets`` (int32, ``(n_lines +
    1,)``) points into them and ``order`` (int32) lists the lines longest
    first. All of it vectorised, with no host sync.

    Example: a 1x2 kernel (taps ``s = 0, 1``), stride 2, no padding, ``CPB =
    1``: tap 0 hits phase 0 with ``ow = 0``, tap 1 phase 1 with ``ow = (1 - 1)
    / 2 = 0``; columns 0 and 1 become lines 0 and 1.
    """
    cpb = geom.c_pad // bk
    sh, sw = geom.stride_h, geom.stride_w
    dev = meta.col_offsets.device
    tap_h, tap_w, tap_phase = _tap_phases(geom, dev)
    h_first = (tap_h % sh - geom.pad_h) % sh  # torch's % is a floor remainder: non-negative here
    w_first = (tap_w % sw - geom.pad_w) % sw
    oh_tap = torch.div(h_first + geom.pad_h - tap_h, sh, rounding_mode="floor")
    ow_tap = torch.div(w_first + geom.pad_w - tap_w, sw, rounding_mode="floor")
    # Per transposed position: its column, tap and line.
    c = meta.col_indices[meta.block_index_t.long()].long()
    tap = torch.div(c, cpb, rounding_mode="floor")
    line = tap_phase[tap] * cpb + (c - tap * cpb)
    perm = torch.sort(line, stable=True).indices
    low = torch.stack([meta.row_indices_t.long(), oh_tap[tap]])[:, perm]
    high = torch.stack([meta.storage_t.long(), ow_tap[tap]])[:, perm]
    aux = meta.aux_t[perm].contiguous()
    # Per line counts from the column counts (index_add_, not bincount: no sync on CUDA).
    n_lines = sh * sw * cpb
    col_counts = meta.col_offsets.diff().view(-1, cpb).long()
    counts = torch.zeros(sh * sw, cpb, dtype=torch.long, device=dev).index_add_(0, tap_phase, col_counts).view(-1)
    offsets = torch.zeros(n_lines + 1, dtype=torch.int32, device=dev)
    offsets[1:] = torch.cumsum(counts, 0)
    order = torch.argsort(counts, descending=True, stable=True).to(torch.int32)
    return offsets, _pack_pairs(low, high), aux, order


def channel_order(meta: Meta, geom: ConvGeom, bk: int) -> torch.Tensor:
    """Input-channel blocks by their computed-block count over all taps, longest first (int32).

    (The input gradient orders its (phase, channel block) lines itself, see
    :func:`input_grad_lines`; this is the stride-1 special case, one phase.)

    Example: ``kh*kw = 2`` taps, ``CPB = 2`` channel blocks, ``col_offsets
    [0, 1, 4, 4, 5]`` (columns ``(tap 0, cb 0), (0, 1), (1, 0), (1, 1)`` hold
    1, 3, 0, 1 blocks): counts per channel block ``[1, 4]``, order ``[1, 0]``.
    """
    counts = meta.col_offsets.diff().view(geom.kh * geom.kw, geom.c_pad // bk).sum(0)
    return torch.argsort(counts, descending=True, stable=True).to(torch.int32)


@functools.cache
def pixel_tile(block_m: int, n: int, h: int, w: int) -> tuple[int, int, int]:
    """``(TN, TH, TW)``, powers of two with ``TN*TH*TW = block_m``: the rectangle of the descriptor kernels
    (``bsconv_tma.py``) that computes the fewest pixels past ``n`` images of ``h x w``.

    Ties go to the wider rectangle (longer contiguous rows). Example: 256 tokens over 14x14 images is
    ``(1, 16, 16)``, 1.31x the pixels; over 56x56 ``(1, 4, 64)``, 1.14x; over 7x7, batch 8, ``(4, 8, 8)``.
    """
    best = None
    tw = 1
    while tw <= block_m:
        th = 1
        while tw * th <= block_m:
            tn = block_m // (tw * th)
            cost = -(-n // tn) * tn * -(-h // th) * th * -(-w // tw) * tw
            key = (cost, -tw, -th)
            if best is None or key < best[0]:
                best = (key, (tn, th, tw))
            th *= 2
        tw *= 2
    return best[1]


# The descriptor kernels' table entry, one int64: ``row24 | a8 << 24`` low, ``field24 | b8 << 24`` high.
FIELD_BITS, OFFSET_LIMIT = 24, 127
PHASE_SHIFT = 20  # a strided forward's field: the channel offset below bit 20, the row phase above


def rect_table(row: torch.Tensor, field: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One int64 per entry plus a zero sentinel, as ``bsconv_tma._table_row`` reads it.

    ``row`` and ``field`` are 24 unsigned bits (the block's first store row; a channel offset), ``a``
    and ``b`` signed 8-bit offsets above them (:func:`table_reason` checks that the geometry keeps them
    so). One word means one load and two register moves per block in the kernels' main loops; each
    field comes out with one mask or one arithmetic shift (which sm_90 fuses into the add that uses it).
    The zero sentinel lets the prefetch past a line's last entry run without a clamp.
    """
    mask = (1 << FIELD_BITS) - 1
    low = (row & mask) | ((a & 0xFF) << FIELD_BITS)
    high = (field & mask) | ((b & 0xFF) << FIELD_BITS)
    packed = _pack_pairs(low, high)
    return torch.cat([packed, packed.new_zeros(1)])


def table_reason(geom: ConvGeom, bm: int, bk: int, store_rows: int) -> str | None:
    """Why a geometry's entries do not fit :func:`rect_table` (``None``: they do)."""
    sh, sw = geom.stride_h, geom.stride_w
    limit = 1 << FIELD_BITS
    if store_rows > limit:
        return f"the value store has {store_rows} rows, past the tables' {FIELD_BITS}-bit store row"
    phased = sh > 1 or sw > 1
    inner_end = sw * geom.c_in if phased else geom.c_pad
    if inner_end > (1 << PHASE_SHIFT if phased else limit) or (phased and sh > 1 << (FIELD_BITS - PHASE_SHIFT)):
        return f"{inner_end} channels (times the stride) exceed the tables' channel field"
    if -(-geom.c_out // bm) * bm > limit:
        return f"C_out={geom.c_out} exceeds the tables' channel field"
    reach = max(geom.pad_h, geom.pad_w, (geom.kh - 1) * geom.dil_h, (geom.kw - 1) * geom.dil_w)
    if reach > OFFSET_LIMIT:
        return f"a tap offset of {reach} pixels exceeds the tables' 8-bit offsets"
    return None


def padded_aux(aux: torch.Tensor) -> torch.Tensor:
    """``aux`` with a trailing ``-1`` (not mixed), for the same unclamped prefetch."""
    return torch.cat([aux, aux.new_full((1,), -1)])


def rect_forward_table(meta: Meta, geom: ConvGeom, bm: int, bk: int) -> torch.Tensor:
    """Per CSR position: where the descriptor forward (``bsconv_tma.py``) reads the block's ``x`` box.

    A :func:`rect_table` of ``slot * bm`` (the block's first store row), the channel field and the
    offsets ``(dh, dw)``. A tap's input offset ``d = r*dil_h - pad_h`` is row ``dh = floor(d / stride_h)``
    of phase ``d mod stride_h`` (columns likewise, ``pw``); the field is ``inner = pw*C_in + (c % CPB)*bk``,
    the box's first element of the stride-phase view's last dimension, with the row phase above
    :data:`PHASE_SHIFT` for a strided conv. Example: stride 1, pad 1, dilation 1, 3x3, ``CPB = 1``:
    block column 4 (the centre tap) reads box offsets ``(0, 0)``, column 0 ``(-1, -1)``.
    """
    cpb = geom.c_pad // bk
    sh, sw = geom.stride_h, geom.stride_w
    c = meta.col_indices.long()
    tap = torch.div(c, cpb, rounding_mode="floor")
    kr = torch.div(tap, geom.kw, rounding_mode="floor")
    d_h = kr * geom.dil_h - geom.pad_h
    d_w = (tap - kr * geom.kw) * geom.dil_w - geom.pad_w
    ph, pw = d_h % sh, d_w % sw  # floor remainders: non-negative
    field = pw * geom.c_in + (c - tap * cpb) * bk + (ph << PHASE_SHIFT)
    dh = torch.div(d_h - ph, sh, rounding_mode="floor")
    dw = torch.div(d_w - pw, sw, rounding_mode="floor")
    return rect_table(meta.storage.long() * bm, field, dh, dw)


def rect_input_grad_table(pairs: torch.Tensor, bm: int) -> torch.Tensor:
    """The lines of :func:`input_grad_lines` as the descriptor input gradient reads them: a :func:`rect_table`
    of ``slot * bm`` (the block's first store row), ``r * bm`` (its first ``dy`` channel) and ``(oh, ow)``."""
    row_slot = pairs[0].view(torch.int32).view(-1, 2).long()
    out = pairs[1].view(torch.int32).view(-1, 2).long()
    return rect_table(row_slot[:, 1] * bm, row_slot[:, 0] * bm, out[:, 0], out[:, 1])
