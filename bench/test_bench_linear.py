"""pytest-benchmark cases mirroring the linear suite (run by hand; ``make test`` never collects them).

Run::

    .venv/bin/python -m pytest bench/test_bench_linear.py -k small --benchmark-group-by=param:shape
    .venv/bin/python -m pytest bench/test_bench_linear.py -k "default and density0.1"

``small`` is the suite's ``--quick`` shape (256x256, 64 tokens); ``default`` is
the device's default shape (CPU: 4096x4096, 2048 tokens, fp32; CUDA: bf16,
16384 tokens), timed with few rounds because one dense CPU step takes about a
second. Providers and modes are those of ``sparsekern/bench/linear.py`` (peers in ``providers.py``); the dense
baseline does not depend on block or density, so it runs once per shape.
"""

from __future__ import annotations

import pytest
import torch

from sparsekern import SparseLinear
from sparsekern.bench.common import resolve_device, sync
from sparsekern.bench.linear import SuiteConfig, default_config, make_base
from sparsekern.bench.providers import MaskedLinear, bsr_forward
from sparsekern.testing import random_block_mask

DEVICE = resolve_device("auto")
SHAPES = {
    "small": default_config(DEVICE, quick=True),
    "default": default_config(DEVICE),
}
BLOCKS = (32, 64)
DENSITIES = (1.0, 0.5, 0.25, 0.1)
MODES = ("forward", "backward", "step")

_bases: dict[str, tuple] = {}


def _base(shape: str):
    if shape not in _bases:
        _bases.clear()  # keep one shape's tensors alive at a time
        cfg: SuiteConfig = SHAPES[shape]
        base, x0, dy = make_base(cfg, DEVICE)
        _bases[shape] = (cfg, base, x0.detach().requires_grad_(True), dy)
    return _bases[shape]


def _rounds(cfg: SuiteConfig) -> dict:
    if DEVICE.type == "cuda":
        return {"rounds": 20, "warmup_rounds": 3}
    return {"rounds": max(cfg.repeats, 3) if cfg.tokens > 256 else 20, "warmup_rounds": 1}


def _zero(module, x):
    for p in module.parameters():
        p.grad = None
    x.grad = None


def _bench_module(benchmark, module, cfg, x, dy, mode):
    def synced(fn):
        def run(*args):
            out = fn(*args)
            sync(DEVICE)
            return out

        return run

    if mode == "forward":

        def setup():
            _zero(module, x)
            return (), {}

        benchmark.pedantic(synced(lambda: module(x)), setup=setup, **_rounds(cfg))
    elif mode == "backward":

        def setup():
            _zero(module, x)
            y = module(x)
            sync(DEVICE)
            return (y,), {}

        benchmark.pedantic(synced(lambda y: y.backward(dy)), setup=setup, **_rounds(cfg))
    else:

        def setup():
            _zero(module, x)
            return (), {}

        benchmark.pedantic(synced(lambda: module(x).backward(dy)), setup=setup, **_rounds(cfg))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_dense(benchmark, shape, mode):
    cfg, base, x, dy = _base(shape)
    benchmark.extra_info.update(provider="dense", shape=cfg.shape, dtype=str(cfg.dtype))
    _bench_module(benchmark, base, cfg, x, dy, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"density{d:g}")
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"block{b}")
@pytest.mark.parametrize("provider", ["masked", "sparsekern", "torch_bsr"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_sparse(benchmark, shape, provider, block, density, mode):
    cfg, base, x, dy = _base(shape)
    mask = random_block_mask(
        (cfg.out_features, cfg.in_features), block, density, generator=torch.Generator().manual_seed(0)
    ).to(DEVICE)
    benchmark.extra_info.update(provider=provider, shape=cfg.shape, dtype=str(cfg.dtype), block=block, density=density)
    if provider == "torch_bsr":
        if mode != "forward":
            pytest.skip("torch BSR has no autograd: forward only")
        try:
            fwd = bsr_forward(base, mask, block)
            with torch.no_grad():
                fwd(x)
        except Exception as exc:  # any failure: torch cannot run BSR here
            pytest.skip(f"torch BSR unavailable here: {type(exc).__name__}: {exc}")

        def run():
            with torch.no_grad():
                fwd(x)
            sync(DEVICE)

        benchmark.pedantic(run, **_rounds(cfg))
        return
    if provider == "masked":
        module = MaskedLinear(base, mask)
    else:
        module = SparseLinear.from_dense(base, mask=mask, block_size=block)
        benchmark.extra_info["flop_fraction_forward"] = module.layout.summary()["forward_flop_fraction"]
    _bench_module(benchmark, module, cfg, x, dy, mode)
