"""``ReadOnlyWeight``: the tensor a sparse layer's ``weight`` returns, which raises on any write.

A sparse layer computes ``weight`` from its stored blocks on each access
(``sparse_weight.BlockSparseWeight.weight``), so a write into it would be lost
silently. This subclass lets every read through (returning plain tensors,
autograd included) and raises ``RuntimeError`` on in-place ops, ``out=`` and
``inplace=True`` into it or into any view of it (``w[0]``, ``w.T``, ``.data``).

Known limits: it sees only what goes through ``__torch_function__``; a raw
``data_ptr()`` write (a C extension) is not caught.
"""

from __future__ import annotations

import torch

__all__ = ["ReadOnlyWeight"]


_WRITE_DUNDERS = {
    "__setitem__",
    "__iadd__",
    "__isub__",
    "__imul__",
    "__itruediv__",
    "__ifloordiv__",
    "__imod__",
    "__ipow__",
    "__iand__",
    "__ior__",
    "__ixor__",
    "__ilshift__",
    "__irshift__",
    "__imatmul__",
}
_NOT_WRITES = {"requires_grad_", "retain_grad", "share_memory_"}


def _written(func, name: str, args, kwargs):
    """The tensor ``func`` would write into, or ``None`` for a pure read."""
    out = kwargs.get("out")
    if out is not None:
        return out
    if args and (
        (name.endswith("_") and not name.startswith("__") and name not in _NOT_WRITES)
        or name in _WRITE_DUNDERS
        or kwargs.get("inplace") is True  # F.relu(w, inplace=True) arrives as relu
    ):
        return args[0]
    return None


def _views_of(result, sources) -> bool:
    """Whether ``result`` shares memory with one of ``sources`` (a view: ``w[0]``, ``w.T``, ``w.view(-1)``)."""
    if not isinstance(result, torch.Tensor) or isinstance(result, ReadOnlyWeight) or result.numel() == 0:
        return False
    ptr = result.untyped_storage().data_ptr()
    return any(src.untyped_storage().data_ptr() == ptr for src in sources)


class ReadOnlyWeight(torch.Tensor):
    """What a sparse layer's ``weight`` returns: a computed tensor that raises on any write.

    Reads work and return plain tensors (autograd included). Writes raise
    ``RuntimeError``, because a write into a computed tensor would silently be
    lost: in-place ops and ``out=`` into it or into any view of it (views and
    ``.data`` stay read-only), and ``inplace=True``. ``detach()`` and copies
    (``clone``, ``deepcopy``, ``torch.save``) give plain tensors.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = _written(func, name, args, kwargs)
        if isinstance(target, ReadOnlyWeight) or (
            isinstance(target, (tuple, list)) and any(isinstance(t, ReadOnlyWeight) for t in target)
        ):
            raise RuntimeError(
                f"{name or func}: a sparse layer's .weight is computed from its stored blocks (W * mask) on each "
                "access, so writes to it would be lost. Use layer.copy_dense_(w) to set values, "
                "layer.reset_parameters() to initialise, or write weight_train (the trainable blocks) directly; "
                "penalties can use .weight as it is (it is differentiable)."
            )
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        if name in ("detach", "clone", "__deepcopy__", "__reduce_ex__"):
            return result
        sources = [a for a in args if isinstance(a, ReadOnlyWeight)]
        # A view (or .data) of a read-only tensor is read-only too: writing into it would be lost as well.
        return result.as_subclass(ReadOnlyWeight) if _views_of(result, sources) else result

    def __deepcopy__(self, memo):
        return self.as_subclass(torch.Tensor).detach().clone()

    def __reduce_ex__(self, protocol):
        return self.as_subclass(torch.Tensor).detach().clone().__reduce_ex__(protocol)
