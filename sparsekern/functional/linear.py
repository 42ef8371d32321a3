"""Autograd for block-sparse linear layers, registered as ``torch.library`` ops.

Three custom ops wrap the launchers; the autograd formula only wires them:

=================  ===========================  =================================
gradient of        computed as                  op
=================  ===========================  =================================
``y``              ``x @ W.T + b``              ``sparsekern::linear``
``x``              ``dy @ W`` (transposed walk)  ``sparsekern::linear_input_grad``
``w_train``        ``dy.T @ x`` at trainable    ``sparsekern::linear_weight_grad``
                   blocks, masked in mixed ones
``bias``           ``dy.sum(0)``                plain torch
=================  ===========================  =================================

Each gradient is computed only when ``ctx.needs_input_grad`` asks for it.
Frozen and pruned values never receive a gradient: ``w_frozen`` is a buffer.

Where the work runs: CUDA tensors use the Triton kernels; CPU tensors use the
CPU path (``kernels/bsmm_cpu.py``: native kernels for fp32, gathered GEMMs
otherwise, dense above a density), or the Triton kernels in Triton's
interpreter when ``SPARSEKERN_INTERPRET=1`` was set before import. Because the ops carry fake
implementations, ``torch.compile(fullgraph=True)`` traces through them.

The CPU gathered path returns its ``(M, N)`` results as transposed views (see
``kernels.bsmm_cpu.transposed_output``, which also depends on the dtype); the
fake implementations report the same strides.
"""

# No ``from __future__ import annotations`` here: torch.library infers the op
# schemas from the runtime annotations.
import torch

from sparsekern import kernels
from sparsekern.functional._autocast import autocast_operands
from sparsekern.functional._checks import check_layout, check_stores
from sparsekern.functional.standalone import standalone
from sparsekern.kernels import bsmm_cpu
from sparsekern.kernels.meta import Meta
from sparsekern.layout import BlockLayout

__all__ = ["sparse_linear"]


def _meta(meta: list[torch.Tensor]) -> Meta:
    return Meta(*meta)


def _new_output(like: torch.Tensor, rows: int, cols: int, meta: list[torch.Tensor]) -> torch.Tensor:
    """An ``(rows, cols)`` output with the strides the op promises for this device.

    On the CPU the layout depends only on the layout's density and the dtype,
    never on whether the interpreter runs or the native kernels were built, so
    graphs compiled in one setting stay valid in another (torch's compile cache
    knows about neither).
    """
    if like.device.type == "cpu" and bsmm_cpu.transposed_output(_meta(meta), rows, like.dtype):
        return like.new_empty(cols, rows).t()
    return like.new_empty(rows, cols)


# ---------------------------------------------------------------- forward op
@torch.library.custom_op("sparsekern::linear", mutates_args=())
def _linear(
    x: torch.Tensor,
    w_train: torch.Tensor,
    w_frozen: torch.Tensor,
    bias: torch.Tensor | None,
    meta: list[torch.Tensor],
    n_out: int,
    n_frozen: int,
    lead: list[int],
) -> torch.Tensor:
    if kernels.use_triton(x.device):
        out = _new_output(x, x.shape[0], n_out, meta)
        y = kernels.bsmm.bsmm_forward(x, w_train, w_frozen, bias, _meta(meta), n_out, n_frozen, out=out)
    else:
        y = bsmm_cpu.forward(x, w_train, w_frozen, bias, _meta(meta), n_out, n_frozen)
    # Shaped here, not after the op: the layer's output must not be a view (see standalone.py).
    return standalone(y, (*lead, n_out))


@_linear.register_fake
def _(x, w_train, w_frozen, bias, meta, n_out, n_frozen, lead):
    return _new_output(x, x.shape[0], n_out, meta).view(*lead, n_out)


# ---------------------------------------------------------- backward ops
@torch.library.custom_op("sparsekern::linear_input_grad", mutates_args=())
def _linear_input_grad(
    dy: torch.Tensor,
    w_train: torch.Tensor,
    w_frozen: torch.Tensor,
    meta: list[torch.Tensor],
    n_in: int,
    n_frozen: int,
) -> torch.Tensor:
    if kernels.use_triton(dy.device):
        out = _new_output(dy, dy.shape[0], n_in, meta)
        return kernels.bsmm.bsmm_input_grad(dy, w_train, w_frozen, _meta(meta), n_in, n_frozen, out=out)
    return bsmm_cpu.input_grad(dy, w_train, w_frozen, _meta(meta), n_in, n_frozen)


@_linear_input_grad.register_fake
def _(dy, w_train, w_frozen, meta, n_in, n_frozen):
    return _new_output(dy, dy.shape[0], n_in, meta)


@torch.library.custom_op("sparsekern::linear_weight_grad", mutates_args=())
def _linear_weight_grad(dy: torch.Tensor, x: torch.Tensor, meta: list[torch.Tensor], bm: int, bk: int) -> torch.Tensor:
    if kernels.use_triton(x.device):
        return kernels.bsmm.bsmm_weight_grad(dy, x, _meta(meta), (bm, bk))
    return bsmm_cpu.weight_grad(dy, x, _meta(meta), (bm, bk))


@_linear_weight_grad.register_fake
def _(dy, x, meta, bm, bk):
    return x.new_empty(_meta(meta).train_index.shape[0], bm, bk)


# ----------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, w_train, w_frozen, bias, meta, n_out, n_frozen, lead = inputs
    ctx.save_for_backward(x, w_train, w_frozen, *meta)
    ctx.has_bias = bias is not None
    ctx.n_frozen = n_frozen


def _backward(ctx, dy):
    x, w_train, w_frozen, *meta = ctx.saved_tensors
    dy = dy.reshape(-1, dy.shape[-1]).to(x.dtype)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = _linear_input_grad(dy, w_train, w_frozen, meta, x.shape[1], ctx.n_frozen)
    if ctx.needs_input_grad[1]:
        bm, bk = w_train.shape[1:]
        dw = _linear_weight_grad(dy, x, meta, bm, bk)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        db = dy.sum(0)
    return dx, dw, None, db, [None] * len(meta), None, None, None


_linear.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------- public API
def _check_operands(x, w_train, w_frozen, layout: BlockLayout, bias) -> None:
    check_layout(layout)
    n, k = layout.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"input has shape {tuple(x.shape)}; its last dimension must be in_features={k}")
    check_stores(x, w_train, w_frozen, layout, bias, n)


def sparse_linear(
    input: torch.Tensor,
    w_train: torch.Tensor,
    w_frozen: torch.Tensor,
    layout: BlockLayout,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``input @ W.T + bias`` with ``W`` stored block-sparse as in ``layout``.

    Args:
        input: ``(*, in_features)``; leading dimensions are flattened, any strides.
        w_train: ``(layout.n_train, bm, bk)`` trainable blocks (gets gradients).
        w_frozen: ``(layout.n_frozen_slots, bm, bk)`` frozen blocks and fixed slots.
        layout: the :class:`~sparsekern.layout.BlockLayout` of ``W``.
        bias: optional ``(out_features,)``.

    Returns:
        ``(*, out_features)``. Equal to ``F.linear(input, W * mask, bias)``;
        gradients reach ``w_train`` only at trainable elements. Under
        ``torch.autocast`` every operand is cast to the autocast dtype first,
        as ``F.linear`` does.

    Example:
        >>> lay = BlockLayout.from_masks(torch.rand(64, 96) < 0.5, block_size=32)
        >>> w_train, w_frozen = lay.split_values(torch.randn(64, 96))
        >>> sparse_linear(torch.randn(5, 96), w_train, w_frozen, lay).shape
        torch.Size([5, 64])
    """
    input, w_train, w_frozen, bias = autocast_operands(input, w_train, w_frozen, bias)
    _check_operands(input, w_train, w_frozen, layout, bias)
    n, k = layout.shape
    lead = input.shape[:-1]
    return _linear(input.reshape(-1, k), w_train, w_frozen, bias, layout.meta(), n, layout.n_frozen, list(lead))
