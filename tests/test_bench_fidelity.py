"""The fidelity suite's quick run: every column is there, and the block runs skip the FLOPs they claim.

FLOPs are judged from the suite's counts (``sparsekern.report``), never from timings. The quick
configuration trains dense, magnitude and RigL for a few steps on 200 kB of the stdlib's source.
"""

import csv
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from sparsekern.bench import fidelity
from sparsekern.bench.corpus import VAL_MOD, load_corpus

TABLE_HEADERS = ("val bits/byte", "block-element gap", "fwd GFLOP", "dX GFLOP", "dW GFLOP", "FLOPs vs dense",
                 "ms/step", "distribution", "granularity")  # fmt: skip


def _env():
    # conftest turns the Triton interpreter on for this process; the suite must run the real CPU path.
    return {k: v for k, v in os.environ.items() if k not in ("SPARSEKERN_INTERPRET", "TRITON_INTERPRET")}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out, cwd = tmp_path_factory.mktemp("fidelity"), tmp_path_factory.mktemp("elsewhere")
    args = [sys.executable, "-m", "sparsekern.bench", "--suite", "fidelity", "--quick", "--device", "cpu"]
    proc = subprocess.run([*args, "--out", str(out)], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    (csv_path,) = out.glob("fidelity_cpu_*.csv")
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, list(reader)
    return out, proc, columns, rows


def _f(row, key):
    return float(row[key])


def test_quick_run_has_every_column(quick):
    out, proc, columns, rows = quick
    assert columns == fidelity.RESULT_COLUMNS
    (md,) = out.glob("fidelity_cpu_*.md")
    text = md.read_text()
    for header in TABLE_HEADERS:
        assert header in text, f"the table lacks the column {header!r}"
    assert {(r["method"], r["granularity"]) for r in rows} == {
        ("dense", "dense"),
        ("magnitude", "element"),
        ("magnitude", "block"),
        ("rigl", "element"),
        ("rigl", "block"),
    }
    for r in rows:
        for key in ("val_bpb", "ms_per_step", "fwd_gflop", "dx_gflop", "dw_gflop", "flop_fraction", "loadavg"):
            assert math.isfinite(_f(r, key)), f"{r['method']} {r['granularity']}: {key} = {r[key]!r}"
        assert 1.0 < _f(r, "val_bpb") < 9.0  # a byte model starts near 8 bits/byte
        assert (r["gap"] != "") == (r["granularity"] == "block")
    (doc_path,) = (p for p in out.glob("fidelity_cpu_*.json") if not p.name.endswith("_curves.json"))
    doc = json.loads(doc_path.read_text())
    assert doc["columns"] == fidelity.RESULT_COLUMNS and len(doc["rows"]) == len(rows)
    assert next(out.glob("fidelity_cpu_*.png")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = json.loads(next(out.glob("fidelity_cpu_*_curves.json")).read_text())
    assert all(len(c["curve"]) >= 2 for c in curves)


def test_block_runs_skip_the_flops_they_claim(quick):
    _, _, _, rows = quick
    by = {(r["method"], r["granularity"]): r for r in rows}
    dense = by["dense", "dense"]
    assert _f(dense, "flop_fraction") == pytest.approx(1.0)
    for method in ("magnitude", "rigl"):
        el, bl = by[method, "element"], by[method, "block"]
        # Masked dense: every block of the sparse layers is computed, in all three passes.
        for p in ("fwd", "dx"):
            assert _f(el, f"sparse_{p}_fraction") == pytest.approx(1.0)
        # Block masks: the computed FLOPs are exactly the kept weights' (no pruned weight inside a
        # computed block), about the density, in the forward and the input gradient alike.
        for p in ("fwd", "dx"):
            assert _f(bl, f"sparse_{p}_fraction") == pytest.approx(_f(bl, "sparse_kept_fraction"), abs=1e-12)
        assert _f(bl, "sparse_kept_fraction") == pytest.approx(0.1, abs=0.05)
        assert _f(el, "sparse_kept_fraction") == pytest.approx(0.1, abs=0.01)
        assert _f(bl, "fwd_gflop") < 0.35 * _f(dense, "fwd_gflop")
        assert _f(el, "fwd_gflop") == pytest.approx(_f(dense, "fwd_gflop"))
    # Magnitude trains every kept block: the weight gradient is the forward's size.
    mag = by["magnitude", "block"]
    assert _f(mag, "sparse_dw_fraction") == pytest.approx(_f(mag, "sparse_fwd_fraction"))
    # RigL also pays for its dense gradients on update steps, spread over the run.
    rigl = by["rigl", "block"]
    assert _f(rigl, "dw_gflop") > _f(rigl, "fwd_gflop")


def test_corpus_split_is_by_file_and_deterministic():
    a, b = load_corpus(50_000, 5_000), load_corpus(50_000, 5_000)
    assert a.train.numel() == 50_000 and a.val.numel() == 5_000
    assert bytes(a.train) == bytes(b.train) and bytes(a.val) == bytes(b.val)
    assert a.train_files > 0 and a.val_files > 0
    assert VAL_MOD == 10


def test_frozen_blocks_skip_the_weight_gradient():
    """FreezeNet at block granularity: half the kept blocks frozen, so dW computes half the forward's blocks."""
    import torch

    import sparsekern
    from sparsekern.bench.corpus import ByteGPT, byte_loss, sparse_layer_names, train_batch

    cfg = fidelity.default_config(torch.device("cpu"), quick=True)
    torch.manual_seed(0)
    model = ByteGPT(cfg.layers, cfg.width, cfg.context)
    data = load_corpus(20_000, 2_000)
    batch = [train_batch(data.train, 4, cfg.context, torch.Generator().manual_seed(0))]
    sparsekern.sparsify(model, method="snip", density=0.25, trainable=0.5, freeze="freezenet", block_size=32,
                        layers=sparse_layer_names(model), data=batch, loss_fn=byte_loss, seed=0)  # fmt: skip
    # One short sequence is enough for FLOP fractions (the Triton interpreter runs the layers in-process).
    cols = fidelity.flop_columns(replace(cfg, batch=1, context=4), model, {}, steps=1)
    assert cols["sparse_fwd_fraction"] == pytest.approx(cols["sparse_kept_fraction"])
    assert cols["sparse_dw_fraction"] == pytest.approx(cols["sparse_trainable_fraction"])
    assert cols["sparse_dw_fraction"] == pytest.approx(0.5 * cols["sparse_fwd_fraction"], rel=0.2)
