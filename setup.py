from setuptools import setup

setup(
    name="sparsekern",
    version="0.1.0",
    description="Block-sparse training kernels for pruned and frozen networks",
    python_requires=">=3.10",
    packages=[
        "sparsekern",
        "sparsekern.adapters",
        "sparsekern.bench",
        "sparsekern.check",
        "sparsekern.functional",
        "sparsekern.nn",
        "sparsekern.methods",
        "sparsekern.kernels",
    ],
    # The Triton kernels live in top-level kernels/ but install only as
    # sparsekern.kernels: a bare "kernels" package already exists on PyPI.
    package_dir={"sparsekern.kernels": "kernels"},
    package_data={"sparsekern.kernels": ["tuned/*.json", "native/*.cpp", "native/*.h"]},
    # The benchmark installs as sparsekern.bench (results stay in the repo's bench/results/, which is
    # data): a bare top-level "bench" would clash with other projects' on sys.path and PyPI.
    entry_points={"console_scripts": ["sparsekern-bench = sparsekern.bench.cli:main"]},
    # No triton here: the CPU paths never import it (about 1 GB a CPU-only install never uses), and
    # CUDA builds of torch already depend on the triton they were built with. `[triton]` is for
    # Triton's interpreter on CPU tensors (SPARSEKERN_INTERPRET=1); `[dev]` includes it (on Linux,
    # where triton has wheels) so the tests run the Triton kernels in the interpreter. 3.6 is the
    # oldest triton tested (`make check`, the GPU machine). torch >= 2.11: the oldest release tested
    # (2.11 on the GPU machine; 2.13.0 on the CPU).
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "dev": ["pytest", "pytest-benchmark", "ruff", "transformers", "triton>=3.6; platform_system=='Linux'"],
        "examples": ["scikit-learn"],
    },
)
