"""Bring a model pruned with ``torch.nn.utils.prune`` onto sparsekern, exactly or in blocks.

An MLP is pruned to 90% by L1 magnitude (unstructured, the usual way), then
converted twice:

* ``granularity="exact"``: the same outputs and gradients, but an unstructured
  mask leaves no block empty, so nothing is skipped;
* ``granularity="block"``: the same per-layer density, re-scored by magnitude
  pooled per 32x32 block, so 90% of every GEMM is skipped (the outputs change
  and the model needs fine-tuning, as after any re-pruning).

The report tables show what each choice saves; the script also times one
training step of each model (CPU path; leave ``SPARSEKERN_INTERPRET`` unset).

    python examples/convert_pruned.py

Measured on the project's shared 2-core CPU (fp32, 512 tokens, one training
step): torch-pruned model 320 ms, exact conversion 559 ms (every block is
mixed, and merging mixed blocks costs more than the dense GEMM it feeds),
block conversion 69 ms.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn.utils import prune

from sparsekern.adapters import from_torch_prune


def step_time(model: nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    model(x).square().mean().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
    return (time.perf_counter() - start) / repeats


def pruned_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 1024))
    for layer in (model[0], model[2], model[4]):
        prune.l1_unstructured(layer, "weight", amount=0.9)
    return model


def main():
    model = pruned_model()
    x = torch.randn(512, 1024)
    with torch.no_grad():
        reference = model(x)
    pruned_time = step_time(model, x)
    for granularity in ("exact", "block"):
        converted, rep = from_torch_prune(pruned_model(), granularity=granularity, block_size=32)
        with torch.no_grad():
            diff = (converted(x) - reference).abs().max().item()
        print(f"\n## granularity={granularity!r}: max |output change| {diff:.2e}")
        print(rep.table())
        print(f"training step: {step_time(converted, x) * 1e3:.0f} ms, torch-pruned model {pruned_time * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
