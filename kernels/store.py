"""The one value store every kernel reads: ``[w_train | w_frozen]`` as a single ``(n_slots, bm, bk)`` tensor.

Import path: ``sparsekern.kernels.store`` (this folder, ``kernels/``, installs as ``sparsekern.kernels``).

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

__all__ = ["adjacent", "effective_blocks", "join_stores", "store_matrix", "value_store"]

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


def store_matrix(store: torch.Tensor) -> torch.Tensor:
    """The joined store as the ``(n_slots * bm, bk)`` matrix a TMA descriptor covers.

    A layout with no computed block never reads it, but a descriptor needs a
    non-empty tensor: one zero block stands in.

    Example:
        >>> store_matrix(torch.zeros(3, 16, 32)).shape
        torch.Size([48, 32])
    """
    if store.shape[0] == 0:
        return store.new_zeros(store.shape[1], store.shape[2])
    return store.view(-1, store.shape[2])


def effective_blocks(w_train, w_frozen, storage, aux, element_state, n_frozen) -> torch.Tensor:
    """Effective values of the computed blocks ``(nnzb, bm, bk)`` in CSR order.

    ``storage`` holds slots of the joined store ``[w_train | w_frozen]``
    (``kernels/store.py``). With every computed block trainable (no frozen
    store), that is ``w_train`` itself, returned without a copy: callers must
    not write into the result. All work is on whole contiguous blocks (no
    strided scatter), which keeps layouts made only of mixed blocks (element
    masks) cheap.
    """
    if w_frozen.shape[0] == 0:
        return w_train
    s = storage.long()
    if w_train.shape[0] == s.numel():  # every computed block is trainable: w_train is in CSR order
        vals = w_train
    else:
        # The gather copies the blocks anyway, so stores that are not adjacent cost no warning here.
        joined = value_store(w_train, w_frozen) if adjacent(w_train, w_frozen) else torch.cat([w_train, w_frozen])
        vals = joined[s]
    a = aux.long()
    mixed = (a >= 0).nonzero().squeeze(1)
    if mixed.numel() == a.numel():  # every block trainable and mixed: slots are in CSR order
        return torch.where(element_state == 2, vals, w_frozen[n_frozen:])
    if mixed.numel():
        vals = vals.clone() if vals is w_train else vals
        slot = a[mixed]
        vals[mixed] = torch.where(element_state[slot] == 2, vals[mixed], w_frozen[n_frozen + slot])
    return vals
