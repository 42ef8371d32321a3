"""sparsekern: block-sparse training kernels that skip pruned and frozen weights.

Quick start::

    import sparsekern
    layer = sparsekern.SparseLinear(1024, 1024, block_size=64, mask=mask, frozen_mask=frozen)
    report = sparsekern.sparsify(model, method="snip", density=0.1, data=batches, loss_fn=loss)
    print(sparsekern.report(model, example_input).table())

``sparsify``, ``report`` and the adapters all return a :class:`Report` (``reports.py``).

Subpackages: ``nn`` (layers), ``functional`` (autograd ops), ``methods`` (pruning,
freezing, lottery tickets, SET/RigL), ``adapters`` (masks from other libraries).
"""

from sparsekern import adapters, functional, methods
from sparsekern.flops import report
from sparsekern.layout import BlockLayout
from sparsekern.methods import sparsify
from sparsekern.nn import SparseConv2d, SparseLinear
from sparsekern.reports import FlopReport, LayerRecord, Report

__all__ = [
    "BlockLayout",
    "FlopReport",
    "LayerRecord",
    "Report",
    "SparseConv2d",
    "SparseLinear",
    "adapters",
    "functional",
    "methods",
    "report",
    "sparsify",
]
__version__ = "0.1.0"
