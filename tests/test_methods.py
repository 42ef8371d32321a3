"""Mask producers (``sparsekern.methods.masks``): densities, distributions, scores, freezing, determinism.

Nothing here converts a model, so these tests never run the kernels.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.methods import check_fraction, erk_densities, masks
from sparsekern.methods.blocks import block_grid, expand_blocks, pool_blocks
from sparsekern.methods.scores import grasp_scores, snip_scores
from sparsekern.methods.select import select
from sparsekern.methods.targets import find_targets

METHODS = ("random", "magnitude", "snip", "grasp", "synflow", "force")
BS = 16


def mlp(bias=True):
    return nn.Sequential(
        nn.Linear(40, 48, bias=bias),
        nn.ReLU(),
        nn.Linear(48, 64, bias=bias),
        nn.ReLU(),
        nn.Linear(64, 32, bias=bias),
    )


def batches(n=2, k=40, classes=32):
    return [(torch.randn(6, k), torch.randint(0, classes, (6,))) for _ in range(n)]


def run(model, method, density=0.3, trainable=1.0, data=None, **kw):
    kw.setdefault("block_size", BS)
    kw.setdefault("iterations", 3)
    kw.setdefault("seed", 0)
    return masks(model, method, density, trainable, data=data if data is not None else batches(), **kw)


def n_blocks_kept(mask):
    return int((pool_blocks(mask.float(), BS, "max") > 0).sum())


def is_block_structured(mask):
    kept = pool_blocks(mask.float(), BS, "max") > 0
    return torch.equal(expand_blocks(kept, tuple(mask.shape), BS), mask)


# ----------------------------------------------------------- invariants of every method
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("granularity", ["block", "element"])
@pytest.mark.parametrize("freeze", ["random", "freezenet"])
def test_density_reached_and_frozen_inside_mask(method, granularity, freeze):
    model = mlp()
    density, trainable = 0.3, 0.5
    out = run(model, method, density, trainable, granularity=granularity, freeze=freeze)
    assert set(out) == {"0", "2", "4"}
    for name, (mask, frozen) in out.items():
        w = model.get_submodule(name).weight
        assert mask.dtype == torch.bool and mask.shape == w.shape and frozen.shape == w.shape
        assert not (frozen & ~mask).any(), "frozen elements must be kept"
        if granularity == "element":
            assert int(mask.sum()) == round(density * w.numel())
            assert int((mask & ~frozen).sum()) == round(trainable * int(mask.sum()))
        else:
            rb, cb = block_grid(tuple(w.shape), BS)
            assert n_blocks_kept(mask) == round(density * rb * cb)
            assert is_block_structured(mask)
            # Freezing is block-aware: the trainable part is whole blocks too.
            assert is_block_structured(mask & ~frozen)
            assert n_blocks_kept(mask & ~frozen) == round(trainable * n_blocks_kept(mask))


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_under_seed(method):
    model = mlp()
    data = batches()
    a = run(model, method, 0.4, 0.5, data=data, seed=3, granularity="element")
    b = run(model, method, 0.4, 0.5, data=data, seed=3, granularity="element")
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1])
    c = run(model, method, 0.4, 0.5, data=data, seed=4, granularity="element")
    # The seed drives random scores and random freezing; the freezing differs for every method.
    assert any(not torch.equal(a[n][1], c[n][1]) for n in a)


def test_method_config_is_the_public_calls_arguments():
    """masks() and sparsify() take MethodConfig's fields by name, with its defaults, and plan() gives the same masks."""
    import dataclasses
    import inspect

    from sparsekern.methods import MethodConfig, plan, sparsify

    fields = {f.name: f.default for f in dataclasses.fields(MethodConfig)}
    for fn in (masks, sparsify):
        params = dict(inspect.signature(fn).parameters)
        params.pop("model")
        assert {n: p.default for n, p in params.items()} == fields, fn.__name__
    for name in fields:  # every field is documented
        assert f"        {name}" in MethodConfig.__doc__ or f", {name}:" in MethodConfig.__doc__, name
    model, data = mlp(), batches()
    a = run(model, "snip", 0.4, 0.5, data=data, seed=3)
    cfg = MethodConfig("snip", 0.4, 0.5, block_size=BS, data=data, iterations=3, seed=3)
    b = plan(model, cfg).masks
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1])
    assert cfg.checked().block_size == (BS, BS) and cfg.block_size == BS  # a value: checked() returns a copy
    with pytest.raises(ValueError, match="unknown method"):
        MethodConfig(method="nope").checked()


@pytest.mark.parametrize("method", METHODS)
def test_scoring_does_not_mutate_the_model(method):
    model = nn.Sequential(nn.Linear(40, 48), nn.BatchNorm1d(48), nn.Dropout(0.5), nn.Linear(48, 32))
    model.train()
    model[1].train(False)  # a mixed mode must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    data = batches()
    rng = torch.get_rng_state()
    run(model, method, 0.5, 0.5, data=data, freeze="freezenet")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{method} changed {k}"
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng), "a seeded run must not move the global RNG"


def test_data_methods_need_data_and_synflow_needs_a_shape():
    model = mlp()
    for method in ("snip", "grasp", "force"):
        with pytest.raises(ValueError, match="needs data"):
            masks(model, method, 0.5, block_size=BS)
    with pytest.raises(ValueError, match="example_input"):
        masks(model, "synflow", 0.5, block_size=BS)
    with pytest.raises(ValueError, match="needs data"):
        masks(model, "magnitude", 0.5, 0.5, block_size=BS, freeze="freezenet")
    out = masks(model, "synflow", 0.5, block_size=BS, example_input=torch.zeros(1, 40), iterations=2)
    assert set(out) == {"0", "2", "4"}


# ----------------------------------------------------------- scores are what the papers define
def test_snip_keeps_the_largest_connection_sensitivity():
    model = mlp()
    data = batches(1)
    x, y = data[0]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, [model[0].weight, model[2].weight, model[4].weight])
    out = run(model, "snip", 0.25, data=data, granularity="element")
    for name, g in zip(("0", "2", "4"), grads, strict=True):
        sal = (g * model.get_submodule(name).weight).abs().flatten()
        k = round(0.25 * sal.numel())
        kept = out[name][0].flatten()
        assert sal[kept].min() >= sal[~kept].max()
        assert int(kept.sum()) == k


def test_force_with_one_iteration_is_snip():
    model, data = mlp(), batches()
    a = run(model, "snip", 0.3, data=data, granularity="element")
    b = run(model, "force", 0.3, data=data, granularity="element", iterations=1)
    for n in a:
        assert torch.equal(a[n][0], b[n][0])


def test_force_iterations_change_the_result():
    model, data = mlp(), batches()
    a = run(model, "force", 0.05, data=data, granularity="element", iterations=1)
    b = run(model, "force", 0.05, data=data, granularity="element", iterations=4)
    assert any(not torch.equal(a[n][0], b[n][0]) for n in a)


def test_grasp_score_is_weight_times_hessian_gradient_product():
    model = mlp()
    data = batches(1)
    x, y = data[0]
    targets = [t for t in find_targets(model, BS) if t.skip is None]
    got = grasp_scores(model, targets, data, F.cross_entropy, temperature=5.0)
    ws = [model[0].weight, model[2].weight, model[4].weight]

    def loss_of(*w):
        h = F.relu(F.linear(x, w[0], model[0].bias))
        h = F.relu(F.linear(h, w[1], model[2].bias))
        return F.cross_entropy(F.linear(h, w[2], model[4].bias) / 5.0, y)

    g = torch.autograd.grad(loss_of(*ws), ws)
    _, hg = torch.autograd.functional.hvp(loss_of, tuple(w.detach() for w in ws), tuple(g))
    for name, w, h in zip(("0", "2", "4"), ws, hg, strict=True):
        torch.testing.assert_close(got[name], (w.detach() * h).float(), rtol=1e-4, atol=1e-9)


def test_grasp_blocks_pool_signed_scores_by_sum():
    scores = {"a": torch.zeros(32, 32)}
    scores["a"][:16, :16] = -5.0  # large magnitude, but GraSP wants these gone
    scores["a"][16:, 16:] = 1.0
    keep = select(scores, 0.25, granularity="block", block_size=BS, signed=True)["a"]
    assert keep[16:, 16:].all() and not keep[:16, :16].any()
    keep_l1 = select(scores, 0.25, granularity="block", block_size=BS)["a"]
    assert keep_l1[:16, :16].all()


def test_synflow_on_one_bias_free_layer_is_magnitude():
    # R = sum(|W| @ 1) has dR/dW = 1, so the score is |W| itself, every round.
    model = nn.Sequential(nn.Linear(48, 64, bias=False))
    a = masks(model, "synflow", 0.2, block_size=BS, example_input=torch.zeros(2, 48), iterations=4)
    b = masks(model, "magnitude", 0.2, block_size=BS)
    assert torch.equal(a["0"][0], b["0"][0])


def test_synflow_restores_signed_weights():
    model = mlp()
    before = model[0].weight.detach().clone()
    assert (before < 0).any()
    masks(model, "synflow", 0.2, block_size=BS, example_input=torch.zeros(2, 40), iterations=2)
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize("reduce", ["l1", "l2", "max"])
def test_block_reductions(reduce):
    s = torch.zeros(32, 16)
    s[0, 0] = 10.0  # block 0: one large element (l1 10, l2 10, max 10)
    s[16:, :] = 0.2  # block 1: many small ones (l1 51.2, l2 3.2, max 0.2)
    keep = select({"a": s}, 0.5, granularity="block", block_size=BS, reduce=reduce)["a"]
    assert bool(keep[16, 0]) == (reduce == "l1")
    assert bool(keep[0, 0]) == (reduce != "l1")


# ----------------------------------------------------------- freezing
def test_freezenet_keeps_the_most_salient_weights_trainable():
    model, data = mlp(), batches(1)
    out = run(model, "magnitude", 1.0, 0.2, data=data, granularity="element", freeze="freezenet")
    sal = snip_scores(model, [t for t in find_targets(model, BS) if t.skip is None], data, F.cross_entropy)
    for name, (mask, frozen) in out.items():
        assert mask.all()
        train = (~frozen).flatten()
        s = sal[name].flatten()
        assert int(train.sum()) == round(0.2 * s.numel())
        assert s[train].min() >= s[~train].max()


def test_freeze_layers_freezes_whole_layers():
    out = run(mlp(), "magnitude", 0.5, 1.0, freeze_layers=["2"])
    assert torch.equal(out["2"][0], out["2"][1])
    assert not out["0"][1].any()
    with pytest.raises(ValueError, match="freeze_layers names unknown"):
        run(mlp(), "magnitude", 0.5, freeze_layers=["nope"])


def test_trainable_zero_and_one():
    out = run(mlp(), "random", 0.5, 0.0)
    assert all(torch.equal(m, f) for m, f in out.values())
    out = run(mlp(), "random", 0.5, 1.0)
    assert all(not f.any() for _, f in out.values())


# ----------------------------------------------------------- distributions
def numel_weighted(out, model):
    kept = sum(int(m.sum()) for m, _ in out.values())
    total = sum(model.get_submodule(n).weight.numel() for n in out)
    return kept / total


@pytest.mark.parametrize("distribution", ["uniform", "erk", "global"])
def test_distributions_hit_the_global_density(distribution):
    model = mlp()
    out = run(model, "magnitude", 0.3, distribution=distribution, granularity="element")
    # Per-layer rounding moves each layer by at most half an element.
    assert abs(numel_weighted(out, model) - 0.3) <= len(out) / sum(m.numel() for m, _ in out.values())
    dens = {n: m.float().mean().item() for n, (m, _) in out.items()}
    if distribution == "uniform":
        assert all(abs(d - 0.3) < 1e-3 for d in dens.values())
    if distribution == "erk":
        assert dens["0"] > dens["2"]  # 40x48 has a larger (n_in + n_out) / (n_in * n_out) than 48x64


@pytest.mark.parametrize("distribution", ["uniform", "erk", "global"])
def test_block_distributions_hit_the_computed_block_fraction(distribution):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 128), nn.Linear(128, 64))
    out = masks(model, "magnitude", 0.25, block_size=BS, distribution=distribution, seed=0)
    kept = sum(n_blocks_kept(m) for m, _ in out.values())
    total = sum(math.prod(block_grid(tuple(m.shape), BS)) for m, _ in out.values())
    assert abs(kept / total - 0.25) <= len(out) / total


def test_erk_small_layers_are_denser_and_capped():
    d = erk_densities({"a": (100, 100), "b": (10, 100)}, 0.1)
    assert d["b"] > d["a"]
    assert math.isclose(d["a"] * 10_000 + d["b"] * 1_000, 0.1 * 11_000)
    assert math.isclose(d["a"], 0.1 * 11_000 / (0.02 * 10_000 + 0.11 * 1_000) * 0.02)
    # A tiny layer would exceed 1: it is capped and the rest is redistributed.
    d = erk_densities({"big": (256, 256), "tiny": (4, 4)}, 0.5)
    assert d["tiny"] == 1.0
    assert math.isclose(d["big"] * 256 * 256 + 16, 0.5 * (256 * 256 + 16))
    # ERK with kernel dims (conv): (out + in + kh + kw) / (out * in * kh * kw).
    d = erk_densities({"conv": (64, 32, 3, 3), "fc": (64, 64)}, 0.2)
    assert math.isclose(d["conv"] / d["fc"], (102 / (64 * 32 * 9)) / (128 / 4096))


# ----------------------------------------------------------- layer selection
def test_exclude_first_last_and_names():
    model = mlp()
    assert set(run(model, "magnitude", exclude_first=True)) == {"2", "4"}
    assert set(run(model, "magnitude", exclude_last=True)) == {"0", "2"}
    assert set(run(model, "magnitude", exclude=["2"])) == {"0", "4"}
    assert set(run(model, "magnitude", layers=["2", "4"], exclude_first=True)) == {"4"}


def test_unknown_layer_names_list_what_exists():
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['fc9'\].*\['0', '2', '4'\]"):
        run(mlp(), "magnitude", layers=["fc9"])
    with pytest.raises(ValueError, match="unknown layer"):
        run(mlp(), "magnitude", exclude=["1"])  # a ReLU is not a candidate


def test_small_layers_are_left_out():
    model = nn.Sequential(nn.Linear(40, 48), nn.Linear(48, 10), nn.Linear(10, 32))
    targets = {t.name: t.skip for t in find_targets(model, BS)}
    assert targets["0"] is None
    assert "smaller than a 16x16 block" in targets["1"] and "smaller" in targets["2"]
    assert set(masks(model, "magnitude", 0.5, block_size=BS)) == {"0"}
    assert "min_blocks" in find_targets(model, BS, min_blocks=10)[0].skip


def test_conv_weights_are_scored_in_their_matrix_view():
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4, 32))
    data = [(torch.randn(2, 16, 4, 4), torch.randint(0, 32, (2,)))]
    out = masks(model, "snip", 0.25, 0.5, block_size=BS, data=data, seed=0)
    mask, frozen = out["0"]
    assert mask.shape == (32, 16, 3, 3)
    rb, cb = block_grid((32, 16, 3, 3), BS)
    assert (rb, cb) == (2, 9)
    assert n_blocks_kept(mask) == round(0.25 * 18)
    assert is_block_structured(mask) and not (frozen & ~mask).any()


# ----------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_bad_fractions_raise_value_error(bad):
    with pytest.raises(ValueError, match="density"):
        masks(mlp(), "magnitude", bad, block_size=BS)
    with pytest.raises(ValueError, match="trainable"):
        masks(mlp(), "magnitude", 0.5, bad, block_size=BS)


@pytest.mark.parametrize("bad", ["0.5", True, None])
def test_non_numeric_fractions_raise_type_error(bad):
    with pytest.raises(TypeError, match="density"):
        check_fraction(bad, "density")


def test_check_fraction_accepts_ints_and_floats():
    assert check_fraction(0) == 0.0 and check_fraction(1) == 1.0 and check_fraction(0.25) == 0.25


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"method": "obd"}, "unknown method"),
        ({"distribution": "er"}, "distribution"),
        ({"granularity": "row"}, "granularity"),
        ({"reduce": "mean"}, "reduce"),
        ({"freeze": "all"}, "freeze"),
        ({"block_size": 24}, "block_size"),
    ],
)
def test_bad_options(kw, match):
    kw = {"method": "magnitude", "block_size": BS, **kw}
    with pytest.raises(ValueError, match=match):
        masks(mlp(), **kw)


def test_density_zero_and_one():
    out = masks(mlp(), "magnitude", 0.0, block_size=BS)
    assert all(not m.any() for m, _ in out.values())
    out = masks(mlp(), "magnitude", 1.0, block_size=BS)
    assert all(m.all() for m, _ in out.values())


def test_synflow_is_scale_invariant_beyond_float32_range():
    # R is homogeneous of degree L in the weights, so scaling every weight by c scales all
    # scores by c**L and must not change the masks; at c=100, L=16 the scores exceed float32.
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(48, 48, bias=False) for _ in range(16)])
    big = nn.Sequential(*[nn.Linear(48, 48, bias=False) for _ in range(16)])
    with torch.no_grad():
        for a, b in zip(model, big, strict=True):
            b.weight.copy_(a.weight * 100)
    kw = {"block_size": BS, "example_input": torch.zeros(1, 48), "iterations": 2, "distribution": "global"}
    a = masks(model, "synflow", 0.3, granularity="element", **kw)
    b = masks(big, "synflow", 0.3, granularity="element", **kw)
    assert all(torch.equal(a[n][0], b[n][0]) for n in a)
