"""Repository-root shim: the benchmark is ``sparsekern.bench`` (installed, runs from anywhere).

This folder holds the tracked results (``bench/results/``) and the pytest-benchmark
cases (``bench/test_bench_*.py``). It is not installed: a bare top-level ``bench``
package would clash with other projects' on ``sys.path`` and PyPI. ``python -m bench``
still works from the repository root, forwarding to ``sparsekern-bench``.
"""
