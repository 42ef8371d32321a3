from setuptools import setup

setup(
    name="sparsekern",
    version="0.1.0",
    description="Block-sparse training kernels for pruned and frozen networks",
    python_requires=">=3.10",
    packages=[
        "sparsekern",
        "sparsekern.adapters",
        "sparsekern.check",
        "sparsekern.functional",
        "sparsekern.nn",
        "sparsekern.methods",
        "sparsekern.kernels",
    ],
    # The Triton kernels live in top-level kernels/ but install only as
    # sparsekern.kernels: a bare "kernels" package already exists on PyPI.
    package_dir={"sparsekern.kernels": "kernels"},
    package_data={"sparsekern.kernels": ["tuned/*.json", "native/*.cpp"]},
    install_requires=["torch>=2.4", "triton>=3.0; platform_system=='Linux'", "numpy"],
    extras_require={"dev": ["pytest", "pytest-benchmark", "ruff", "transformers"], "examples": ["scikit-learn"]},
)
