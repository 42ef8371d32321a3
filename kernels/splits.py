"""How a weight-gradient launch splits its token reduction, for the linear and the conv kernels alike.

Import path: ``sparsekern.kernels.splits`` (this folder, ``kernels/``, installs as ``sparsekern.kernels``).

A weight-gradient program owns one run of trainable blocks and reduces over every token. Few trainable
blocks cannot fill the GPU that way, so the tokens are cut into ``splits`` chunks of whole steps, each
written to its own fp32 partial sum, and the launcher adds the partial sums up. Used by ``bsmm.py`` and
``bsconv.py``; nothing here launches.

Example: ``m = 4096`` tokens, 8 programs per split on a 132-SM GPU: ``wgrad_splits`` asks for
``min(cdiv(4 * 132, 8), 4096 // 512) = 8`` splits; ``split_rows(4096, 8, 64)`` makes them
``(512, 8)``: 512 tokens each (a multiple of 128 and of ``BLOCK_M``), 8 of them.
"""

from __future__ import annotations

import functools

import torch
import triton

__all__ = ["launch_split", "split_output", "split_plan", "split_rows", "sum_splits", "wgrad_splits"]


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def wgrad_splits(m: int, programs: int, device: torch.device) -> int:
    """How many token splits the weight gradient uses for ``programs`` programs per split.

    Few trainable blocks cannot fill the GPU with one program each, so the
    token reduction is split until there are about four programs per SM, but
    never into chunks of fewer than 512 tokens (below that the fp32 partial
    sums cost more than they save).
    """
    if device.type != "cuda" or programs == 0:
        return 1
    return max(1, min(triton.cdiv(4 * _sm_count(device), programs), m // 512))


def split_rows(m: int, nsplit: int, block_m: int) -> tuple[int, int]:
    """``(rows_per_split, splits)``: splits of whole 128-token (and ``block_m``) steps covering ``m`` tokens."""
    step = max(128, block_m)
    rows = triton.cdiv(triton.cdiv(m, nsplit), step) * step
    return rows, triton.cdiv(m, rows)


def split_plan(m: int, runs: int, block_m: int, splits: int | None, device: torch.device) -> tuple[int, int]:
    """``(rows_per_split, splits)`` of a launch with ``runs`` programs per split: ``splits`` when the caller
    fixed it, else :func:`wgrad_splits`; then cut to whole steps by :func:`split_rows`."""
    nsplit = splits or wgrad_splits(m, runs, device)
    return split_rows(m, nsplit, block_m)


def split_output(dw: torch.Tensor, nsplit: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Where the kernel writes: ``dw`` itself for one split, else fresh fp32 partial sums ``(nsplit, *shape)``."""
    return dw if nsplit == 1 else torch.empty(nsplit, *shape, device=device, dtype=torch.float32)


def sum_splits(dw: torch.Tensor, target: torch.Tensor, nsplit: int) -> None:
    """Add the partial sums of :func:`split_output` into ``dw`` (nothing to do for one split)."""
    if nsplit > 1:
        torch.sum(target, dim=0, out=dw) if dw.dtype == torch.float32 else dw.copy_(target.sum(0))


def launch_split(dw: torch.Tensor, shape: tuple[int, ...], m: int, runs: int, block_m: int, splits: int | None, launch):
    """One weight-gradient launch over ``m`` tokens, split as :func:`split_plan` says, summed into ``dw``.

    ``launch(target, rows_per_split, nsplit, stride_dws)`` launches the kernel's ``nsplit`` splits into
    ``target`` (``dw`` itself for one split, else the fp32 partial sums of :func:`split_output`,
    ``stride_dws`` apart; 0 for one split) and returns the launch;
    its return value is returned, so the autotuner can time the launch. ``shape`` is ``(n_train, bm, bk)``.
    The linear and the conv launchers differ only in ``launch``.

    Example:
        >>> launch_split(dw, dw.shape, m, runs, 64, None, lambda t, rows, n, s: kernel[(programs, n)](..., t, rows, s))
    """
    rows_per_split, nsplit = split_plan(m, runs, block_m, splits, dw.device)
    target = split_output(dw, nsplit, shape, dw.device)
    kernel = launch(target, rows_per_split, nsplit, target.stride(0) if nsplit > 1 else 0)
    sum_splits(dw, target, nsplit)
    return kernel
