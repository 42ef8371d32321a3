"""``sparsekern.sparsify`` and ``imp``: modules replaced, numerics against float64 references, reports, rollback.

Layers are tiny (blocks of 16): under ``SPARSEKERN_INTERPRET=1`` the kernels run in Triton's interpreter.
"""

import copy

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern import SparseConv2d, SparseLinear
from sparsekern.methods import apply_masks, imp, masks
from sparsekern.testing import (
    assert_close,
    reference_conv2d,
    reference_conv_grads,
    reference_grads,
    reference_linear,
)

BS = 16


def mlp():
    return nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))


def data(n=1):
    return [(torch.randn(4, 40), torch.randint(0, 10, (4,))) for _ in range(n)]


def test_sparsify_replaces_layers_and_matches_the_masked_reference():
    model = mlp()
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in ("0", "2")}
    bias = {n: model.get_submodule(n).bias.detach().clone() for n in ("0", "2")}
    expect = masks(model, "magnitude", 0.5, 0.5, block_size=BS, granularity="element", seed=1)
    rep = sparsekern.sparsify(model, "magnitude", 0.5, 0.5, block_size=BS, granularity="element", seed=1)
    assert isinstance(model[0], SparseLinear) and isinstance(model[2], SparseLinear)
    assert isinstance(model[4], nn.Linear) and not rep["4"].sparse
    for name in ("0", "2"):
        layer = model.get_submodule(name)
        mask, frozen = expect[name]
        assert torch.equal(layer.mask, mask) and torch.equal(layer.frozen_mask, frozen)
        x = torch.randn(5, layer.in_features, requires_grad=True)
        y = layer(x)
        assert_close(y, reference_linear(x, dense[name], mask, bias[name]), torch.float32, layer.in_features, "y")
        dy = torch.randn_like(y)
        y.backward(dy)
        dx, dw, db = reference_grads(x, dense[name], mask, frozen, dy, bias[name])
        assert_close(x.grad, dx, torch.float32, layer.out_features, "dx")
        got_dw = layer.layout.to_dense(layer.weight_train.grad, torch.zeros_like(layer.weight_frozen))
        assert_close(got_dw, dw, torch.float32, 5, "dW")
        # Gradients reach only trainable elements.
        assert not got_dw[~(mask & ~frozen)].any()
        assert_close(layer.bias.grad, db, torch.float32, 5, "dbias")


def test_whole_model_matches_the_masked_dense_model_in_float64():
    model = mlp()
    ref = copy.deepcopy(model).double()
    sparsekern.sparsify(model, "grasp", 0.4, 0.5, block_size=BS, data=data(2), seed=0)
    with torch.no_grad():
        for name in ("0", "2"):
            ref.get_submodule(name).weight.mul_(model.get_submodule(name).mask)
    x = torch.randn(7, 40)
    assert_close(model(x), ref(x.double()), torch.float32, 48, "model output", scale=3.0)


def test_density_zero_leaves_only_the_bias():
    model = nn.Sequential(nn.Linear(48, 32))
    rep = sparsekern.sparsify(model, "magnitude", 0.0, block_size=BS)
    assert model[0].layout.nnz_blocks == 0 and rep["0"].flops_saved["forward"] == 1.0
    x = torch.randn(3, 48)
    torch.testing.assert_close(model(x), model[0].bias.expand(3, 32), rtol=0, atol=0)


def test_part_pruned_part_frozen_part_trainable_layer():
    model = nn.Sequential(nn.Linear(40, 48))
    init = model[0].weight.detach().clone()
    sparsekern.sparsify(model, "random", 0.6, 0.5, block_size=BS, granularity="element", seed=0)
    layer = model[0]
    mask, frozen = layer.mask, layer.frozen_mask
    trainable = mask & ~frozen
    assert (~mask).any() and frozen.any() and trainable.any()
    counts = layer.layout.element_counts()
    assert counts["kept"] == round(0.6 * 48 * 40) and counts["trainable"] == round(0.5 * counts["kept"])
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        layer(torch.randn(6, 40)).square().sum().backward()
        opt.step()
    w = layer.weight
    assert torch.equal(w[frozen], init[frozen]), "frozen weights stay at their initial values"
    assert not w[~mask].any(), "pruned weights stay zero"
    assert (w[trainable] != init[trainable]).all(), "trainable weights moved"


def test_block_granularity_freezes_whole_blocks():
    model = nn.Sequential(nn.Linear(64, 64))
    rep = sparsekern.sparsify(model, "magnitude", 0.5, 0.5, block_size=BS, seed=0)
    lay = model[0].layout
    assert lay.n_mixed == 0, "block freezing leaves no mixed block"
    assert lay.nnz_blocks == 8 and lay.n_train == 4 and lay.n_frozen == 4
    assert rep["0"].block_fraction == 0.5 and rep["0"].trainable_block_fraction == 0.25
    assert rep["0"].flops_saved["forward"] == 0.5 and rep["0"].flops_saved["weight_grad"] == 0.75


def test_report_contents_and_table():
    model = mlp()
    rep = sparsekern.sparsify(model, "snip", 0.25, block_size=BS, data=data(), seed=0)
    assert set(rep.layers) == {"0", "2", "4"} and rep.sparse_layers == ["0", "2"]
    r = rep["2"]
    lay = model[2].layout
    assert r.kind == "linear" and r.shape == (32, 48) and r.sparse and r.reason is None
    assert r.element_density == pytest.approx(model[2].mask.float().mean().item())
    assert r.block_fraction == lay.block_density == pytest.approx(2 / 6)
    assert r.trainable_fraction == 1.0
    f = lay.flops(1)
    assert r.flops_per_token == f
    assert r.flops_saved["input_grad"] == pytest.approx(1 - f["input_grad"]["block"] / f["input_grad"]["dense"])
    skipped = rep["4"]
    assert not skipped.sparse and "smaller than a 16x16 block" in skipped.reason
    assert skipped.element_density == 1.0 and skipped.flops_saved["forward"] == 0.0
    assert r.block_size == (BS, BS) and skipped.block_size is None
    table = rep.table()
    assert table.count("\n") == 2 + 3  # header, rule, three layers, total
    assert "smaller than a 16x16 block" in table and "| total |" in table
    tot = rep.total()
    assert tot.name == "total" and tot.block_size == (BS, BS) and 0 < tot.flops_saved["forward"] < 1
    dense, block = (sum(x.flops_per_token["forward"][level] for x in rep) for level in ("dense", "block"))
    assert tot.flops_saved["forward"] == pytest.approx(1 - block / dense)


def test_sparsify_is_deterministic_under_a_seed():
    torch.manual_seed(0)
    a = mlp()
    b = mlp()
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        sparsekern.sparsify(m, "random", 0.3, 0.5, block_size=BS, seed=7)
    assert torch.equal(a[0].mask, b[0].mask) and torch.equal(a[2].frozen_mask, b[2].frozen_mask)
    assert torch.equal(a[0].weight, b[0].weight)


def test_freeze_layers_and_excluded_layers():
    model = mlp()
    rep = sparsekern.sparsify(model, "magnitude", 0.5, block_size=BS, freeze_layers=["2", "4"], exclude_first=True)
    assert not rep["0"].sparse and rep["0"].reason == "excluded (first layer)"
    assert isinstance(model[0], nn.Linear) and model[0].weight.requires_grad
    assert model[2].layout.n_train == 0 and rep["2"].trainable_fraction == 0.0
    # "4" is too small to convert, so whole-layer freezing stops its weight gradient instead.
    assert isinstance(model[4], nn.Linear) and not model[4].weight.requires_grad
    assert rep["4"].trainable_fraction == 0.0


def test_bad_inputs_raise_and_leave_the_model_alone():
    model = mlp()
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['fc'\]"):
        sparsekern.sparsify(model, layers=["fc"], block_size=BS)
    with pytest.raises(ValueError, match="density"):
        sparsekern.sparsify(model, density=1.2, block_size=BS)
    with pytest.raises(ValueError, match="unknown method"):
        sparsekern.sparsify(model, "rigl", block_size=BS)
    assert all(type(m) is not SparseLinear for m in model.modules())


def test_failure_while_converting_rolls_back(monkeypatch):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    real = SparseLinear.from_dense.__func__

    def flaky(cls, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(SparseLinear, "from_dense", classmethod(flaky))
    with pytest.raises(RuntimeError, match="boom"):
        sparsekern.sparsify(model, "magnitude", 0.5, block_size=BS)
    assert len(calls) == 2
    assert all(type(m) is not SparseLinear for m in model.modules()), "no half-converted model"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_apply_masks_checks_every_layer_before_changing_any():
    model = mlp()
    sparsekern.sparsify(model, "magnitude", 0.5, block_size=BS)
    old = model[0].mask.clone()
    m0 = torch.zeros(48, 40, dtype=torch.bool)
    m0[:16, :16] = True
    bad_frozen = torch.ones(32, 48, dtype=torch.bool)  # not inside its mask
    with pytest.raises(ValueError, match="frozen"):
        apply_masks(model, {"0": (m0, None), "2": (model[2].mask & False, bad_frozen)})
    assert torch.equal(model[0].mask, old)
    apply_masks(model, {"0": (m0, None)})
    assert torch.equal(model[0].mask, m0)


@pytest.mark.parametrize("granularity", ["block", "element"])
def test_sparsify_converts_conv_layers(granularity, backend):

    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 9, 32))
    w = model[0].weight.detach().clone()
    b = model[0].bias.detach().clone()
    data = [(torch.randn(2, 16, 3, 3), torch.randint(0, 32, (2,)))]
    rep = sparsekern.sparsify(model, "snip", 0.5, 0.5, block_size=BS, data=data, granularity=granularity, seed=0)
    conv = model[0]
    assert isinstance(conv, SparseConv2d) and rep["0"].kind == "conv2d" and rep["0"].sparse
    assert rep["3"].sparse and isinstance(model[3], SparseLinear)
    mask, frozen = conv.mask, conv.frozen_mask
    if granularity == "element":
        assert int(mask.sum()) == round(0.5 * mask.numel())
        assert rep["0"].element_density == 0.5
    else:
        assert conv.layout.nnz_blocks == round(0.5 * 2 * 9)  # 32 out x (9 taps x 16 in) in 16x16 blocks
        assert conv.layout.n_mixed == 0
    x = torch.randn(2, 16, 3, 3, requires_grad=True)
    y = conv(x)
    assert_close(y, reference_conv2d(x, w, mask, b, padding=1), torch.float32, 16 * 9, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    dx, dw, _ = reference_conv_grads(x, w, mask, frozen, dy, b, padding=1)
    assert_close(x.grad, dx, torch.float32, 32 * 9, "dx")
    got_dw = conv._from_matrix(conv.layout.to_dense(conv.weight_train.grad, torch.zeros_like(conv.weight_frozen)))
    assert_close(got_dw, dw, torch.float32, 18, "dW")
    assert not got_dw[~(mask & ~frozen)].any()


def test_layers_that_cannot_be_converted_stay_dense_with_a_reason():
    model = nn.Sequential(nn.Conv2d(32, 32, 3, groups=2), nn.Conv2d(32, 32, 3, padding=1, padding_mode="circular"))
    model.add_module("attn", nn.MultiheadAttention(32, 2))
    rep = sparsekern.sparsify(model, "magnitude", 0.5, block_size=BS, min_blocks=1)
    assert "groups=2" in rep["0"].reason and "padding_mode" in rep["1"].reason
    assert "subclasses a torch layer" in rep["attn.out_proj"].reason
    assert not any(r.sparse for r in rep) and all(type(m) is not SparseConv2d for m in model.modules())


# ----------------------------------------------------------- lottery tickets
def _sgd_steps(model, steps, start=0, on_step=None):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for step in range(start, steps):
        if on_step is not None:
            on_step(step)
        x = torch.randn(4, 40, generator=gen)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_imp_weight_rewinding_restores_the_stored_weights_exactly():
    model = mlp()
    seen = []

    def train(m, info):
        state = sparsekern.methods.lottery.dense_state(m)
        if info.round > 0:
            assert isinstance(m[0], SparseLinear) and isinstance(m[2], SparseLinear)
            state.update({f"{n}.mask": m.get_submodule(n).mask for n in ("0", "2")})
        seen.append((state, info))
        _sgd_steps(m, 3, info.start_step, lambda s: s == info.rewind_step and info.checkpoint())

    res = imp(model, train, rounds=2, prune_fraction=0.5, rewind_step=1, block_size=BS, granularity="element")
    assert len(seen) == 3 and [i.round for _, i in seen] == [0, 1, 2]
    ckpt = res.rewind_state
    assert not torch.equal(ckpt["0.weight"], seen[0][0]["0.weight"]), "the checkpoint is step 1, not the init"
    prev = None
    for r in (1, 2):
        state, info = seen[r]
        assert info.start_step == 1 and info.density == 0.5**r
        for name in ("0", "2"):
            mask = res.history[r - 1][name]
            w, keep = state[f"{name}.weight"], state[f"{name}.mask"]
            assert torch.equal(w, torch.where(keep, ckpt[f"{name}.weight"], 0.0))
            assert torch.equal(state[f"{name}.bias"], ckpt[f"{name}.bias"])
            assert mask.element_density == pytest.approx(0.5**r, abs=1e-3)
            if prev is not None:
                assert not (keep & ~prev[name]).any(), "masks are nested"
        prev = {n: state[f"{n}.mask"] for n in ("0", "2")}
    assert torch.equal(res.masks["0"], model[0].mask)
    assert torch.equal(state["4.weight"], ckpt["4.weight"])  # the dense layer is rewound too


def test_imp_lr_rewinding_keeps_the_trained_weights():
    model = mlp()
    states = []

    def train(m, info):
        assert info.mode == "lr"
        states.append(sparsekern.methods.lottery.dense_state(m))
        _sgd_steps(m, 2)
        states.append(sparsekern.methods.lottery.dense_state(m))

    res = imp(model, train, rounds=1, prune_fraction=0.5, rewind="lr", block_size=BS)
    assert res.rewind_state is None
    trained, start = states[1], states[2]
    mask = model[0].mask
    assert torch.equal(start["0.weight"], torch.where(mask, trained["0.weight"], 0.0))
    assert model[0].layout.nnz_blocks == round(0.5 * 9)  # 48x40 in 16x16 blocks: a 3x3 grid


def test_imp_needs_the_checkpoint_call():
    with pytest.raises(RuntimeError, match="checkpoint"):
        imp(mlp(), lambda m, info: None, rounds=1, rewind_step=5, block_size=BS)
    with pytest.raises(ValueError, match="rewind"):
        imp(mlp(), lambda m, info: None, rounds=1, rewind="init", block_size=BS)


def test_sparsify_again_updates_sparse_layers_in_place():
    model = nn.Sequential(nn.Linear(64, 64))
    sparsekern.sparsify(model, "magnitude", 0.5, block_size=BS)
    layer = model[0]
    before = layer.weight
    rep = sparsekern.sparsify(model, "magnitude", 0.25, block_size=BS)
    assert model[0] is layer, "already sparse layers get set_masks, not a new module"
    assert layer.layout.nnz_blocks == 4 and rep["0"].block_fraction == 0.25
    mask = layer.mask
    assert torch.equal(layer.weight[mask], before[mask]) and not (mask & (before == 0)).any()
    with pytest.raises(ValueError, match="scores a dense model"):
        sparsekern.sparsify(model, "snip", 0.1, block_size=BS, data=data())


def test_global_freezenet_ranks_saliency_over_all_layers():
    model = mlp()
    out = masks(model, "magnitude", 1.0, 0.3, block_size=BS, granularity="element", freeze="freezenet",
                distribution="global", data=data())  # fmt: skip
    kept = sum(int(m.sum()) for m, f in out.values())
    train = sum(int((m & ~f).sum()) for m, f in out.values())
    assert train == round(0.3 * kept)
    per_layer = {n: (m & ~f).float().mean().item() for n, (m, f) in out.items()}
    assert len({round(v, 2) for v in per_layer.values()}) > 1, "a global ranking does not give every layer 0.3"


def test_imp_global_with_conv_layers(backend):

    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4, 32))
    x = torch.randn(2, 16, 2, 2)

    def train(m, info):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
        m(x).square().mean().backward()
        opt.step()

    res = imp(model, train, rounds=2, prune_fraction=0.5, block_size=BS, distribution="global")
    assert isinstance(model[0], SparseConv2d) and isinstance(model[3], SparseLinear)
    blocks = [model[0].layout, model[3].layout]
    kept = sum(lay.nnz_blocks for lay in blocks)
    total = sum(lay.grid[0] * lay.grid[1] for lay in blocks)
    assert kept == round(0.25 * total)
    assert [r.sparse_layers for r in res.history] == [["0", "3"], ["0", "3"]]
    assert torch.equal(res.masks["0"], model[0].mask)


# ------------------------------------------------------------- tied weights
def test_tied_weights_stay_dense_and_tied_with_the_reason():
    model = nn.ModuleDict({"emb": nn.Embedding(64, 48), "body": nn.Linear(48, 48), "head": nn.Linear(48, 64)})
    model["head"].weight = model["emb"].weight
    rep = sparsekern.sparsify(model, "magnitude", 0.5, block_size=BS)
    assert rep["body"].sparse and not rep["head"].sparse
    assert "its weight is tied to emb.weight" in rep["head"].reason
    assert type(model["head"]) is nn.Linear and model["head"].weight is model["emb"].weight
    assert sparsekern.methods.targets.tied_parameters(model) == {
        "emb.weight": ["emb.weight", "head.weight"],
        "head.weight": ["emb.weight", "head.weight"],
    }
    # Asked for explicitly, the tie is an error, and nothing changes.
    before = model["body"].mask.clone()
    with pytest.raises(ValueError, match="head cannot be converted: its weight is tied to emb.weight"):
        apply_masks(model, {"body": (~before, None), "head": (torch.ones(64, 48, dtype=torch.bool), None)})
    assert torch.equal(model["body"].mask, before) and type(model["head"]) is nn.Linear


def test_a_module_registered_twice_is_converted_once_and_stays_shared():
    shared = nn.Linear(48, 48)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    rep = sparsekern.sparsify(model, "magnitude", 0.5, block_size=BS)
    assert list(rep.layers) == ["0"] and rep["0"].sparse
    assert isinstance(model[0], SparseLinear) and model[2] is model[0]


# ------------------------------------------------------------- re-blocking
def test_sparsify_again_with_another_block_size_reblocks_and_says_so():
    model = mlp()
    sparsekern.sparsify(model, "magnitude", 0.5, block_size=32, min_blocks=1)
    old = {n: model.get_submodule(n) for n in ("0", "2")}
    assert all(m.block_size == (32, 32) for m in old.values())
    weights = {n: m.weight.clone() for n, m in old.items()}
    rep = sparsekern.sparsify(model, "magnitude", 0.25, block_size=BS, min_blocks=1)
    for name in ("0", "2"):
        layer = model.get_submodule(name)
        assert layer.block_size == (BS, BS) and layer.layout.n_mixed == 0, "the new layout is made of 16x16 blocks"
        assert rep[name].note == "re-blocked from 32x32 to 16x16"
        assert layer.layout.nnz_blocks == round(0.25 * layer.layout.grid[0] * layer.layout.grid[1])
        # The kept values are the old layer's effective weight (re-blocking converts W * mask).
        assert torch.equal(layer.weight, torch.where(layer.mask, weights[name], 0.0))
        assert old[name].mask.logical_or(~layer.mask).all(), "magnitude keeps blocks inside the old mask"
        assert layer.bias is old[name].bias
    assert "re-blocked from 32x32 to 16x16" in rep.table()


def test_reblock_keeps_element_masks_frozen_masks_and_the_optimizer_state():
    layer = SparseLinear(48, 40, block_size=32, mask=torch.rand(40, 48) < 0.6)
    with torch.no_grad():
        layer.set_masks(layer.mask, frozen_mask=layer.mask & (torch.rand(40, 48) < 0.3))
    model = nn.Sequential(layer)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(3, 48)).sum().backward()
    opt.step()
    exp_avg = layer.layout.to_dense(opt.state[layer.weight_train]["exp_avg"], torch.zeros_like(layer.weight_frozen))
    mask, frozen, weight = layer.mask, layer.frozen_mask, layer.weight
    new = sparsekern.methods.reblock(layer, block_size=(16, 32))
    assert new.block_size == (16, 32) and torch.equal(new.mask, mask) and torch.equal(new.frozen_mask, frozen)
    assert torch.equal(new.weight, weight) and layer.block_size == (32, 32), "the old layer is unchanged"
    # Through apply_masks with the optimizer: it holds the new Parameter with the same state per element.
    apply_masks(model, {"0": (mask, frozen)}, block_size=16, optimizer=opt)
    new = model[0]
    assert new.block_size == (16, 16) and torch.equal(new.weight, weight)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert any(p is new.weight_train for p in held) and not any(p is layer.weight_train for p in held)
    moved = new.layout.to_dense(opt.state[new.weight_train]["exp_avg"], torch.zeros_like(new.weight_frozen))
    assert torch.equal(moved, exp_avg)
    model(torch.randn(3, 48)).sum().backward()
    opt.step()  # the optimizer steps the live layer
    assert not torch.equal(new.weight, weight) and torch.equal(new.weight[frozen], weight[frozen])


def test_apply_masks_without_a_block_size_keeps_each_sparse_layers_blocks():
    model = mlp()
    sparsekern.sparsify(model, "magnitude", 0.5, block_size=32, min_blocks=1)
    layer = model[0]
    apply_masks(model, {"0": (layer.mask, None)})
    assert model[0] is layer and layer.block_size == (32, 32)
