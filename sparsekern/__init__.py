"""sparsekern: block-sparse training kernels that skip pruned and frozen weights.

Quick start::

    import sparsekern
    layer = sparsekern.SparseLinear(1024, 1024, block_size=64, mask=mask, frozen_mask=frozen)
    print(sparsekern.report(model, example_input).table())
"""

from sparsekern import functional
from sparsekern.flops import FlopReport, report
from sparsekern.layout import BlockLayout
from sparsekern.methods import sparsify
from sparsekern.nn import SparseConv2d, SparseLinear

__all__ = ["BlockLayout", "FlopReport", "SparseConv2d", "SparseLinear", "functional", "report", "sparsify"]
__version__ = "0.1.0"
