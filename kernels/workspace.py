"""Reusable scratch buffers of the CPU paths, one set per thread, shared by the linear and the conv path.

Import path: ``sparsekern.kernels.workspace`` (this folder, ``kernels/``, installs as ``sparsekern.kernels``).

Fresh multi-MB allocations are page-faulted on every call (a 32 MB buffer costs about 30 ms on the
2-core dev machine), so the temporaries of ``bsmm_cpu.py`` and ``bsconv_cpu.py`` live on between
calls in named slots of :data:`workspace`. A slot's buffer grows to the largest request it has seen
and is handed out as a view: valid until the next ``get`` of the same slot on the same thread.

Example:
    >>> buf = workspace.get("gather", (4, 64, 128), x)  # a (4, 64, 128) view of the slot's buffer
    >>> release_workspace()  # frees every slot of this thread, and the native kernels' packing buffers
"""

from __future__ import annotations

import math
import threading

import torch

from . import native

__all__ = ["release_workspace", "workspace"]


class _Workspace(threading.local):
    """Named scratch buffers of one thread (``threading.local``: each thread sees its own ``buffers``)."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, slot: str, shape, like: torch.Tensor) -> torch.Tensor:
        """A ``shape`` view of slot ``slot``'s buffer, of ``like``'s dtype and device (reallocated when too small)."""
        numel = math.prod(shape)
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self.buffers[slot] = buf
        return buf[:numel].view(shape)


#: The CPU paths' scratch buffers (per thread).
workspace = _Workspace()


def release_workspace() -> None:
    """Free the calling thread's CPU-path buffers: the Python paths' slots (the dense fallback's weight and
    product, the gathered path's slabs, the conv path's padded input) and the native kernels' packing buffers.

    They grow to the largest operands the thread has seen and are kept for reuse, because
    fresh multi-MB allocations are page-faulted on every call.
    """
    workspace.buffers.clear()
    native.release_workspace()
