"""``SparseConv2d``: a drop-in ``nn.Conv2d`` whose pruned and frozen blocks cost nothing.

The weight keeps ``nn.Conv2d``'s orientation ``(Cout, Cin, kh, kw)`` for every
user-facing tensor (``weight``, ``mask``, ``frozen_mask``, dense checkpoints);
internally the layout is built on its matrix view (``sparsekern/convview.py``):
a block is ``bm`` output channels by ``bk`` input channels at one filter tap.
Storage is as for every sparse layer (``sparse_weight.py``): only trainable blocks
are a Parameter.

Supported: stride, padding (ints, pairs, ``'same'``, ``'valid'``), dilation,
bias, any spatial size and channel count. Not supported (``NotImplementedError``):
``groups != 1`` and ``padding_mode`` other than ``'zeros'``. NHWC
(``channels_last``) activations are the GPU kernels' native format; see
``sparsekern/functional/conv.py`` for what other formats cost.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern import convview
from sparsekern.functional import sparse_conv2d
from sparsekern.layout import normalize_block_size
from sparsekern.nn.sparse_weight import BlockSparseWeight

__all__ = ["SparseConv2d"]


class SparseConv2d(BlockSparseWeight):
    """Block-sparse ``conv2d(x, W * mask) + b`` with trainable, frozen and pruned weights.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            bias, padding_mode, device, dtype: as for ``nn.Conv2d`` (``groups``
            must be 1 and ``padding_mode`` ``'zeros'``).
        block_size: int or ``(bm, bk)``, each in {16, 32, 64, 128}; ``bm`` runs
            over output channels, ``bk`` over input channels (at one tap).
        mask: ``(Cout, Cin, kh, kw)`` bool, True = kept. Default: all kept.
        frozen_mask: same shape, True = kept but never updated. Must lie in ``mask``.

    Example:
        >>> conv = SparseConv2d(64, 128, 3, padding=1, block_size=32, mask=torch.rand(128, 64, 3, 3) < 0.5)
        >>> conv(torch.randn(2, 64, 14, 14)).shape
        torch.Size([2, 128, 14, 14])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        block_size: int | tuple[int, int] = 32,
        mask: torch.Tensor | None = None,
        frozen_mask: torch.Tensor | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if groups != 1:
            raise NotImplementedError(f"SparseConv2d supports groups=1 only, got groups={groups}")
        if padding_mode != "zeros":
            raise NotImplementedError(f"SparseConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = convview.pair(kernel_size, "kernel_size")
        self.stride = convview.pair(stride, "stride")
        self.dilation = convview.pair(dilation, "dilation")
        if isinstance(padding, str):
            # Validates the string (and 'same' with stride > 1) now, not at the first forward.
            convview.resolve_padding(padding, self.kernel_size, self.dilation, self.stride)
            self.padding = padding
        else:
            self.padding = convview.pair(padding, "padding")
        self.groups, self.padding_mode = 1, "zeros"
        self.block_size = normalize_block_size(block_size)
        self.weight_shape = (out_channels, in_channels, *self.kernel_size)
        dense = self._init_dense(bias, device, dtype)  # nn.Conv2d's initialisation
        self._init_weight(dense, mask, frozen_mask)

    def _to_matrix(self, t: torch.Tensor, fill=0) -> torch.Tensor:
        return convview.to_matrix(t, self.block_size[1], fill)

    def _from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        return convview.from_matrix(m, self.in_channels, *self.kernel_size)

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        mask: torch.Tensor | None = None,
        frozen_mask: torch.Tensor | None = None,
        block_size: int | tuple[int, int] = 32,
    ) -> SparseConv2d:
        """Convert an ``nn.Conv2d``; ``mask`` defaults to the module's own mask, else ``conv.weight != 0``.

        Masks of ``torch.nn.utils.prune`` and ``torch.ao.pruning`` are read as for
        :meth:`SparseLinear.from_dense`.

        Returns:
            A ``SparseConv2d`` on the same device and dtype whose output equals
            ``F.conv2d(x, conv.weight * mask, conv.bias, ...)``.

        Example:
            >>> dense = nn.Conv2d(64, 64, 3, padding=1)
            >>> sparse = SparseConv2d.from_dense(dense, mask=dense.weight.abs() > 0.02)
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        w, mask, bias = cls._dense_parts(conv, mask)
        return cls._converted(
            w, mask, frozen_mask, bias, block_size,
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, padding_mode=conv.padding_mode,
        )  # fmt: skip

    # ---------------------------------------------------------------- compute
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        y = sparse_conv2d(
            input,
            self.weight_train,
            self.weight_frozen,
            self._current_layout(),
            self.weight_shape,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
        )
        if self._dense_grad_probe is None:
            return y
        pads = convview.resolve_padding(self.padding, self.kernel_size, self.dilation, self.stride)
        return self._with_dense_grad(y, input, (self.stride, pads, self.dilation))

    # ------------------------------------------------------------- inspection
    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` holding the effective weight and the bias."""
        w = self.weight
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        return self._filled(conv, w)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, " + self._blocks_repr()
        )
