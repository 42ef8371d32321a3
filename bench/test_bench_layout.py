"""pytest-benchmark cases mirroring the layout suite (run by hand; ``make test`` never collects them).

Run::

    .venv/bin/python -m pytest bench/test_bench_layout.py -k small
    .venv/bin/python -m pytest bench/test_bench_layout.py -k "default and (set_masks or train_step)"

``small`` is the suite's ``--quick`` configuration, ``default`` the full one
(``sparsekern/bench/layout.py``): ``test_build`` times ``BlockLayout.from_masks`` with and
without half the kept blocks frozen, ``test_set_masks`` one mask update with
AdamW state to remap (alternating between two random masks), ``test_train_step``
one training step of the same layer (forward, backward, AdamW). The suite's
figure, ``set_masks / (100 x train_step)``, is the ratio of the last two; each
case records what it needs in ``extra_info``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from sparsekern.bench.common import resolve_device, sync
from sparsekern.bench.layout import (
    STEPS_PER_UPDATE,
    SuiteConfig,
    default_config,
    frozen_half,
    make_update_case,
    training_step,
)
from sparsekern.layout import BlockLayout
from sparsekern.testing import random_block_mask

DEVICE = resolve_device("auto")
CONFIGS = {
    "small": default_config(DEVICE, quick=True),
    "default": default_config(DEVICE),
}
BUILD_CASES = [
    pytest.param(name, size, block, density, frozen, id=f"{name}-{size}-block{block}-density{density:g}-{frozen}")
    for name, cfg in CONFIGS.items()
    for size in cfg.sizes
    for block in cfg.blocks
    for density in cfg.densities
    for frozen in ("plain", "half_frozen")
]

_update_cases: dict[str, tuple] = {}


def _update_case(name: str):
    if name not in _update_cases:
        _update_cases.clear()  # keep one configuration's layer alive at a time
        _update_cases[name] = make_update_case(CONFIGS[name], DEVICE)
    return _update_cases[name]


def _rounds(warmup: int, repeats: int) -> dict:
    return {"rounds": max(repeats, 3), "warmup_rounds": warmup}


def _synced(fn):
    def run(*args):
        out = fn(*args)
        sync(DEVICE)
        return out

    return run


@pytest.mark.parametrize(("name", "size", "block", "density", "frozen"), BUILD_CASES)
def test_build(benchmark, name, size, block, density, frozen):
    cfg: SuiteConfig = CONFIGS[name]
    gen = torch.Generator().manual_seed(cfg.seed)
    mask = random_block_mask((size, size), block, density, generator=gen).to(DEVICE)
    frozen_mask = None
    if frozen == "half_frozen":
        frozen_mask = frozen_half(mask, BlockLayout.from_masks(mask, block_size=block), gen)
    benchmark.extra_info.update(provider="sparsekern", mode="build", shape=f"{size}x{size}", block=block)
    benchmark.extra_info.update(density=density, frozen=frozen)
    lay = benchmark.pedantic(
        _synced(lambda: BlockLayout.from_masks(mask, frozen_mask, block)), **_rounds(*cfg.build_timing(size))
    )
    benchmark.extra_info["frozen_fraction"] = 1.0 - lay.n_train / max(1, lay.nnz_blocks)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_train_step(benchmark, name):
    cfg = CONFIGS[name]
    layer, opt, x, dy, _ = _update_case(name)
    benchmark.extra_info.update(provider="sparsekern", mode="train_step", shape=cfg.shape, dtype=str(cfg.dtype))
    benchmark.extra_info.update(block=cfg.update_block, density=cfg.update_density)
    benchmark.pedantic(_synced(lambda: training_step(layer, opt, x, dy)), **_rounds(cfg.warmup, cfg.repeats))
    median_ms = benchmark.stats["median"] * 1e3
    benchmark.extra_info[f"{STEPS_PER_UPDATE}_steps_ms_from_median"] = STEPS_PER_UPDATE * median_ms


@pytest.mark.parametrize("name", list(CONFIGS))
def test_set_masks(benchmark, name):
    cfg = CONFIGS[name]
    layer, opt, _, _, masks = _update_case(name)
    assert opt.state[layer.weight_train], "the optimizer has taken a step: there is state to remap"
    shape = f"{cfg.features}x{cfg.features}"
    benchmark.extra_info.update(provider="sparsekern", mode="set_masks", shape=shape, dtype=str(cfg.dtype))
    benchmark.extra_info.update(block=cfg.update_block, density=cfg.update_density)
    # Each round installs the mask the layer is not on, so every call changes the layout.
    current = next(i for i, m in enumerate(masks) if torch.equal(m, layer.mask))
    new_masks = itertools.cycle([masks[1 - current], masks[current]])

    def setup():
        return (next(new_masks),), {}

    benchmark.pedantic(
        _synced(lambda m: layer.set_masks(m, optimizer=opt)), setup=setup, **_rounds(cfg.warmup, cfg.repeats)
    )
