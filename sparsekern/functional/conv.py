"""Autograd for block-sparse 2-D convolutions, registered as ``torch.library`` ops.

The weight lives in the matrix view of ``sparsekern/convview.py``; the three
ops mirror the linear ones:

=================  ====================================  ===================================
gradient of        computed as                           op
=================  ====================================  ===================================
``y``              implicit-GEMM conv over the computed  ``sparsekern::conv2d``
                   blocks of each block row
``x``              transposed conv over the computed     ``sparsekern::conv2d_input_grad``
                   blocks of each block column
``w_train``        ``dy.T @ im2col(x)`` at trainable     ``sparsekern::conv2d_weight_grad``
                   blocks, masked in mixed ones
``bias``           ``dy.sum((0, 2, 3))``                 plain torch
=================  ====================================  ===================================

Where the work runs: CUDA tensors use the Triton kernels of ``kernels/bsconv.py``
(NHWC, i.e. channels_last, is their native format; NCHW is read in place
through its strides, with less coalesced loads). CPU tensors use
``kernels/bsconv_cpu.py``, or the Triton kernels under the interpreter.

Output memory formats, which the fake implementations report for
``torch.compile``: on CUDA, channels_last. On the CPU, what the CPU path
returns (``bsconv_cpu.output_view``: views of channel-major buffers on its
block paths, contiguous NCHW on its dense fallback); the interpreter writes
into the same formats, so a graph compiled in one mode stays valid in the other.
"""

# No ``from __future__ import annotations``: torch.library infers the op schemas from annotations.
import torch

from sparsekern import convview, kernels
from sparsekern.functional._checks import check_layout, check_stores
from sparsekern.kernels import bsconv_cpu
from sparsekern.kernels.meta import ConvGeom, Meta
from sparsekern.layout import BlockLayout

__all__ = ["sparse_conv2d"]


def _new_output(like: torch.Tensor, g: ConvGeom, meta: list[torch.Tensor], pass_: str) -> torch.Tensor:
    """An empty result with the strides the op promises on this device (see the module docstring)."""
    if like.device.type == "cpu":
        return bsconv_cpu.output_view(like, g, Meta(*meta), pass_)
    shape = (g.n, g.c_out, g.h_out, g.w_out) if pass_ == "forward" else (g.n, g.c_in, g.h, g.w)
    return like.new_empty(shape).contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- forward op
@torch.library.custom_op("sparsekern::conv2d", mutates_args=())
def _conv2d(
    x: torch.Tensor,
    w_train: torch.Tensor,
    w_frozen: torch.Tensor,
    bias: torch.Tensor | None,
    meta: list[torch.Tensor],
    geom: list[int],
    n_frozen: int,
) -> torch.Tensor:
    g = ConvGeom(*geom)
    if kernels.use_triton(x.device):
        out = _new_output(x, g, meta, "forward")
        return kernels.bsconv.bsconv_forward(x, w_train, w_frozen, bias, Meta(*meta), g, n_frozen, out=out)
    return bsconv_cpu.forward(x, w_train, w_frozen, bias, Meta(*meta), g, n_frozen)


@_conv2d.register_fake
def _(x, w_train, w_frozen, bias, meta, geom, n_frozen):
    g = ConvGeom(*geom)
    return _new_output(x, g, meta, "forward")


# ---------------------------------------------------------- backward ops
@torch.library.custom_op("sparsekern::conv2d_input_grad", mutates_args=())
def _conv2d_input_grad(
    dy: torch.Tensor,
    w_train: torch.Tensor,
    w_frozen: torch.Tensor,
    meta: list[torch.Tensor],
    geom: list[int],
    n_frozen: int,
) -> torch.Tensor:
    g = ConvGeom(*geom)
    if kernels.use_triton(dy.device):
        out = _new_output(dy, g, meta, "input_grad")
        return kernels.bsconv.bsconv_input_grad(dy, w_train, w_frozen, Meta(*meta), g, n_frozen, out=out)
    return bsconv_cpu.input_grad(dy, w_train, w_frozen, Meta(*meta), g, n_frozen)


@_conv2d_input_grad.register_fake
def _(dy, w_train, w_frozen, meta, geom, n_frozen):
    g = ConvGeom(*geom)
    return _new_output(dy, g, meta, "input_grad")


@torch.library.custom_op("sparsekern::conv2d_weight_grad", mutates_args=())
def _conv2d_weight_grad(
    dy: torch.Tensor, x: torch.Tensor, meta: list[torch.Tensor], geom: list[int], bm: int, bk: int
) -> torch.Tensor:
    if kernels.use_triton(x.device):
        return kernels.bsconv.bsconv_weight_grad(dy, x, Meta(*meta), ConvGeom(*geom), (bm, bk))
    return bsconv_cpu.weight_grad(dy, x, Meta(*meta), ConvGeom(*geom), (bm, bk))


@_conv2d_weight_grad.register_fake
def _(dy, x, meta, geom, bm, bk):
    return x.new_empty(meta[11].shape[0], bm, bk)


# ----------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, w_train, w_frozen, bias, meta, geom, n_frozen = inputs
    ctx.save_for_backward(x, w_train, w_frozen, *meta)
    ctx.has_bias = bias is not None
    ctx.geom = geom
    ctx.n_frozen = n_frozen


def _backward(ctx, dy):
    x, w_train, w_frozen, *meta = ctx.saved_tensors
    dy = dy.to(x.dtype)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = _conv2d_input_grad(dy, w_train, w_frozen, meta, ctx.geom, ctx.n_frozen)
    if ctx.needs_input_grad[1]:
        bm, bk = w_train.shape[1:]
        dw = _conv2d_weight_grad(dy, x, meta, ctx.geom, bm, bk)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        db = dy.sum((0, 2, 3))
    return dx, dw, None, db, [None] * len(meta), None, None


_conv2d.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------- public API
def _check_operands(x, w_train, w_frozen, layout, weight_shape, bias) -> None:
    check_layout(layout)
    if len(weight_shape) != 4:
        raise ValueError(f"weight_shape must be (Cout, Cin, kh, kw), got {tuple(weight_shape)}")
    bk = layout.block_size[1]
    if layout.shape != convview.matrix_shape(weight_shape, bk):
        raise ValueError(
            f"layout has shape {layout.shape}, but a {tuple(weight_shape)} weight with bk={bk} has the matrix view "
            f"{convview.matrix_shape(weight_shape, bk)}"
        )
    if x.dim() != 4:
        raise ValueError(f"input must be (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    check_stores(x, w_train, w_frozen, layout, bias, weight_shape[0])


def sparse_conv2d(
    input: torch.Tensor,
    w_train: torch.Tensor,
    w_frozen: torch.Tensor,
    layout: BlockLayout,
    weight_shape: tuple[int, int, int, int],
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:
    """``F.conv2d(input, W * mask, bias, stride, padding, dilation)`` with ``W`` stored block-sparse.

    Args:
        input: ``(N, Cin, H, W)`` or unbatched ``(Cin, H, W)``, any memory format.
        w_train, w_frozen: the value stores of ``layout`` (see ``BlockLayout.split_values``).
        layout: the :class:`~sparsekern.layout.BlockLayout` of the weight's matrix view
            (``convview.to_matrix``).
        weight_shape: ``(Cout, Cin, kh, kw)``.
        bias: optional ``(Cout,)``.
        stride, padding, dilation: as for ``F.conv2d`` (``padding`` may be ``'same'`` or ``'valid'``).

    Returns:
        ``(N, Cout, Ho, Wo)`` (or ``(Cout, Ho, Wo)``); gradients reach ``w_train``
        only at trainable elements. The memory format is described in the module docstring.

    Example:
        >>> mask = torch.rand(32, 16, 3, 3) < 0.5
        >>> lay = BlockLayout.from_masks(convview.to_matrix(mask, 16, False), block_size=16)
        >>> w_train, w_frozen = lay.split_values(convview.to_matrix(torch.randn(32, 16, 3, 3), 16))
        >>> sparse_conv2d(torch.randn(2, 16, 8, 8), w_train, w_frozen, lay, (32, 16, 3, 3), padding=1).shape
        torch.Size([2, 32, 8, 8])
    """
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    _check_operands(x, w_train, w_frozen, layout, weight_shape, bias)
    g = convview.conv_geometry(x.shape, weight_shape, stride, padding, dilation, layout.block_size[1])
    y = _conv2d(x, w_train, w_frozen, bias, layout.meta(), list(g), layout.n_frozen)
    return y.squeeze(0) if unbatched else y
