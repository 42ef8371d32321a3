"""Benchmarks for sparsekern: ``python -m bench --suite linear`` (see ``bench/__main__.py``).

``bench/common.py`` holds the shared machinery (timing, environment record,
CSV/JSON/markdown output); each suite lives in its own module (``bench/linear.py``).
Plots come from the separate script ``bench/plot.py``.
"""
