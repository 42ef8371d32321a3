"""``DSTScheduler``: constant density, frozen weights untouched, RigL's dense gradient only on update steps.

Tiny layers (Triton's interpreter runs the kernels): 64x48 weights in 16x16 blocks.
"""

import math

import pytest
import torch
from torch import nn

from sparsekern.methods.blocks import block_grid, expand_blocks, pool_blocks
from sparsekern.methods.dst import DSTScheduler
from sparsekern.nn import SparseConv2d, SparseLinear
from sparsekern.testing import random_block_mask

N, K, BS = 64, 48, 16


def make_model(element=False, frozen_fraction=0.3):
    """Two sparse layers with 30% of the kept weights (blocks) frozen; the masks and a fresh Adam."""
    layers = []
    for n, k in ((N, K), (N, N)):
        if element:
            mask = torch.rand(n, k) < 0.4
            frozen = mask & (torch.rand(n, k) < frozen_fraction)
        else:
            mask = random_block_mask((n, k), BS, 0.5)
            frozen = mask & random_block_mask((n, k), BS, frozen_fraction)
        lin = nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k))
        layers.append(SparseLinear.from_dense(lin, mask=mask, frozen_mask=frozen, block_size=BS))
    model = nn.Sequential(layers[0], nn.ReLU(), layers[1])
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train_step(model, opt):
    x, target = torch.randn(8, K), torch.randn(8, N)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), target).backward()
    opt.step()


def sparse_layers(model):
    return [m for m in model if isinstance(m, SparseLinear)]


def block_states(layer):
    kept = pool_blocks(layer.mask, BS, "max") > 0
    return kept, pool_blocks(layer.frozen_mask, BS, "max") > 0


@pytest.mark.parametrize("method", ["rigl", "set"])
@pytest.mark.parametrize("granularity", ["block", "element"])
def test_density_constant_and_frozen_untouched(method, granularity):
    model, opt = make_model(element=granularity == "element")
    sched = DSTScheduler(model, opt, method=method, delta_t=2, end_step=20, drop_fraction=0.5, granularity=granularity)
    layers = sparse_layers(model)
    before = [(m.mask, m.frozen_mask, m.layout.nnz_blocks, m.layout.n_train, m.weight) for m in layers]
    changed = False
    for step in range(1, 5):
        train_step(model, opt)
        assert sched.step_count == step
        if step % 2 == 0:
            assert len(sched.last_update) == 2 and all(u["step"] == step for u in sched.last_update)
    for m, (mask0, frozen0, nnzb0, ntrain0, w0) in zip(layers, before, strict=True):
        mask, frozen = m.mask, m.frozen_mask
        assert int(mask.sum()) == int(mask0.sum()), "kept element count changed"
        assert torch.equal(frozen, frozen0), "frozen mask changed"
        assert torch.equal(m.weight[frozen], w0[frozen]), "frozen values changed"
        changed |= not torch.equal(mask, mask0)
        if granularity == "block":
            assert (m.layout.nnz_blocks, m.layout.n_train) == (nnzb0, ntrain0)
            kept, _ = block_states(m)
            assert torch.equal(mask, kept.repeat_interleave(BS, 0).repeat_interleave(BS, 1)), "masks not block-aligned"
    assert changed, "no mask changed in four steps with two updates"
    # Parameters seen by the optimizer are exactly the layers' current ones.
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(m.weight_train) in held for m in layers)


def test_rigl_dense_grad_only_on_update_steps_and_matches_reference():
    model, opt = make_model()
    sched = DSTScheduler(model, opt, method="rigl", delta_t=3, end_step=100, drop_fraction=0.3)
    seen = {}
    update = sched.update

    def checked_update():
        # The captured dense gradients against autograd through dense nn.Linear copies of the same step.
        seen["grads"] = {k: v.clone() for k, v in sched._grads.items()}
        return update()

    sched.update = checked_update
    counts = []
    for step in range(1, 8):
        armed = sched.wants_dense_grad()
        assert armed == (step % 3 == 0), f"step {step}: armed={armed}"
        x, target = torch.randn(8, K), torch.randn(8, N)
        dense = nn.Sequential(sparse_layers(model)[0].to_dense(), nn.ReLU(), sparse_layers(model)[1].to_dense())
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        nn.functional.mse_loss(dense(x), target).backward()
        opt.step()
        counts.append(sched.dense_grad_count)
        if step % 3 == 0:
            for name, lin in (("0", dense[0]), ("2", dense[2])):
                torch.testing.assert_close(seen["grads"][name], lin.weight.grad, rtol=1e-5, atol=1e-5)
    assert counts == [0, 0, 2, 2, 2, 4, 4]
    assert not sched.wants_dense_grad() and sched._grads == {}


def test_no_grad_forward_while_armed_captures_nothing():
    model, opt = make_model()
    sched = DSTScheduler(model, opt, method="rigl", delta_t=1, end_step=10)
    assert sched.wants_dense_grad()
    with torch.no_grad():
        model(torch.randn(4, K))
    model(torch.randn(4, K))  # a forward never backpropagated: nothing computed
    assert sched.dense_grad_count == 0


def test_rigl_without_backward_warns_and_keeps_masks():
    model, opt = make_model()
    sched = DSTScheduler(model, opt, method="rigl", delta_t=1, end_step=10)
    masks = [m.mask for m in sparse_layers(model)]
    with pytest.warns(UserWarning, match="no dense gradient"):
        opt.step()
    assert all(torch.equal(m.mask, m0) for m, m0 in zip(sparse_layers(model), masks, strict=True))
    assert sched.step_count == 1


def test_optimizer_state_follows_the_masks():
    """Kept trainable weights keep value and Adam state; grown ones start at zero with zero state."""
    model, opt = make_model()
    sched = DSTScheduler(model, opt, method="set", delta_t=2, end_step=50, drop_fraction=0.5)
    layer = sparse_layers(model)[0]

    def dense(store):
        lay = layer.layout
        return lay.to_dense(store, torch.zeros(lay.n_frozen_slots, *lay.block_size))

    def tensors(param):
        return {k: dense(v) for k, v in opt.state[param].items() if v.dim() > 0}

    captured = {}
    update = sched.update

    def update_after_capture():  # runs inside opt.step(), after Adam moved the weights
        captured.update(w=layer.weight, param=layer.weight_train, state=tensors(layer.weight_train))
        captured["objects"] = {k: v for k, v in opt.state[layer.weight_train].items() if v.dim() > 0}
        captured["trainable"] = layer.mask & ~layer.frozen_mask
        return update()

    sched.update = update_after_capture
    train_step(model, opt)
    assert not captured
    train_step(model, opt)
    # The same trainable count: the Parameter and its state tensors are kept and written in place.
    assert layer.weight_train is captured["param"]
    assert all(opt.state[layer.weight_train][k] is v for k, v in captured["objects"].items())
    new_train = layer.mask & ~layer.frozen_mask
    stay, grown = captured["trainable"] & new_train, new_train & ~captured["trainable"]
    assert grown.any() and stay.any()
    state = tensors(layer.weight_train)
    assert set(state) == set(captured["state"]) == {"exp_avg", "exp_avg_sq"}
    for key, val in state.items():
        assert torch.equal(val[stay], captured["state"][key][stay])
        assert not val[grown].any()
        assert not val[~new_train].any()
    w = layer.weight
    assert torch.equal(w[stay], captured["w"][stay])
    assert not w[grown].any()
    assert int(opt.state[layer.weight_train]["step"]) == 2


def test_regrown_blocks_restart_at_zero():
    """With every trainable block dropped, growth picks some of them again; those restart at zero."""
    model, opt = make_model(frozen_fraction=0.0)
    sched = DSTScheduler(model, opt, method="set", delta_t=1, end_step=10, drop_fraction=1.0, decay="constant")
    train_step(model, opt)
    for upd, layer in zip(sched.last_update, sparse_layers(model), strict=True):
        assert upd["regrown"] > 0
        assert not layer.weight.any(), "every trainable block was dropped, so every kept weight is new"


def test_rigl_grows_blocks_of_largest_gradient():
    """One layer, one update: the grown blocks are the top pooled |dense dW| among the open blocks."""
    lin = nn.Linear(K, N)
    mask = random_block_mask((N, K), BS, 0.5)
    layer = SparseLinear.from_dense(lin, mask=mask, block_size=BS)
    model = nn.Sequential(layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = DSTScheduler(model, opt, method="rigl", delta_t=1, end_step=10, drop_fraction=0.5, decay="constant")
    x = torch.randn(8, K)
    dense = layer.to_dense()
    model(x).square().sum().backward()
    dense(x).square().sum().backward()
    kept0, _ = block_states(layer)
    magnitude = pool_blocks(layer.weight, BS, "l1")
    opt.step()
    n_swap = int(0.5 * int(kept0.sum()))
    dropped = torch.where(kept0, magnitude, math.inf).flatten().argsort()[:n_swap]
    open_ = ~kept0.flatten().clone()
    open_[dropped] = True
    score = torch.where(open_, pool_blocks(dense.weight.grad, BS, "l1").flatten(), -math.inf)
    expected = kept0.flatten().clone()
    expected[dropped] = False
    expected[score.argsort(descending=True, stable=True)[:n_swap]] = True
    kept1, _ = block_states(layer)
    assert torch.equal(kept1.flatten(), expected)
    assert sched.dense_grad_count == 1


def test_training_continues_on_the_new_parameters_and_state_dict_round_trips():
    model, opt = make_model()
    sched = DSTScheduler(model, opt, method="set", delta_t=1, end_step=10, seed=3)
    train_step(model, opt)
    layer = sparse_layers(model)[0]
    w = layer.weight
    train_step(model, opt)  # another update, but the weights kept by both masks must have moved
    assert not torch.equal(layer.weight[layer.mask & w.ne(0)], w[layer.mask & w.ne(0)])
    state = sched.state_dict()
    draws = torch.rand(5, generator=sched.generator)
    model2, opt2 = make_model()
    other = DSTScheduler(model2, opt2, method="set", delta_t=3, end_step=10)
    other.load_state_dict(state)
    assert other.step_count == 2 and torch.equal(torch.rand(5, generator=other.generator), draws)


def test_schedule():
    model, opt = make_model()
    sched = DSTScheduler(model, opt, method="set", delta_t=5, end_step=20, drop_fraction=0.4)
    assert sched.current_drop_fraction(0) == pytest.approx(0.4)
    assert sched.current_drop_fraction(10) == pytest.approx(0.2)
    assert sched.current_drop_fraction(20) == 0.0
    assert [s for s in range(30) if sched.is_update_step(s)] == [5, 10, 15]
    sched.remove()
    masks = [m.mask for m in sparse_layers(model)]
    for _ in range(5):
        train_step(model, opt)
    assert sched.step_count == 0
    assert all(torch.equal(m.mask, m0) for m, m0 in zip(sparse_layers(model), masks, strict=True))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "snip"}, "method"),
        ({"granularity": "row"}, "granularity"),
        ({"reduce": "mean"}, "reduce"),
        ({"delta_t": 0}, "delta_t"),
        ({"end_step": None}, "end_step"),
        ({"drop_fraction": 0.0}, "drop_fraction"),
        ({"drop_fraction": 1.5}, "drop_fraction"),
        ({"decay": "linear"}, "decay"),
    ],
)
def test_bad_arguments(kwargs, match):
    model, opt = make_model()
    with pytest.raises(ValueError, match=match):
        DSTScheduler(model, opt, **{"end_step": 10, **kwargs})


def test_bad_models():
    with pytest.raises(ValueError, match="no sparse layers"):
        DSTScheduler(nn.Linear(4, 4), torch.optim.SGD(nn.Linear(4, 4).parameters()), end_step=10)
    model, _ = make_model()
    opt = torch.optim.SGD(model[0].parameters())
    with pytest.raises(ValueError, match="optimizer does not hold"):
        DSTScheduler(model, opt, end_step=10)


# ---------------------------------------------------------------- convolutions
@pytest.fixture
def cpu_path(monkeypatch):
    """SparseConv2d on the CPU path: these tests are about masks and state, and the interpreter is slow
    (the conv kernels themselves are checked in test_conv_kernels.py and test_conv.py)."""
    import sparsekern.kernels as sk

    monkeypatch.setattr(sk, "INTERPRET", False)


def conv_model():
    """Two SparseConv2d layers (matrix views 32x144 and 32x288 in 16x16 blocks), half the blocks kept."""
    layers = []
    for c_in, padding in ((16, 1), (32, "same")):
        conv = nn.Conv2d(c_in, 32, 3, padding=padding)
        grid = block_grid(conv.weight.shape, BS)
        mask = expand_blocks(torch.rand(grid) < 0.5, conv.weight.shape, BS)
        frozen = mask & expand_blocks(torch.rand(grid) < 0.3, conv.weight.shape, BS)
        layers.append(SparseConv2d.from_dense(conv, mask=mask, frozen_mask=frozen, block_size=BS))
    model = nn.Sequential(layers[0], nn.ReLU(), layers[1])
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def test_conv_rigl_block(cpu_path):
    model, opt = conv_model()
    sched = DSTScheduler(model, opt, method="rigl", delta_t=2, end_step=20, drop_fraction=0.5)
    seen = {}
    update = sched.update
    sched.update = lambda: (seen.update({k: v.clone() for k, v in sched._grads.items()}), update())[1]
    convs = [model[0], model[2]]
    before = [(c.mask, c.frozen_mask, c.layout.nnz_blocks, c.layout.n_train, c.weight) for c in convs]
    for _ in range(2):
        x, target = torch.randn(2, 16, 6, 6), torch.randn(2, 32, 6, 6)
        dense = nn.Sequential(convs[0].to_dense(), nn.ReLU(), convs[1].to_dense())
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        nn.functional.mse_loss(dense(x), target).backward()
        opt.step()
    for name, d in (("0", dense[0]), ("2", dense[2])):
        torch.testing.assert_close(seen[name], d.weight.grad, rtol=1e-4, atol=1e-5)
    assert sched.dense_grad_count == 2
    changed = False
    for c, (mask0, frozen0, nnzb0, ntrain0, w0) in zip(convs, before, strict=True):
        assert (c.layout.nnz_blocks, c.layout.n_train) == (nnzb0, ntrain0)
        assert int(c.mask.sum()) == int(mask0.sum())
        assert torch.equal(c.frozen_mask, frozen0) and torch.equal(c.weight[frozen0], w0[frozen0])
        changed |= not torch.equal(c.mask, mask0)
    assert changed


def test_layout_fingerprint_tells_swapped_blocks_apart():
    from sparsekern.methods.dst import layout_fingerprint

    a = torch.zeros(4, 4, dtype=torch.bool)
    b = a.clone()
    a[0, 0] = a[1, 1] = True  # position-weighted sums of these two are equal
    b[0, 1] = b[1, 0] = True
    la = SparseLinear(4, 4, block_size=16, mask=a)
    lb = SparseLinear(4, 4, block_size=16, mask=b)
    assert not torch.equal(layout_fingerprint(la), layout_fingerprint(lb))
    assert torch.equal(layout_fingerprint(la), layout_fingerprint(SparseLinear(4, 4, block_size=16, mask=a)))


def test_rigl_skips_a_non_finite_dense_gradient():
    model, opt = make_model()
    DSTScheduler(model, opt, method="rigl", delta_t=1, end_step=10)
    masks = [m.mask for m in sparse_layers(model)]
    x = torch.randn(8, K)
    x[0, 0] = float("inf")
    opt.zero_grad()
    model(x).sum().backward()
    for p in model.parameters():  # what a GradScaler would skip; here the step runs on zeroed gradients
        p.grad = torch.zeros_like(p)
    with pytest.warns(UserWarning, match="inf or NaN"):
        opt.step()
    assert all(torch.equal(m.mask, m0) for m, m0 in zip(sparse_layers(model), masks, strict=True))
