"""Triton block-sparse kernels and their CPU counterparts: the source folder ``kernels/`` of ``sparsekern.kernels``.

One import path: ``setup.py`` installs this folder as ``sparsekern.kernels``
(``package_dir``), and every module here is ``sparsekern.kernels.<name>``
(``kernels/bsmm.py`` is ``sparsekern.kernels.bsmm``). ``import kernels`` from
the repository root would load a second copy, with its own autotune caches and
workspaces, so it raises ``ImportError`` instead (the guard below).
Tools that probe for PyPI's unrelated ``kernels`` package (``transformers`` does, on import) meet
the same error when the repository root is on ``sys.path`` (``python -m ...`` run from the root);
run them from another folder (``tests/conftest.py`` drops the root from ``sys.path``).

Triton is optional. The CPU kernels (``bsmm_cpu``, ``bsconv_cpu``) never need
it, so ``import sparsekern`` and everything that runs on CPU tensors work
without it. The Triton modules ``bsmm`` and ``bsconv`` are imported on first
attribute access (``kernels.bsmm``), which happens only when a CUDA tensor, or
a CPU tensor under the interpreter, reaches a launcher; without an importable
``triton`` that access raises an ``ImportError`` naming the fix. Loading them
lazily also spares CPU-only processes their import: measured with triton 3.9
on the 2-core dev machine, 0.2-0.4 s warm (3 s from a cold file cache) and
about 70 MB of resident memory.

``SPARSEKERN_INTERPRET=1`` (or ``TRITON_INTERPRET=1``) must be set before this
package is imported: it turns on Triton's interpreter so that CPU tensors run
the Triton kernels. This module sets ``TRITON_INTERPRET`` from
``SPARSEKERN_INTERPRET`` before any kernel is defined.
"""

import importlib
import importlib.util
import os

if __name__ != "sparsekern.kernels":
    raise ImportError(
        f"the kernels/ folder imports only as sparsekern.kernels (here it was imported as {__name__!r}, "
        "which would load a second copy of the kernels with their own caches): "
        "use `import sparsekern.kernels` (or `from sparsekern.kernels import ...`) after `pip install -e .`"
    )

if os.environ.get("SPARSEKERN_INTERPRET") == "1":
    os.environ["TRITON_INTERPRET"] = "1"

from . import bsconv_cpu, bsmm_cpu  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: The modules that need ``triton``, loaded by :func:`triton_module` on first use.
TRITON_MODULES = ("bsmm", "bsconv")


def _triton_findable() -> bool:
    # find_spec locates the package without importing it. A meta-path finder that
    # refuses triton raises ImportError here, which means the same as absent.
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


#: Whether ``triton`` is installed (found, not imported). CUDA builds of torch bring it.
HAS_TRITON = _triton_findable()


def triton_missing_message(why: str) -> str:
    """The error text for Triton work without an importable ``triton``; ``why`` says what needed it."""
    return (
        f"{why} needs Triton, but the 'triton' package cannot be imported. "
        "CUDA builds of torch bring it; otherwise install it: pip install triton "
        "(or pip install 'sparsekern[triton]'). The CPU paths run without it."
    )


def triton_module(name: str):
    """Import and return the Triton kernel module ``name`` (``"bsmm"`` or ``"bsconv"``).

    Raises:
        ImportError: ``triton`` is not importable; the message says how to install it.
    """
    if name not in TRITON_MODULES:
        raise ValueError(f"{name!r} is not a Triton kernel module; expected one of {TRITON_MODULES}")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as err:
        if HAS_TRITON:  # installed but failing (too old, broken): its own error says more than a hint
            raise
        runs = "CUDA tensors, and CPU tensors under SPARSEKERN_INTERPRET=1" if INTERPRET else "CUDA tensors"
        what = f"sparsekern.kernels.{name} (the Triton kernels, for {runs})"
        raise ImportError(triton_missing_message(what)) from err


def __getattr__(name: str):
    # PEP 562: ``kernels.bsmm`` imports the Triton module on first access only; afterwards
    # the import system has bound it as an attribute and this hook is not called again.
    if name in TRITON_MODULES:
        return triton_module(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def use_triton(device) -> bool:
    """Triton kernels run on CUDA, and on the CPU under the interpreter.

    Reads no import state: a CUDA tensor without ``triton`` takes this branch too
    and gets :func:`triton_module`'s ``ImportError``, not a CPU kernel handed a
    CUDA tensor.
    """
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


# ``bsmm`` and ``bsconv`` stay out of ``__all__``: a star import would load Triton.
__all__ = [
    "HAS_TRITON",
    "INTERPRET",
    "TRITON_MODULES",
    "bsconv_cpu",
    "bsmm_cpu",
    "triton_missing_message",
    "triton_module",
    "use_triton",
]
