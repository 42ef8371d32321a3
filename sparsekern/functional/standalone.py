"""Op results that are not views: what FSDP2 (and in-place users) need from a layer's output.

The CPU and GPU paths write results into buffers laid out for the kernels (a
padded, transposed ``yt`` whose ``[:n].t()`` is the output; channel-major conv
buffers) and hand out views of them. A view as a layer's output makes FSDP2
warn, rightly: an in-place op on it (``y += r``) would drop FSDP2's
pre-backward hook. :func:`standalone` gives the same memory, sizes and strides
as a tensor of its own (no ``_base``); nothing else holds the buffer, so no
aliasing can be observed.
"""

from __future__ import annotations

import torch

__all__ = ["standalone"]


def standalone(t: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``t`` (viewed as ``shape``, if given) as a tensor that owns its view of the storage.

    Example:
        >>> buf = torch.zeros(4, 3)
        >>> standalone(buf[:2].t())._base is None
        True
    """
    v = t if shape is None else t.view(shape)
    if v._base is None:
        return v
    return v.new_empty(0).set_(v.untyped_storage(), v.storage_offset(), v.shape, v.stride())
