"""Bring masks from other pruning libraries onto sparsekern's layers.

Every adapter replaces masked dense layers by sparse layers in place and
returns ``(model, report)``. ``granularity="exact"`` keeps the element masks,
so outputs and gradients are unchanged but only wholly empty blocks are
skipped (few, for unstructured masks); ``granularity="block"`` re-scores by
magnitude pooled per block at each layer's density, so the kernels skip
``1 - density`` of the work. ``report.table()`` shows what each choice saves (``report[name].choices``).

=====================  =========================================================
adapter                source
=====================  =========================================================
``from_torch_prune``   ``torch.nn.utils.prune`` (``weight_orig``/``weight_mask``)
``from_torch_ao``      ``torch.ao.pruning`` sparsifiers (mask parametrizations)
``from_mask_dict``     NNI mask dicts and files, sparse_learning and rigl-torch masks
``from_checkpoint``    dense checkpoints whose zeros are the mask
=====================  =========================================================
"""

from sparsekern.adapters.masks import from_checkpoint, from_mask_dict
from sparsekern.adapters.torch_pruning import from_torch_ao, from_torch_prune
from sparsekern.reports import ConversionReport as ConversionReport

__all__ = ["ConversionReport", "from_checkpoint", "from_mask_dict", "from_torch_ao", "from_torch_prune"]
