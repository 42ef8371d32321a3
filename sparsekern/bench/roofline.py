"""Roofline floor of a benchmark case: the time its computed blocks need at the device's measured peaks.

Two rates are measured once per run, in the run's dtype, on the run's device
(:func:`measure_peaks`):

* ``matmul_flops_per_s``: a large dense ``torch.matmul`` (cuBLAS on a GPU),
  ``2 n^3`` FLOPs over its median time;
* ``copy_bytes_per_s``: a large device-to-device ``Tensor.copy_``, read +
  write bytes (``2 x size``) over its median time.

The floor of one GEMM pass ``y (M x N) = x (M x K) @ W^T (N x K)`` of which a
fraction ``f`` of the weight blocks is computed is::

    flops = 2 * M * N * K * f
    bytes = e * (M * K + M * N + f * N * K)          # e = bytes per element
    floor = flops / matmul_flops_per_s + bytes / copy_bytes_per_s

The three passes of a training step have the same form: the forward reads
``x`` and writes ``y``; the input gradient reads ``dy`` and writes ``dx``; the
weight gradient reads ``dy`` and ``x`` and writes the computed blocks of
``dW``; each touches the computed weight (or weight-gradient) blocks once.
A pass whose result autograd never computes (``dx`` of a network's first
layer, ``dW`` of an all-frozen layer) contributes nothing. Compute and memory
are added, not overlapped, so the floor is a deliberately simple lower bound
of an ideal kernel that runs at cuBLAS's rate on exactly the computed blocks
and moves each operand once.

An AdamW step over ``P`` trainable elements adds ``7 * P * e`` bytes (it reads
the parameter, its gradient and both moments and writes back the parameter
and the moments) and no FLOPs worth counting. Bias, activations, norms and
losses are left out: they make the floor lower, never higher.

``pct_of_floor = 100 * floor_ms / p50``: the share of the ideal a measured
time reaches (100% = on the floor; 25% = four times slower than the floor).

Worked example, one 4096 x 4096 forward at f = 0.25 over 2048 tokens in bf16
(e = 2) on a device with 500 TFLOP/s and 2 TB/s::

    flops = 2 * 2048 * 4096 * 4096 * 0.25      = 17.18 GFLOP  -> 0.0344 ms
    bytes = 2 * (2048*4096 + 2048*4096 + 0.25 * 4096*4096) = 41.9 MB -> 0.0210 ms
    floor = 0.0554 ms

Limits: measured peaks of one large GEMM and one large copy, not vendor peaks;
no cache reuse and no launch overhead are modelled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from sparsekern.bench.common import markdown_table, time_fn

#: Bytes an AdamW step moves per trainable element, in units of the element size.
ADAMW_BYTES_PER_ELEMENT = 7


@dataclass
class Cost:
    """FLOPs and bytes of some work; adds up."""

    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def floor_ms(self, peaks: dict[str, float]) -> float:
        """``flops / rate + bytes / bandwidth`` in milliseconds."""
        return 1e3 * (self.flops / peaks["matmul_flops_per_s"] + self.bytes / peaks["copy_bytes_per_s"])


def layer_pass(
    dense_flops: float, in_elems: int, out_elems: int, weight_elems: int, fraction: float, elem_bytes: int
) -> Cost:
    """One pass of a layer: ``fraction`` of its dense FLOPs and weight, its two activations in full.

    For a convolution ``in_elems``/``out_elems`` are the input and output
    feature maps (not the im2col matrix), ``dense_flops`` is
    ``2 * batch * H_out * W_out * C_out * C_in * kh * kw``.
    """
    if fraction <= 0:
        return Cost()
    return Cost(dense_flops * fraction, float(elem_bytes) * (in_elems + out_elems + fraction * weight_elems))


def gemm_pass(m: int, n: int, k: int, fraction: float, elem_bytes: int) -> Cost:
    """One pass over an ``(n, k)`` weight with ``m`` rows of activations, a ``fraction`` of its blocks computed."""
    return layer_pass(2.0 * m * n * k, m * k, m * n, n * k, fraction, elem_bytes)


def linear_step(
    m: int,
    n: int,
    k: int,
    fractions: dict[str, float],
    elem_bytes: int,
    input_grad: bool = True,
) -> dict[str, Cost]:
    """Per-pass costs of a linear layer; ``fractions`` maps ``forward/input_grad/weight_grad`` to ``f``.

    Returns ``{"forward", "input_grad", "weight_grad"}`` costs (``input_grad`` zero when not computed).
    """
    return {
        "forward": gemm_pass(m, n, k, fractions["forward"], elem_bytes),
        "input_grad": gemm_pass(m, n, k, fractions["input_grad"], elem_bytes) if input_grad else Cost(),
        "weight_grad": gemm_pass(m, n, k, fractions["weight_grad"], elem_bytes),
    }


def adamw(trainable_elements: int, elem_bytes: int) -> Cost:
    """The bytes of one AdamW step over ``trainable_elements`` parameters."""
    return Cost(0.0, float(ADAMW_BYTES_PER_ELEMENT * trainable_elements * elem_bytes))


def mode_costs(passes: dict[str, Cost], optimizer: Cost | None = None) -> dict[str, Cost]:
    """Costs of the benchmark modes from per-pass costs.

    ``forward``; ``backward`` = input + weight gradient; ``weight_grad``;
    ``optimizer`` (when given); ``step`` = everything measured in one step.
    """
    out = {
        "forward": passes["forward"],
        "backward": passes["input_grad"] + passes["weight_grad"],
        "weight_grad": passes["weight_grad"],
    }
    out["step"] = out["forward"] + out["backward"]
    if optimizer is not None:
        out["optimizer"] = optimizer
        out["step"] = out["step"] + optimizer
    return out


# ---------------------------------------------------------------- measuring
def measure_peaks(
    device: torch.device,
    dtype: torch.dtype,
    matmul_n: int | None = None,
    copy_bytes: int | None = None,
    repeats: int = 10,
) -> dict[str, float]:
    """The dense matmul rate and copy bandwidth of ``device`` in ``dtype`` (medians of ``repeats`` calls).

    Defaults: GPU 8192^3 matmul (about 1 TFLOP) and a 1 GiB copy; CPU 1024^3 and 64 MiB.
    """
    cuda = device.type == "cuda"
    n = matmul_n or (8192 if cuda else 1024)
    size = copy_bytes or ((1 << 30) if cuda else (1 << 26))
    mm_ms = _time_matmul(n, device, dtype, repeats)
    copy_ms = _time_copy(size, device, repeats)
    return {
        "matmul_flops_per_s": 2.0 * n**3 / (mm_ms * 1e-3),
        "copy_bytes_per_s": 2.0 * size / (copy_ms * 1e-3),
        "matmul_n": n,
        "copy_bytes": size,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _time_matmul(n: int, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return time_fn(lambda: torch.matmul(a, b, out=out), device=device, warmup=2, repeats=repeats)["p50"]


def _time_copy(size: int, device: torch.device, repeats: int) -> float:
    src = torch.empty(size, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device=device, warmup=2, repeats=repeats)["p50"]


def describe_peaks(peaks: dict[str, float]) -> str:
    rate = peaks["matmul_flops_per_s"]
    rate_text = f"{rate / 1e12:.1f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"
    return (
        f"roofline peaks measured in this run: dense matmul {rate_text} "
        f"({peaks['dtype']}, {peaks['matmul_n']}^3), copy {peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s "
        f"({peaks['copy_bytes'] / 2**20:.0f} MiB device to device)"
    )


# ------------------------------------------------------------------ rows
def annotate(rows: Iterable[dict[str, object]], peaks: dict[str, float]) -> None:
    """Fill ``floor_ms`` and ``pct_of_floor`` of every row that carries ``flops`` and ``bytes``."""
    for r in rows:
        flops, nbytes = r.get("flops"), r.get("bytes")
        if flops is None or nbytes is None or flops == "" or nbytes == "":
            continue
        floor = Cost(float(flops), float(nbytes)).floor_ms(peaks)
        r["floor_ms"] = floor
        p50 = r.get("p50")
        ok = isinstance(p50, float) and not math.isnan(p50) and p50 > 0
        r["pct_of_floor"] = 100.0 * floor / p50 if ok else math.nan


def table(rows: list[dict[str, object]], modes: tuple[str, ...] = ("forward", "backward", "step")) -> str:
    """Markdown: per (model or layer, block, density, provider), each mode's % of floor, the step's floor and time.

    Rows without ``floor_ms`` (no ``flops``/``bytes``, or no peaks measured) are left out.
    """
    keyed: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("floor_ms") is None or r["mode"] not in modes:
            continue
        key = (r.get("model") or r.get("layer") or "", r["block"], r["density"], r["provider"])
        keyed.setdefault(key, {})[r["mode"]] = r
    if not keyed:
        return ""
    with_model = any(k[0] for k in keyed)
    head = (["model / layer"] if with_model else []) + ["block", "density", "provider"]
    head += [f"{m} % of floor" for m in modes] + ["step floor ms", "step p50 ms"]
    body = []
    for (model, block, density, provider), got in keyed.items():
        cells = ([model] if with_model else []) + [block or "—", f"{density:g}", provider]
        cells += [_pct(got.get(m)) for m in modes]
        st = got.get("step")
        cells += [_ms(st["floor_ms"]) if st else "—", _ms(st["p50"]) if st else "—"]
        body.append(cells)
    align = ("l" if with_model else "") + "rrl" + "r" * (len(modes) + 2)
    return markdown_table(head, body, align=align)


def _pct(r: dict | None) -> str:
    if r is None:
        return "—"
    v = r.get("pct_of_floor")
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.0f}%"


def _ms(v: object) -> str:
    if not isinstance(v, float) or math.isnan(v):
        return "—"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}"
