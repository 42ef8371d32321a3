"""``SparseLinear``: a drop-in ``nn.Linear`` whose pruned and frozen blocks cost nothing.

Storage (same weight orientation as ``nn.Linear``, ``(out_features, in_features)``):

``weight_train`` (the trainable blocks), ``weight_frozen``, ``block_code``
and ``element_state``, as for every sparse layer (see ``sparse_weight.py``); the
layout is built on the weight itself.

``weight`` is a read-only dense view of the effective weight ``W * mask`` for
inspection; ``to_dense()`` returns a real ``nn.Linear``. A dense ``nn.Linear``
``state_dict`` (``weight``, ``bias``) loads into a ``SparseLinear``: the weight
is cut to the current masks.

Known limits: ``weight`` is materialised on each access (use it for
inspection, not in a training loop); masks are fixed between ``set_masks``
calls.

``from_dense`` also converts ``transformers``' ``Conv1D`` (GPT-2's linear,
weight ``(in, out)``, see ``sparsekern/nn/hf.py``). The result is an ordinary
``SparseLinear`` in the ``nn.Linear`` orientation: its ``weight``, ``mask`` and
checkpoints are ``(out, in)``, the transpose of the ``Conv1D``'s (a ``Conv1D``
checkpoint must be transposed to load into it). The masks passed *to*
``from_dense`` for a ``Conv1D`` are in the ``Conv1D`` weight's ``(in, out)``
orientation.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.functional import sparse_linear
from sparsekern.layout import normalize_block_size
from sparsekern.nn.hf import conv1d_features, is_conv1d
from sparsekern.nn.sparse_weight import BlockSparseWeight

__all__ = ["SparseLinear"]


class SparseLinear(BlockSparseWeight):
    """Block-sparse ``y = x @ W.T + b`` with trainable, frozen and pruned weights.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        block_size: int or ``(bm, bk)``, each in {16, 32, 64, 128}; ``bm`` runs
            over output features, ``bk`` over input features.
        mask: ``(out_features, in_features)`` bool, True = kept. Default: all kept.
        frozen_mask: same shape, True = kept but never updated. Must lie in ``mask``.

    Example:
        >>> mask = torch.rand(256, 512) < 0.1
        >>> layer = SparseLinear(512, 256, block_size=32, mask=mask)
        >>> layer(torch.randn(8, 512)).shape
        torch.Size([8, 256])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        block_size: int | tuple[int, int] = 32,
        mask: torch.Tensor | None = None,
        frozen_mask: torch.Tensor | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = normalize_block_size(block_size)
        self.weight_shape = (out_features, in_features)
        dense = self._init_dense(bias, device, dtype)  # nn.Linear's initialisation
        self._init_weight(dense, mask, frozen_mask)

    def _to_matrix(self, t: torch.Tensor, fill=0) -> torch.Tensor:
        return t

    def _from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        return m

    @classmethod
    def from_dense(
        cls,
        linear: nn.Module,
        mask: torch.Tensor | None = None,
        frozen_mask: torch.Tensor | None = None,
        block_size: int | tuple[int, int] = 32,
    ) -> SparseLinear:
        """Convert an ``nn.Linear`` (or a ``transformers`` ``Conv1D``) to a ``SparseLinear``.

        ``mask`` defaults to the module's own mask, else ``weight != 0``. A module
        pruned by ``torch.nn.utils.prune`` (``weight_orig``/``weight_mask``) or
        parametrized by ``torch.ao.pruning`` (a ``FakeSparsity`` ``.mask``) keeps its
        exact mask, so ``sparsifier.convert(model, mapping={nn.Linear: SparseLinear})`` works.

        Args:
            linear: an ``nn.Linear`` (subclasses too), or ``transformers``'
                ``Conv1D`` (``y = x @ W + b``, ``W`` of shape ``(in, out)``).
            mask: bool, weight-shaped, True = kept: ``(out, in)`` for an
                ``nn.Linear``, ``(in, out)`` (the ``Conv1D`` weight's own
                orientation) for a ``Conv1D``.
            frozen_mask: same shape as ``mask``, True = kept but never updated.
            block_size: int or ``(bm, bk)``; ``bm`` runs over output features,
                ``bk`` over input features, whatever the source's orientation.

        Returns:
            A ``SparseLinear`` on the same device and dtype whose output equals
            ``F.linear(x, linear.weight * mask, linear.bias)`` (for a ``Conv1D``:
            ``x @ (W * mask) + b``). Its own weight and masks are ``(out, in)``.

        Raises:
            TypeError: ``linear`` is neither an ``nn.Linear`` nor a ``Conv1D``.
            ValueError: a mask whose shape is not the source weight's.

        Example:
            >>> dense = nn.Linear(128, 64)
            >>> sparse = SparseLinear.from_dense(dense, mask=dense.weight.abs() > 0.05)
            >>> from transformers.pytorch_utils import Conv1D
            >>> c = Conv1D(nf=64, nx=128)  # weight (128, 64)
            >>> SparseLinear.from_dense(c, mask=c.weight.abs() > 0.01).weight.shape
            torch.Size([64, 128])
        """
        if is_conv1d(linear):
            n_in, n_out = conv1d_features(linear)
            for what, m in (("mask", mask), ("frozen_mask", frozen_mask)):
                # Checked here, not after the transpose, so the message names the Conv1D's orientation.
                if m is not None and not isinstance(m, torch.Tensor):
                    raise TypeError(f"{what} must be a torch.Tensor, got {type(m).__name__}")
                if m is not None and tuple(m.shape) != (n_in, n_out):
                    raise ValueError(
                        f"{what} for a Conv1D has shape {tuple(m.shape)}; it must be the Conv1D weight's own "
                        f"(in, out) orientation {(n_in, n_out)}"
                    )
            w, mask, bias = cls._dense_parts(linear, mask)
            w, mask = w.T, mask.T
            frozen_mask = None if frozen_mask is None else frozen_mask.T
        elif isinstance(linear, nn.Linear):
            n_in, n_out = linear.in_features, linear.out_features
            w, mask, bias = cls._dense_parts(linear, mask)
        else:
            raise TypeError(f"from_dense expects an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        return cls._converted(w, mask, frozen_mask, bias, block_size, n_in, n_out)

    # ---------------------------------------------------------------- compute
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        y = sparse_linear(input, self.weight_train, self.weight_frozen, self._current_layout(), self.bias)
        return self._with_dense_grad(y, input)

    # ------------------------------------------------------------- inspection
    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` holding the effective weight and the bias."""
        w = self.weight
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=w.device, dtype=w.dtype)
        return self._filled(lin, w)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            + self._blocks_repr()
        )
