"""The one value store every kernel reads: ``[w_train | w_frozen]`` as a single ``(n_slots, bm, bk)`` tensor.

A computed block's values live at ``store[slot]`` with ``slot = layout.storage[p]``:

==================  =====================================================
slots               hold
==================  =====================================================
``[0, n_train)``    trainable blocks (``w_train``, the Parameter)
``[n_train, n_train + n_frozen)``   frozen blocks
``[fixed_base, n_slots)``           one fixed slot per mixed block, ``fixed_base = n_train + n_frozen``
==================  =====================================================

so a kernel addresses any block as ``base + slot * bm * bk`` and one TMA
descriptor covers every block: no select between two stores on the fast path.

The layers keep both halves in one buffer (``weight_train`` is a view of its
prefix, ``weight_frozen`` of the rest), so :func:`value_store` returns a view
and copies nothing. Stores that are not adjacent in memory (passed by hand,
or split apart by something that rebuilds parameters, such as FSDP2's
sharding) still work: they are concatenated per call, which costs a copy of
the computed blocks, and a warning says so once.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["adjacent", "value_store", "join_stores"]

_warned_copy = False


def adjacent(w_train: torch.Tensor, w_frozen: torch.Tensor) -> bool:
    """Whether ``w_frozen`` starts exactly where ``w_train`` ends, in one contiguous storage."""
    if not (w_train.is_contiguous() and w_frozen.is_contiguous()):
        return False
    if w_train.dtype != w_frozen.dtype or w_train.device != w_frozen.device:
        return False
    if w_train.untyped_storage().data_ptr() != w_frozen.untyped_storage().data_ptr():
        return False
    return w_frozen.storage_offset() == w_train.storage_offset() + w_train.numel()


def join_stores(w_train: torch.Tensor, w_frozen: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous ``[w_train | w_frozen]`` buffer (what the layers keep their values in)."""
    return torch.cat([w_train.detach().reshape(-1, *w_frozen.shape[1:]), w_frozen.detach()]).contiguous()


def value_store(w_train: torch.Tensor, w_frozen: torch.Tensor) -> torch.Tensor:
    """``[w_train | w_frozen]`` as one ``(n_train + n_frozen_slots, bm, bk)`` tensor, a view when possible.

    Example:
        >>> buf = torch.zeros(5, 2, 2)
        >>> value_store(buf[:3], buf[3:]).data_ptr() == buf.data_ptr()
        True
    """
    if w_frozen.shape[0] == 0:
        return w_train
    if w_train.shape[0] == 0:
        return w_frozen
    if adjacent(w_train, w_frozen):
        n = w_train.shape[0] + w_frozen.shape[0]
        return w_train.as_strided((n, *w_train.shape[1:]), w_train.stride(), w_train.storage_offset())
    global _warned_copy
    if not _warned_copy:
        _warned_copy = True
        warnings.warn(
            "sparsekern: w_train and w_frozen are not one buffer, so every call copies them into one "
            "(slower). The sparse layers keep them adjacent; this happens when the stores are passed by "
            "hand or when parameters are rebuilt (e.g. sharded). (Said once per process.)",
            stacklevel=3,
        )
    return torch.cat([w_train, w_frozen])
