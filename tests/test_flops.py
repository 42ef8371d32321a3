"""``sparsekern.report``: FLOP and memory accounting against hand-counted cases (FLOPs ``[pass][level]``)."""

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern import SparseLinear
from sparsekern.flops import LEVELS, PASSES
from sparsekern.layout import BlockLayout


def _one_layer(mask, frozen=None, block=16, bias=True):
    n, k = mask.shape
    return SparseLinear(k, n, bias=bias, block_size=block, mask=mask, frozen_mask=frozen)


def test_dense_layer_counts_every_level_the_same():
    m, n, k = 5, 48, 40
    layer = _one_layer(torch.ones(n, k, dtype=torch.bool))
    rep = sparsekern.report(layer, torch.randn(m, k, requires_grad=True))
    expect = 2 * m * n * k
    assert rep.total().flops == {p: dict.fromkeys(LEVELS, expect) for p in PASSES}


def test_all_pruned_counts_zero_but_dense():
    m, n, k = 3, 32, 32
    layer = _one_layer(torch.zeros(n, k, dtype=torch.bool))
    rep = sparsekern.report(layer, torch.randn(m, k, requires_grad=True))
    total = rep.total()
    assert all(total.flops[p]["block"] == total.flops[p]["element"] == 0 for p in PASSES)
    assert total.flops["forward"]["dense"] == 2 * m * n * k
    assert total.flops_saved == dict.fromkeys(PASSES, 1.0)
    assert total.memory["grads"] == 4 * n  # only the bias trains


def test_one_partial_edge_block():
    """One kept element in the overhanging corner block: element counts 1, block counts the in-matrix area."""
    m, n, k, bs = 7, 40, 36, 16  # corner block covers rows 32..39, cols 32..35 -> 8 x 4 in the matrix
    mask = torch.zeros(n, k, dtype=torch.bool)
    mask[39, 35] = True
    rep = sparsekern.report(_one_layer(mask, block=bs), torch.randn(m, k, requires_grad=True))
    for p in PASSES:
        assert rep.total().flops[p]["element"] == 2 * m * 1
        assert rep.total().flops[p]["block"] == 2 * m * 8 * 4


def test_frozen_only_layer_has_no_weight_gradient():
    m, n, k = 4, 32, 48
    keep = torch.ones(n, k, dtype=torch.bool)
    rep = sparsekern.report(_one_layer(keep, frozen=keep, bias=False), torch.randn(m, k, requires_grad=True))
    dense = 2 * m * n * k
    total = rep.total()
    assert {p: total.flops[p]["block"] for p in PASSES} == {"forward": dense, "input_grad": dense, "weight_grad": 0}
    assert total.flops["weight_grad"]["element"] == 0
    mem = total.memory
    assert mem["params"] == 0 and mem["grads"] == 0 and mem["optimizer"] == 0
    assert mem["frozen"] == 4 * n * k


def test_first_layer_input_grad_is_not_counted_and_totals_add_up():
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), _one_layer(torch.rand(32, 64) < 0.5))
    m = 6
    rep = sparsekern.report(model, torch.randn(m, 20))
    first, second = rep
    assert list(rep.layers) == ["0", "2"] and rep.sparse_layers == ["2"]
    assert (first.kind, first.shape, first.block_size) == ("linear", (64, 20), None)
    assert second.sparse and second.block_size == (16, 16)
    assert first.flops["input_grad"]["dense"] == 0  # model input does not require grad
    assert second.flops["input_grad"]["dense"] == 2 * m * 32 * 64
    total = rep.total()
    assert total.tokens == 2 * m
    for level in LEVELS:
        for p in PASSES:
            assert total.flops[p][level] == first.flops[p][level] + second.flops[p][level]
    assert all(total.memory[key] == first.memory[key] + second.memory[key] for key in first.memory)
    assert "| total |" in rep.table()


def test_block_flops_match_a_brute_force_recount_of_the_layout():
    """The block level must be exactly the in-matrix area of the blocks the kernels visit."""
    n, k, bm, bk, m = 70, 90, 32, 16, 11
    mask = torch.rand(n, k) < 0.03
    frozen = mask & (torch.rand(n, k) < 0.5)
    lay = BlockLayout.from_masks(mask, frozen, (bm, bk))
    computed = trained = 0
    for r in range(-(-n // bm)):  # brute force over blocks, on purpose: an independent count
        for c in range(-(-k // bk)):
            blk = (slice(r * bm, (r + 1) * bm), slice(c * bk, (c + 1) * bk))
            area = mask[blk].numel()
            computed += area * bool(mask[blk].any())
            trained += area * bool((mask & ~frozen)[blk].any())
    f = lay.flops(m)
    assert f["forward"]["block"] == f["input_grad"]["block"] == 2 * m * computed
    assert f["weight_grad"]["block"] == 2 * m * trained
    assert lay.n_train == int((lay.storage < lay.n_train).sum())


def test_optimizer_state_memory_scales_with_trainable_blocks():
    n = k = 256
    bs = 32
    blocks = torch.rand(n // bs, k // bs) < 0.1
    mask = blocks.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    layer = _one_layer(mask, block=bs, bias=False)
    rep = sparsekern.report(layer, torch.randn(2, k), optimizer="adamw")
    mem = rep.total().memory
    assert mem["optimizer"] == 2 * 4 * int(blocks.sum()) * bs * bs
    assert mem["dense_total"] == 4 * n * k * 4  # params + grads + two AdamW states


def test_bad_optimizer_name():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        sparsekern.report(nn.Linear(4, 4), torch.randn(1, 4), optimizer="lion")


def test_conv_layers_count_output_positions_and_padding_channels():
    """A conv's tokens are N*Ho*Wo; dense FLOPs use Cin*kh*kw, blocks include the padded channels."""
    from sparsekern import SparseConv2d

    n, cin, cout, size = 2, 20, 32, 9
    mask = torch.zeros(cout, cin, 3, 3, dtype=torch.bool)
    mask[:16, :, 1, 1] = True  # one tap: block row 0, channel blocks 0 and 1 (the second half padding)
    model = nn.Sequential(
        nn.Conv2d(3, cin, 3, padding=1),
        SparseConv2d(cin, cout, 3, stride=2, padding=1, block_size=16, mask=mask),
    )
    rep = sparsekern.report(model, torch.randn(n, 3, size, size))
    first, second = rep["0"], rep["1"]
    assert first.kind == second.kind == "conv2d" and second.shape == (cout, cin, 3, 3)
    assert first.tokens == n * size * size and second.tokens == n * 5 * 5
    assert first.flops["input_grad"]["dense"] == 0  # the model input does not require grad
    t = second.tokens
    assert all(second.flops[p]["dense"] == 2 * t * cout * cin * 9 for p in PASSES)
    assert second.flops["forward"]["element"] == 2 * t * 16 * cin
    assert second.flops["forward"]["block"] == 2 * t * 16 * 32  # two 16x16 blocks, padding included
    assert second.memory["dense_total"] == (cout * cin * 9 + cout) * 4 * 4
