"""The kernel-facing view of a block layout, shared by the Triton and CPU launchers.

Import path: ``sparsekern.kernels.meta`` (this folder, ``kernels/``, installs as ``sparsekern.kernels``).

Kept apart from ``bsmm.py`` so that the CPU path works without importing Triton.
"""

from typing import NamedTuple

import torch


class Meta(NamedTuple):
    """Layout index tensors (int32, ``element_state`` int8), in launcher order."""

    row_offsets: torch.Tensor
    col_indices: torch.Tensor
    row_indices: torch.Tensor
    storage: torch.Tensor
    aux: torch.Tensor
    element_state: torch.Tensor
    row_order: torch.Tensor
    col_offsets: torch.Tensor
    row_indices_t: torch.Tensor
    block_index_t: torch.Tensor
    storage_t: torch.Tensor
    aux_t: torch.Tensor
    col_slot: torch.Tensor
    row_slot_t: torch.Tensor
    col_order: torch.Tensor
    train_index: torch.Tensor
    train_rank: torch.Tensor
    train_left: torch.Tensor


class ConvGeom(NamedTuple):
    """The geometry of one 2-D convolution, as the conv launchers read it.

    Activations are ``(n, c_in, h, w)`` logically, in any memory format. Padding
    is given as the top/left amounts only: ``h_out``/``w_out`` already account
    for the bottom/right side (which may differ, as with ``padding='same'`` and
    an even kernel). ``c_pad`` is ``c_in`` rounded up to the block's ``bk`` so
    that a block column of the weight matrix never straddles two filter taps
    (see ``sparsekern/convview.py``).
    """

    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    h_out: int
    w_out: int
    kh: int
    kw: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dil_h: int
    dil_w: int
    c_pad: int
