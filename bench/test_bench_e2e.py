"""pytest-benchmark cases mirroring the e2e suite (run by hand; ``make test`` never collects them).

Run::

    .venv/bin/python -m pytest bench/test_bench_e2e.py -k small
    .venv/bin/python -m pytest bench/test_bench_e2e.py -k "default and mlp and (dense or density0.1)"

``small`` is the suite's ``--quick`` configuration, ``default`` the device's
default (``sparsekern/bench/e2e.py``). Each case times one full training step (forward
with the loss, backward, ``AdamW.step``) of one model: ``dense`` once per
model, ``masked`` and ``sparsekern`` per density, with the suite's masks.
A model with no sparse layer (a CNN without ``SparseConv2d``) skips its
sparse cases.
"""

from __future__ import annotations

import pytest
import torch

from sparsekern.bench.common import resolve_device, sync
from sparsekern.bench.e2e import MODELS, build, default_config, masked_model, sparse_masks, sparse_model

DEVICE = resolve_device("auto")
CONFIGS = {
    "small": default_config(DEVICE, quick=True),
    "default": default_config(DEVICE),
}
CASES = [
    pytest.param(name, model, provider, density, id=f"{name}-{model}-{provider}-density{density:g}")
    for name, cfg in CONFIGS.items()
    for model in MODELS
    for provider, densities in (("dense", (1.0,)), ("masked", cfg.densities), ("sparsekern", cfg.densities))
    for density in densities
]

_bases: dict[tuple[str, str], tuple] = {}


def _base(name: str, model: str):
    if (name, model) not in _bases:
        _bases.clear()  # keep one model's tensors alive at a time
        _bases[(name, model)] = build(model, CONFIGS[name], DEVICE)
    return _bases[(name, model)]


@pytest.mark.parametrize(("name", "model", "provider", "density"), CASES)
def test_train_step(benchmark, name, model, provider, density):
    cfg = CONFIGS[name]
    base, x, target, loss_fn, shape = _base(name, model)
    if provider == "dense":
        net = base
    else:
        sparse, note = sparse_model(base, density, cfg.block)
        if not sparse_masks(sparse):
            pytest.skip(note or "no layer was sparsified")
        net = masked_model(base, sparse_masks(sparse)) if provider == "masked" else sparse
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    benchmark.extra_info.update(model=model, provider=provider, density=density, shape=shape, dtype=str(cfg.dtype))

    def setup():
        opt.zero_grad(set_to_none=True)
        return (), {}

    def step():
        loss_fn(net(x), target).backward()
        opt.step()
        sync(DEVICE)

    rounds = {"rounds": 10, "warmup_rounds": 3} if DEVICE.type == "cuda" else {"rounds": 3, "warmup_rounds": 1}
    benchmark.pedantic(step, setup=setup, **rounds)
