"""Autograd for block-sparse layers, registered as ``torch.library`` ops.

``sparse_linear`` (``linear.py``) and ``sparse_conv2d`` (``conv.py``) share the
layout and value stores of :class:`~sparsekern.layout.BlockLayout`; each wires
its three launchers (forward, input gradient, weight gradient) into autograd.
"""

from sparsekern.functional.conv import sparse_conv2d
from sparsekern.functional.dense_grad import with_dense_grad
from sparsekern.functional.linear import sparse_linear

__all__ = ["sparse_conv2d", "sparse_linear", "with_dense_grad"]
