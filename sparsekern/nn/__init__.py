"""Drop-in sparse modules: ``SparseLinear`` (``linear.py``) and ``SparseConv2d`` (``conv.py``).

Both subclass ``BlockSparseWeight`` (``sparse_weight.py``: stores, layout, mask updates, checkpoints),
whose ``weight`` is a ``ReadOnlyWeight`` (``readonly.py``); ``from_dense`` reads masks other pruning
libraries attached (``foreign_masks.py``) and ``hf.py`` knows ``transformers``' ``Conv1D``.
"""

from sparsekern.nn.conv import SparseConv2d
from sparsekern.nn.linear import SparseLinear

__all__ = ["SparseConv2d", "SparseLinear"]
