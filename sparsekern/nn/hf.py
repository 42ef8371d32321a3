"""Hugging Face ``transformers`` layers that sparsekern converts, recognised without importing ``transformers``.

``transformers`` stays optional: nothing here imports it. A module is a
``Conv1D`` (GPT-2's and GPT's linear layer) when its class is named
``Conv1D`` and was defined inside the ``transformers`` package. Subclasses are
not matched: their ``forward`` may differ, as for ``nn.Linear`` subclasses,
which sparsekern leaves dense too.

``Conv1D`` computes ``y = x @ W + b`` with ``W`` of shape ``(in, out)``
(``nx``, ``nf``): an ``nn.Linear`` whose weight is stored transposed. It
becomes a :class:`~sparsekern.nn.SparseLinear` with the ``nn.Linear``
orientation ``(out, in)``; masks *given for* a ``Conv1D`` (to
``SparseLinear.from_dense``, ``sparsekern.methods.apply_masks`` or returned by
``sparsekern.methods.masks``) are in the ``Conv1D`` weight's own ``(in, out)``
orientation, so they line up with ``conv1d.weight`` element by element.

Example:
    >>> from transformers.pytorch_utils import Conv1D
    >>> is_conv1d(Conv1D(nf=96, nx=64)), is_conv1d(nn.Linear(64, 96))
    (True, False)
    >>> conv1d_features(Conv1D(nf=96, nx=64))
    (64, 96)
"""

from __future__ import annotations

from torch import nn

__all__ = ["conv1d_features", "is_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is exactly ``transformers``' ``Conv1D`` (weight ``(in, out)``, ``y = x @ W + b``).

    Args:
        module: any module.

    Returns:
        True for an instance of the ``Conv1D`` class defined in ``transformers`` itself.

    Example:
        >>> is_conv1d(nn.Linear(4, 3))
        False
    """
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.split(".")[0] == "transformers"


def conv1d_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a ``Conv1D``, read from its ``(in, out)`` weight.

    Args:
        module: a ``transformers`` ``Conv1D``.

    Returns:
        ``(in_features, out_features)``.

    Raises:
        TypeError: ``module`` is not a ``Conv1D``.
        ValueError: its weight is not 2-D.

    Example:
        >>> conv1d_features(Conv1D(nf=96, nx=64))
        (64, 96)
    """
    if not is_conv1d(module):
        raise TypeError(f"expected a transformers Conv1D, got {type(module).__name__}")
    if module.weight.dim() != 2:
        raise ValueError(f"a Conv1D weight is (in, out), got shape {tuple(module.weight.shape)}")
    n_in, n_out = module.weight.shape
    return int(n_in), int(n_out)
