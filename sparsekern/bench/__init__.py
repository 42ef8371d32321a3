"""Benchmarks for sparsekern: ``sparsekern-bench --suite linear`` (see ``sparsekern/bench/cli.py``).

Installed with the package, so it runs from any folder, as the ``sparsekern-bench``
console script or as ``python -m sparsekern.bench``. ``common.py`` holds the shared
machinery (timing, environment record, CSV/JSON/markdown output); each suite lives
in its own module (``linear.py``, ``conv.py``, ``layout.py``, ``e2e.py``). Plots come
from the separate script ``plot.py`` (``python -m sparsekern.bench.plot``).

Imports run one way: this subpackage imports the rest of sparsekern (and its
dense references in ``sparsekern.testing``); nothing else in sparsekern imports it.
"""
