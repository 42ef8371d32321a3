"""One forward launch of the headline layer, for ``ncu`` to read counters from (``make bench-gpu``).

bf16, 4096x4096 weight, 64x64 blocks at density 0.1, 16384 tokens: the linear suite's main case.
The config comes from ``kernels/tuned/<device>.json`` (which ``sparsekern-bench --tune`` writes just before in
``make bench-gpu``), else the default; never a tuning sweep, so ncu profiles the kernel that runs.

    ncu --clock-control none -k regex:_bsmm_fwd_kernel -c 1 python3 -m sparsekern.bench.ncu_forward
"""

import os

os.environ.setdefault("SPARSEKERN_AUTOTUNE", "0")

import torch  # noqa: E402

from sparsekern.nn import SparseLinear  # noqa: E402
from sparsekern.testing import random_block_mask  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    n = k = 4096
    mask = random_block_mask((n, k), 64, 0.1)
    layer = SparseLinear(k, n, block_size=64, mask=mask, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(16384, k, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):
            layer(x)
    torch.cuda.synchronize()
    print(f"forward ok: {layer.layout}")


if __name__ == "__main__":
    main()
