"""The kernel-facing view of a block layout, shared by the Triton and CPU launchers.

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
    col_order: torch.Tensor
    train_index: torch.Tensor
    train_rank: torch.Tensor
    train_left: torch.Tensor
