"""The survey's methods as block-aware mask producers, and the verbs that apply them.

* :func:`masks` computes ``{layer: (mask, frozen_mask)}`` without touching the model
  (for dynamic sparse training, adapters and benchmarks);
* :func:`apply_masks` converts layers (or calls ``set_masks`` on sparse ones,
  or re-blocks them at a new block size, :func:`reblock`);
* :func:`sparsify` does both and returns a :class:`~sparsekern.reports.Report` (``SparsifyReport``);
* :class:`MethodConfig` holds a method's settings (the named arguments of ``masks`` and
  ``sparsify``) and :func:`plan` turns a model and a config into masks (``config.py``, ``planning.py``);
* :func:`imp` finds lottery tickets by iterative magnitude pruning with rewinding;
* :class:`DSTScheduler` runs SET and RigL (``dst.py``), changing masks on the optimizer step;
* :func:`select`, :func:`layer_densities` and :func:`find_targets` are the building
  blocks, for code that brings its own scores (dynamic sparse training).

``api.py`` holds the verbs, ``report.py`` fills the report's records, ``blocks.py`` pools
per-element scores per block, ``select.py`` turns scores into masks (densities,
distributions, granularity), ``scores.py`` holds the scores,
``targets.py`` picks the layers (``nn.Linear``, ``nn.Conv2d``, ``transformers``'
``Conv1D``; tied weights stay dense).
"""

from sparsekern.methods.api import (
    FREEZE,
    METHODS,
    LayerReport,
    MethodConfig,
    SparsifyReport,
    apply_masks,
    masks,
    reblock,
    sparsify,
)
from sparsekern.methods.dst import DSTScheduler
from sparsekern.methods.lottery import ImpResult, ImpRound, imp
from sparsekern.methods.planning import Plan, plan
from sparsekern.methods.select import (
    DISTRIBUTIONS,
    GRANULARITIES,
    check_fraction,
    erk_densities,
    layer_densities,
    select,
)
from sparsekern.methods.targets import find_targets

__all__ = [
    "DISTRIBUTIONS",
    "DSTScheduler",
    "FREEZE",
    "GRANULARITIES",
    "METHODS",
    "ImpResult",
    "ImpRound",
    "LayerReport",
    "MethodConfig",
    "Plan",
    "SparsifyReport",
    "apply_masks",
    "check_fraction",
    "erk_densities",
    "find_targets",
    "imp",
    "layer_densities",
    "masks",
    "plan",
    "reblock",
    "select",
    "sparsify",
]
