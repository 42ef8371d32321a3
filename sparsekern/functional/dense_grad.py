"""The dense weight gradient of a sparse layer, for the steps that need it (RigL's growth scores).

A block-sparse layer computes ``dL/dW`` only at its trainable blocks. RigL needs
the dense ``dL/dW = dy^T x`` on its update steps, to score where to grow.
:func:`with_dense_grad` passes the layer output through unchanged and, in
backward, adds the dense weight gradient of that call into ``probe.grad``:

==========  =====================================================
input       gradient returned by backward
==========  =====================================================
``y``       ``dy`` (the output passes through)
``probe``   dense ``dy^T x`` (linear) or ``conv2d_weight`` (conv),
            weight-shaped, in ``probe``'s dtype
==========  =====================================================

``probe`` is a zero, weight-shaped leaf tensor with ``requires_grad=True`` that
the layer holds only while a dense gradient is wanted. It is not a Parameter,
so optimizers and DDP never see it, and autograd accumulates over micro-batches.
Because this is an ordinary ``autograd.Function`` called from the layer's
forward (no hooks), ``torch.compile`` traces it: the graph with the probe is a
second compiled variant, used on update steps only.

Known limits: the output is copied once on the steps that use a probe (a
Function may not hand back its input as is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["with_dense_grad"]


class _DenseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, probe, conv):
        ctx.save_for_backward(x)
        ctx.conv = conv
        ctx.shape = tuple(probe.shape)
        ctx.dtype = probe.dtype
        return y.clone()

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        if ctx.conv is None:
            n, k = ctx.shape
            dw = dy.reshape(-1, n).T.to(x.dtype) @ x.reshape(-1, k)
        else:
            stride, (top, bottom, left, right), dilation = ctx.conv
            xp = F.pad(x, (left, right, top, bottom))
            dw = torch.nn.grad.conv2d_weight(xp, ctx.shape, dy.to(x.dtype), stride, 0, dilation, 1)
        return dy, None, dw.to(ctx.dtype), None


def with_dense_grad(
    y: torch.Tensor,
    x: torch.Tensor,
    probe: torch.Tensor,
    conv: tuple[tuple[int, int], tuple[int, int, int, int], tuple[int, int]] | None = None,
) -> torch.Tensor:
    """``y`` unchanged; its backward adds the dense weight gradient of this call to ``probe.grad``.

    Args:
        y: the layer's output, ``(*, out)`` or ``(n, c_out, h_out, w_out)``.
        x: the layer's input (unpadded for a conv).
        probe: weight-shaped leaf, ``requires_grad=True``: ``(out, in)`` or ``(c_out, c_in, kh, kw)``.
        conv: ``None`` for a linear layer; for a conv ``(stride, (top, bottom, left, right), dilation)``.

    Returns:
        A copy of ``y`` whose backward also fills ``probe.grad``.

    Example:
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> probe = torch.zeros(2, 3, requires_grad=True)
        >>> with_dense_grad(x @ torch.ones(3, 2), x, probe).sum().backward()
        >>> probe.grad.shape
        torch.Size([2, 3])
    """
    return _DenseGrad.apply(y, x.detach(), probe, conv)
