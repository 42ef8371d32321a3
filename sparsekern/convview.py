"""The matrix view of a convolution weight, and conv geometry.

A conv weight ``(Cout, Cin, kh, kw)`` is the GEMM matrix ``(Cout, kh*kw*Cin)``
with ``K`` ordered ``(kh, kw, Cin)``: column ``(r*kw + s)*Cin + c`` holds
``W[:, c, r, s]``. A sparsity block is then ``bm`` output channels by ``bk``
input channels at one filter tap ``(r, s)``.

``Cin`` is padded up to ``c_pad = ceil(Cin / bk) * bk`` inside each tap so that
a block column never straddles two taps; the padding columns are pruned, so
they are never computed. The layout is therefore an ordinary
:class:`~sparsekern.layout.BlockLayout` of shape ``(Cout, kh*kw*c_pad)``, and
everything that works on linear layouts (CSR, the transposed walk, trainable
sets, mixed blocks, ``set_masks``) works on conv weights unchanged.

Worked example, ``Cout = 2``, ``Cin = 3``, ``kh = 1``, ``kw = 2``, ``bk = 2``
(``c_pad = 4``)::

    columns:  tap 0: c0 c1 | c2 pad || tap 1: c0 c1 | c2 pad
    blocks:   col 0        | col 1  || col 2        | col 3

What structured pruning looks like in this view:

* a pruned filter (output channel) is a zero row; ``bm`` consecutive pruned
  filters empty a whole block row;
* a pruned input channel is a zero column at every tap; ``bk`` aligned pruned
  input channels empty ``kh*kw`` block columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sparsekern.kernels.meta import ConvGeom

__all__ = ["ConvGeom", "conv_geometry", "from_matrix", "matrix_shape", "padded_channels", "pair", "to_matrix"]


def pair(v, name: str) -> tuple[int, int]:
    """``v`` as an ``(h, w)`` pair of ints (an int means both); ``TypeError`` naming ``name`` otherwise."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, Sequence) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        return (v[0], v[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def padded_channels(c_in: int, bk: int) -> int:
    """``c_in`` rounded up to a multiple of ``bk``."""
    return -(-c_in // bk) * bk


def matrix_shape(weight_shape: Sequence[int], bk: int) -> tuple[int, int]:
    """The ``(Cout, kh*kw*c_pad)`` shape of the matrix view of a ``(Cout, Cin, kh, kw)`` weight."""
    c_out, c_in, kh, kw = weight_shape
    return c_out, kh * kw * padded_channels(c_in, bk)


def to_matrix(t: torch.Tensor, bk: int, fill=0) -> torch.Tensor:
    """``(Cout, Cin, kh, kw)`` to the matrix view ``(Cout, kh*kw*c_pad)``, padding columns set to ``fill``.

    Works for values and masks alike (pass ``fill=False`` for bool masks).

    Example:
        >>> to_matrix(torch.ones(2, 3, 1, 2), bk=2)
        tensor([[1., 1., 1., 0., 1., 1., 1., 0.],
                [1., 1., 1., 0., 1., 1., 1., 0.]])
    """
    if t.dim() != 4:
        raise ValueError(f"expected a 4-D (Cout, Cin, kh, kw) tensor, got shape {tuple(t.shape)}")
    c_out, c_in, kh, kw = t.shape
    m = t.permute(0, 2, 3, 1)
    pad = padded_channels(c_in, bk) - c_in
    if pad:
        m = F.pad(m, (0, pad), value=fill)
    return m.reshape(c_out, -1)


def from_matrix(m: torch.Tensor, c_in: int, kh: int, kw: int) -> torch.Tensor:
    """Inverse of :func:`to_matrix`: ``(Cout, kh*kw*c_pad)`` back to a contiguous ``(Cout, Cin, kh, kw)``."""
    c_out = m.shape[0]
    c_pad = m.shape[1] // (kh * kw)
    if m.dim() != 2 or c_pad * kh * kw != m.shape[1] or c_pad < c_in:
        raise ValueError(f"matrix of shape {tuple(m.shape)} is not the view of a weight with Cin={c_in}, k={(kh, kw)}")
    return m.view(c_out, kh, kw, c_pad)[..., :c_in].permute(0, 3, 1, 2).contiguous()


def resolve_padding(padding, kernel: tuple[int, int], dilation: tuple[int, int], stride: tuple[int, int]):
    """``(top, bottom, left, right)`` for an int, a pair, ``'same'`` or ``'valid'`` (as ``F.conv2d`` pads)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1 (as in nn.Conv2d), got stride={stride}")
            out = []
            for k, d in zip(kernel, dilation, strict=True):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]  # the odd extra goes bottom/right, as in torch
            return tuple(out)
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return (ph, ph, pw, pw)


def conv_geometry(
    x_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride=1,
    padding=0,
    dilation=1,
    bk: int = 1,
) -> ConvGeom:
    """The :class:`ConvGeom` of ``conv2d(x, W)``; raises ``ValueError`` on shapes that do not fit.

    Example:
        >>> conv_geometry((2, 3, 9, 9), (8, 3, 3, 3), stride=2, padding=1, bk=16).h_out
        5
    """
    if len(x_shape) != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(x_shape)}")
    n, c_in, h, w = x_shape
    c_out, wc, kh, kw = weight_shape
    if c_in != wc:
        raise ValueError(f"input has {c_in} channels but the weight expects in_channels={wc}")
    sh, sw = pair(stride, "stride")
    dh, dw = pair(dilation, "dilation")
    if min(sh, sw, dh, dw) < 1:
        raise ValueError(f"stride and dilation must be positive, got stride={stride!r}, dilation={dilation!r}")
    top, bottom, left, right = resolve_padding(padding, (kh, kw), (dh, dw), (sh, sw))
    h_out = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"input of spatial size ({h}, {w}) is too small for kernel ({kh}, {kw}) with dilation ({dh}, {dw}) "
            f"and padding {padding!r}"
        )
    return ConvGeom(n, c_in, h, w, c_out, h_out, w_out, kh, kw, sh, sw, top, left, dh, dw, padded_channels(c_in, bk))
