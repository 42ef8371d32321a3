"""Which kernels a conv launch runs on a GPU: the linear ones, the sm_90 descriptor ones or the pointer ones.

Import path: ``sparsekern.kernels.conv_routes`` (this folder, ``kernels/``, installs as ``sparsekern.kernels``).

``bsconv.py``'s launchers ask, in this order:

1. :func:`matmul_views`: a pointwise conv (1x1, stride 1, no padding) whose activations have a token
   matrix (:func:`token_matrix`) is a matmul over pixels and runs on the linear kernels of ``bsmm.py``,
   on every device.
2. :func:`rect_path`: on sm_90, the descriptor kernels of ``bsconv_tma.py`` whenever its
   ``rect_reason`` finds nothing in the way; otherwise a warning names the obstacle once.
3. Else the pointer kernels of ``bsconv.py``.

Nothing here launches.
"""

from __future__ import annotations

import warnings

import torch

from . import bsconv_tma
from .launch import INTERPRET, use_tma
from .meta import ConvGeom

__all__ = ["matmul_views", "pointwise", "rect_path", "token_matrix"]

_warned: set[str] = set()


def pointwise(geom: ConvGeom) -> bool:
    """A 1x1 conv with stride 1 and no padding: one pixel is one token, the conv is a matmul."""
    g = geom
    return (g.kh, g.kw, g.stride_h, g.stride_w, g.pad_h, g.pad_w) == (1, 1, 1, 1, 0, 0)


def token_matrix(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` ``(N, C, H, W)`` as the ``(N*H*W, C)`` matrix of its pixels, a view; ``None`` unless its
    channels are contiguous and its pixels evenly spaced (channels_last, possibly a channel slice)."""
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if sc != 1 or sh != w * sw or sn != h * sh:
        return None
    return t.as_strided((n * h * w, c), (sw, 1))


def matmul_views(geom: ConvGeom, *acts: torch.Tensor) -> list[torch.Tensor] | None:
    """The token matrices of a pointwise conv's activations, when each has one (see :func:`token_matrix`).

    Such a conv runs on the linear kernels of ``bsmm.py``: its matrix view ``(Cout, c_pad)`` is a linear
    layer's block grid over ``Cin`` inputs (the overhang past ``Cin`` is masked there as here), and those
    kernels read and write these views through descriptors on sm_90 with no reshaped operand.
    """
    if not pointwise(geom):
        return None
    views = [token_matrix(t) for t in acts]
    return None if any(v is None for v in views) else views


def rect_path(device: torch.device, what: str, geom: ConvGeom, bk: int, boxes, phased=None, store=None) -> bool:
    """Whether this pass runs the descriptor kernels of ``bsconv_tma.py`` (sm_90 and newer).

    Where the arch has TMA but these operands cannot sit behind descriptors, the pointer kernels run
    instead, and a warning names the reason once per process and reason (not under the interpreter,
    whose default run tests the pointer kernels on purpose).
    """
    if not use_tma(device):
        return False
    reason = bsconv_tma.rect_reason(geom, bk, boxes, phased, store)
    if reason is not None and not INTERPRET and reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"sparsekern: the conv {what} runs the slower pointer kernels on this GPU: {reason}. "
            "(Said once per reason.)",
            stacklevel=3,
        )
    return reason is None
