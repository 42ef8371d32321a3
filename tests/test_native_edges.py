"""Edge cases of the native CPU kernels beyond ``test_native.py``.

Register-tile and token-tile remainders, block shapes the main grid leaves
out, zero-stride operands, concurrent callers, empty token counts on a
thread that has no workspace yet, and the permissions of the built library.
"""

import os
import stat
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from native_cases import NAN, Problem, make_masks

from sparsekern.kernels import bsmm_cpu, native
from sparsekern.testing import assert_close, reference_linear


# M around the register tiles (6, 12) and the 96-token tile; N, K off the block grid.
@pytest.mark.parametrize("m", [1, 5, 6, 11, 13, 47, 49, 95, 97])
@pytest.mark.parametrize("bs", [(64, 16), (16, 128), (128, 16), (32, 64)])
def test_tile_remainders_and_rectangular_blocks(native_only, m, bs):
    p = Problem(m, 131, 75, bs, 0.4, "mixed")
    assert bsmm_cpu.path(p.meta) == "native"
    p.check_all()


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 1, 200), (4, 200, 1), (13, 17, 15)])
@pytest.mark.parametrize("bs", [16, 128, (16, 128), (128, 16)])
def test_operands_smaller_than_one_block(native_only, monkeypatch, shape, bs):
    """One partial block (or a row or column of them), each kept: edges on every side of a computed block."""
    p = Problem(*shape, bs, 1.0, "block")
    assert p.lay.nnz_blocks >= 1
    # A single computed block is full density, which the dense crossover (0.99) would take: run native.
    monkeypatch.setattr(bsmm_cpu, "NATIVE_CROSSOVER", dict.fromkeys((16, 32, 64, 128), 1.0))
    assert bsmm_cpu.path(p.meta) == "native"
    p.check_all()


def test_zero_stride_operands(native_only):
    """Broadcast rows (row stride 0) are read in place; an all-zero-stride dy (from ``y.sum()``) is copied."""
    p = Problem(29, 96, 80, (32, 16), 0.5, "mixed")
    p.x = torch.randn(1, p.k).expand(p.m, p.k)
    p.dy = torch.ones(()).expand(p.m, p.n)
    assert bsmm_cpu.path(p.meta) == "native"
    p.check_all()


def test_empty_token_count_on_a_fresh_thread(native_only):
    """M == 0 through the raw wrappers, on a thread whose packing workspace was never allocated."""
    p = Problem(0, 64, 80, 32, 0.5, "block")
    vals = bsmm_cpu.effective_blocks(p.wt, p.wf, p.meta.storage, p.meta.aux, p.meta.element_state, p.lay.n_frozen)
    t = p.meta.train_index.long()
    results = {}

    def run():
        try:
            results["y"] = native.group_mm(
                p.x, vals.transpose(1, 2).contiguous(), p.meta.row_offsets, p.meta.col_indices, None, p.bias, p.n
            )
            results["dw"] = native.sampled_mm(p.dy, p.x, p.meta.row_indices[t], p.meta.col_indices[t], 32, 32)
        except Exception as e:  # noqa: BLE001 - reported below
            results["error"] = e

    th = threading.Thread(target=run)
    th.start()
    th.join()
    assert "error" not in results, results.get("error")
    assert results["y"].shape == (0, p.n)
    assert torch.equal(results["dw"], torch.zeros(t.numel(), 32, 32))


def test_concurrent_callers_match_serial(native_only):
    """Two Python threads at once (each with its own thread_local workspace) give bit-identical results."""
    probs = [Problem(m, n, k, bs, 0.4, "mixed") for m, n, k, bs in [(301, 130, 200, 32), (97, 64, 300, (16, 64))]]
    probs += [Problem(200, 200, 90, 64, 0.4, "mixed"), Problem(33, 300, 250, (128, 32), 0.4, "mixed")]
    assert all(bsmm_cpu.path(p.meta) == "native" for p in probs)

    def all3(p):
        return p.forward(), p.input_grad(), p.weight_grad()

    serial = [all3(p) for p in probs]

    def work(i):
        for _ in range(5):
            got = all3(probs[i % len(probs)])
            if not all(torch.equal(a, b) for a, b in zip(got, serial[i % len(probs)], strict=True)):
                return False
        return True

    with ThreadPoolExecutor(4) as ex:
        assert all(ex.map(work, range(8)))


@pytest.mark.parametrize("seed", range(6))
def test_wholly_pruned_operands_never_reach_the_result(native_only, seed):
    """Random layouts with edge blocks: NaN in x's wholly pruned block columns, in dy's wholly pruned
    block rows, and (weight gradient) wherever no trainable block reads stays out of the results."""
    g = torch.Generator().manual_seed(seed)
    bs = [16, 32, (16, 64), (128, 32), (32, 16), 64][seed]
    bm, bk = (bs, bs) if isinstance(bs, int) else bs
    m, n, k = (1, 7, 50, 97, 13, 30)[seed], int(torch.randint(20, 260, (1,), generator=g)), 200 - seed * 13
    torch.manual_seed(seed)
    mask, frozen = make_masks((n, k), bs, 0.4, "mixed")
    p = Problem(m, n, k, bs, mask=mask, frozen=frozen)
    assert bsmm_cpu.path(p.meta) == "native"
    rb, cb = p.lay.grid
    y_ref = reference_linear(p.x, p.w, p.mask, p.bias)
    dx_ref, dw_ref, _ = p.ref()
    padded = torch.zeros(rb * bm, cb * bk, dtype=torch.bool)
    padded[:n, :k] = mask
    blocks = padded.view(rb, bm, cb, bk).any(3).any(1)  # (rb, cb): computed at all
    x0, dy0 = p.x.clone(), p.dy.clone()

    p.x[:, (~blocks.any(0)).repeat_interleave(bk)[:k]] = NAN
    assert_close(p.forward(), y_ref, torch.float32, k, "y")
    p.x = x0.clone()
    p.dy[:, (~blocks.any(1)).repeat_interleave(bm)[:n]] = NAN
    assert_close(p.input_grad(), dx_ref, torch.float32, n, "dx")
    p.dy = dy0.clone()
    t = p.lay.train_index.long()
    rows, cols = set(p.lay.row_indices.long()[t].tolist()), set(p.lay.col_indices.long()[t].tolist())
    p.x[:, torch.tensor([c not in cols for c in range(cb)]).repeat_interleave(bk)[:k]] = NAN
    p.dy[:, torch.tensor([r not in rows for r in range(rb)]).repeat_interleave(bm)[:n]] = NAN
    assert_close(p.weight_grad(), p.dw_blocks(dw_ref), torch.float32, m, "dw")


def test_built_library_is_readable_by_everyone(fresh_native_build):
    """A shared SPARSEKERN_CACHE_DIR serves other users: the library must not keep mkstemp's private mode."""
    if native._compiler() is None:
        pytest.skip("no C++ compiler here")
    tmp_path = fresh_native_build
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.available()
    (so,) = tmp_path.glob("bsmm-*.so")
    mode = stat.S_IMODE(os.stat(so).st_mode)
    assert mode & 0o444 == 0o444, oct(mode)
    assert not list(tmp_path.glob("tmp*"))  # no private build files left behind


def test_extra_compiler_flags_follow_the_environment(monkeypatch):
    monkeypatch.delenv("SPARSEKERN_NATIVE_CFLAGS", raising=False)
    assert native.build_flags() == native.FLAGS
    monkeypatch.setenv("SPARSEKERN_NATIVE_CFLAGS", " -mno-avx512f  -DX=1 ")
    assert native.build_flags() == [*native.FLAGS, "-mno-avx512f", "-DX=1"]
