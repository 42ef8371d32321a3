"""Drop-in sparse modules."""

from sparsekern.nn.conv import SparseConv2d
from sparsekern.nn.linear import SparseLinear

__all__ = ["SparseConv2d", "SparseLinear"]
