"""``torch.autocast`` for the sparse ops: the operand casts ``F.linear`` and ``F.conv2d`` get from the dispatcher."""

from __future__ import annotations

import torch


def autocast_operands(x: torch.Tensor, *operands: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``(x, *operands)`` in the autocast dtype when ``torch.autocast`` is on for ``x``'s device.

    ``F.linear`` and ``F.conv2d`` cast every floating operand but float64 to
    that dtype under autocast; the sparse ops do the same, so a model that mixes them with
    dense layers runs under ``torch.autocast`` unchanged. The casts are autograd
    ops: gradients reach the stored (say, fp32) values in their own dtype.
    """
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return (x, *operands)
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):  # autocast's own eligibility rule: floating point, but never float64
        if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
            return t
        return t.to(dtype)

    return tuple(cast(t) for t in (x, *operands))
