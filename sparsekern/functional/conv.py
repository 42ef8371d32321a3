"""Autograd for block-sparse 2-D convolutions, registered as ``torch.library`` ops.

The weight lives in the matrix view of ``sparsekern/convview.py``; the three
ops mirror the linear ones:

=================  ====================================  ===================================
gradient of        computed as                           op
=================  ====================================  ===================================
``y``              implicit-GEMM conv over the computed  ``sparsekern::conv2d``
                   blocks of each block row
``x``              transposed conv over the computed     ``sparsekern::conv2d_backward``
                   blocks of each block column           (one op for both gradients, each
``w_train``        ``dy.T @ im2col(x)`` at trainable     computed only when asked for)
                   blocks, masked in mixed ones
``bias``           ``dy.sum((0, 2, 3))``                 plain torch
=================  ====================================  ===================================

Where the work runs: CUDA tensors use the Triton kernels of ``kernels/bsconv.py``
(NHWC, i.e. channels_last, is their native format; NCHW is read in place
through its strides, with less coalesced loads). CPU tensors use
``kernels/bsconv_cpu.py``, or the Triton kernels under the interpreter.

Output memory formats, which the fake implementations report for
``torch.compile``: on CUDA, channels_last. On the CPU, what the CPU path
returns (``bsconv_cpu.output_view``: on its block paths for fp32 and bf16, a
channels_last ``y`` and a ``dx`` in ``x``'s memory format; views of
channel-major buffers for fp16, contiguous NCHW on its dense fallback; a
function of layout, geometry, dtype and ``x``'s strides only); the interpreter
writes into the same formats, so a graph compiled in one mode stays valid in
the other.
"""

# No ``from __future__ import annotations``: torch.library infers the op schemas from annotations.
import torch

from sparsekern import convview, kernels
from sparsekern.functional._autocast import autocast_operands
from sparsekern.functional._checks import check_layout, check_stores
from sparsekern.functional.standalone import standalone
from sparsekern.kernels import bsconv_cpu
from sparsekern.kernels.meta import ConvGeom, Meta
from sparsekern.layout import BlockLayout

__all__ = ["sparse_conv2d"]


def _new_output(like: torch.Tensor, g: ConvGeom, meta: list[torch.Tensor], pass_: str) -> torch.Tensor:
    """An empty result with the strides the op promises on this device (see the module docstring).

    ``like`` is ``x`` for the input gradient: the CPU path's ``dx`` takes ``x``'s memory format."""
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
        y = kernels.bsconv.bsconv_forward(x, w_train, w_frozen, bias, Meta(*meta), g, n_frozen, out=out)
    else:
        y = bsconv_cpu.forward(x, w_train, w_frozen, bias, Meta(*meta), g, n_frozen)
    return standalone(y)  # the layer's output must not be a view (see standalone.py)


@_conv2d.register_fake
def _(x, w_train, w_frozen, bias, meta, geom, n_frozen):
    g = ConvGeom(*geom)
    return _new_output(x, g, meta, "forward")


# ---------------------------------------------------------- backward op
@torch.library.custom_op("sparsekern::conv2d_backward", mutates_args=())
def _conv2d_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w_train: torch.Tensor,
    w_frozen: torch.Tensor,
    meta: list[torch.Tensor],
    geom: list[int],
    n_frozen: int,
    input_grad: bool,
    weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dw)``; a gradient not asked for comes back as an empty tensor.

    One op for both, so the CPU path prepares ``dy`` (a transposing copy)
    once; the Triton path launches the two kernels.
    """
    g, m = ConvGeom(*geom), Meta(*meta)
    bm, bk = w_train.shape[1:]
    if kernels.use_triton(x.device):
        dx = dw = None
        if input_grad:
            out = _new_output(x, g, meta, "input_grad")
            dx = kernels.bsconv.bsconv_input_grad(dy, w_train, w_frozen, m, g, n_frozen, out=out)
        if weight_grad:
            dw = kernels.bsconv.bsconv_weight_grad(dy, x, m, g, (bm, bk))
    else:
        dx, dw = bsconv_cpu.backward(dy, x, w_train, w_frozen, m, g, n_frozen, input_grad, weight_grad)
    return (
        x.new_empty(0) if dx is None else dx,
        x.new_empty(0, bm, bk) if dw is None else dw,
    )


@_conv2d_backward.register_fake
def _(dy, x, w_train, w_frozen, meta, geom, n_frozen, input_grad, weight_grad):
    bm, bk = w_train.shape[1:]
    dx = _new_output(x, ConvGeom(*geom), meta, "input_grad") if input_grad else x.new_empty(0)
    return dx, x.new_empty(Meta(*meta).train_index.shape[0] if weight_grad else 0, bm, bk)


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
    want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if want_x or want_w:
        gx, gw = _conv2d_backward(dy, x, w_train, w_frozen, meta, ctx.geom, ctx.n_frozen, want_x, want_w)
        dx = gx if want_x else None
        dw = gw if want_w else None
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
        Under ``torch.autocast`` every operand is cast to the autocast dtype first, as
        ``F.conv2d`` does.

    Example:
        >>> mask = torch.rand(32, 16, 3, 3) < 0.5
        >>> lay = BlockLayout.from_masks(convview.to_matrix(mask, 16, False), block_size=16)
        >>> w_train, w_frozen = lay.split_values(convview.to_matrix(torch.randn(32, 16, 3, 3), 16))
        >>> sparse_conv2d(torch.randn(2, 16, 8, 8), w_train, w_frozen, lay, (32, 16, 3, 3), padding=1).shape
        torch.Size([2, 32, 8, 8])
    """
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    x, w_train, w_frozen, bias = autocast_operands(x, w_train, w_frozen, bias)
    _check_operands(x, w_train, w_frozen, layout, weight_shape, bias)
    g = convview.conv_geometry(x.shape, weight_shape, stride, padding, dilation, layout.block_size[1])
    y = _conv2d(x, w_train, w_frozen, bias, layout.meta(), list(g), layout.n_frozen)
    return y.squeeze(0) if unbatched else y
