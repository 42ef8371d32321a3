"""Drop-in sparse modules."""

from sparsekern.nn.linear import SparseLinear

__all__ = ["SparseLinear"]
