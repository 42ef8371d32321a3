"""Triton block-sparse kernels and their CPU counterparts (installed as ``sparsekern.kernels``).

``SPARSEKERN_INTERPRET=1`` (or ``TRITON_INTERPRET=1``) must be set before this
package is imported: it turns on Triton's interpreter so that CPU tensors run
the Triton kernels. This module sets ``TRITON_INTERPRET`` from
``SPARSEKERN_INTERPRET`` before any kernel is defined.
"""

import os

if os.environ.get("SPARSEKERN_INTERPRET") == "1":
    os.environ["TRITON_INTERPRET"] = "1"

from . import bsconv_cpu, bsmm_cpu  # noqa: E402

try:
    from . import bsconv, bsmm  # noqa: E402

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a hard dependency on Linux
    bsmm = bsconv = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(device) -> bool:
    """Triton kernels run on CUDA, and on the CPU under the interpreter."""
    return HAS_TRITON and (device.type == "cuda" or (INTERPRET and device.type == "cpu"))


__all__ = ["bsconv", "bsconv_cpu", "bsmm", "bsmm_cpu", "use_triton", "HAS_TRITON", "INTERPRET"]
