"""BlockLayout: codes, element state, traversals, value stores, FLOP counts and input checks.

Expected values come from an independent derivation (per-block "all elements in
state s" over a padded copy of the element states) rather than from the
layout's own any()-based construction.
"""

import dataclasses
import time

import pytest
import torch

from sparsekern.layout import BlockLayout, normalize_block_size
from sparsekern.testing import random_block_mask


def _pair(bs):
    return (bs, bs) if isinstance(bs, int) else tuple(bs)


SHAPES = [(100, 70), (37, 259)]
BLOCK_SIZES = [16, 32, 64, 128, (16, 64), (128, 32)]
DENSITIES = [0.0, 0.1, 0.5, 1.0]
KINDS = ["block", "unstructured", "frozen"]
CASES = [
    pytest.param((shape, bs, d, kind), id=f"{shape[0]}x{shape[1]}-b{_pair(bs)[0]}x{_pair(bs)[1]}-d{d}-{kind}")
    for shape in SHAPES
    for bs in BLOCK_SIZES
    for d in DENSITIES
    for kind in KINDS
]


def make_masks(shape, bs, density, kind):
    """``(mask, frozen_mask or None)``.

    ``frozen`` yields every block kind: empty, frozen, trainable, mixed with
    pruned + trainable, mixed with pruned + frozen + trainable, and mixed with
    pruned + frozen only (a mixed block with nothing to train).
    """
    if kind == "unstructured":
        return torch.rand(shape) < density, None
    mask = random_block_mask(shape, bs, density)
    if kind == "block":
        return mask, None
    thin = random_block_mask(shape, bs, 0.5)
    frz = random_block_mask(shape, bs, 0.5)
    allf = random_block_mask(shape, bs, 0.5)
    r = torch.rand(shape)
    mask &= ~(thin & (r < 0.25))
    frozen = mask & frz & (~thin | allf | (r > 0.7))
    return mask, frozen


def element_state(mask, frozen):
    """Dense int8 element state: 0 pruned, 1 frozen, 2 trainable."""
    train = mask if frozen is None else mask & ~frozen
    return mask.to(torch.int8) + train.to(torch.int8)


def padded_blocks(state, bm, bk, fill=-1):
    """``(RB, CB, bm, bk)`` blocks of the element state, overhang = ``fill``."""
    n, k = state.shape
    rb, cb = -(-n // bm), -(-k // bk)
    padded = torch.full((rb * bm, cb * bk), fill, dtype=torch.int8)
    padded[:n, :k] = state
    return padded.view(rb, bm, cb, bk).permute(0, 2, 1, 3)


def expected_codes(state, bm, bk):
    blocks = padded_blocks(state, bm, bk).flatten(2)
    inside = blocks >= 0

    def all_in(s):
        return ((blocks == s) | ~inside).all(-1)

    code = torch.full(blocks.shape[:2], 3, dtype=torch.int8)
    code[all_in(2)] = 2
    code[all_in(1)] = 1
    code[all_in(0)] = 0
    return code


@pytest.fixture(params=CASES)
def built(request):
    shape, bs, density, kind = request.param
    mask, frozen = make_masks(shape, bs, density, kind)
    lay = BlockLayout.from_masks(mask, frozen, bs)
    return mask, frozen, lay


# ----------------------------------------------------------------- codes/state
def test_block_codes_and_element_state(built):
    mask, frozen, lay = built
    bm, bk = lay.block_size
    state = element_state(mask, frozen)
    code = expected_codes(state, bm, bk)
    assert lay.grid == tuple(code.shape)
    assert lay.block_code.dtype == torch.int8
    assert torch.equal(lay.block_code, code)
    # Only mixed blocks carry element state (a fully kept, fully trainable block has none),
    # in CSR (row-major) order, overhang marked pruned.
    mixed = (code == 3).nonzero()
    assert lay.n_mixed == mixed.shape[0]
    want = padded_blocks(state, bm, bk, fill=0)[mixed[:, 0], mixed[:, 1]]
    assert lay.element_state.shape == (lay.n_mixed, bm, bk)
    assert torch.equal(lay.element_state, want)
    counts = lay.element_counts()
    assert counts["kept"] == int(mask.sum())
    assert counts["trainable"] == int((state == 2).sum())
    assert counts["frozen"] == int((state == 1).sum())


def test_dense_masks_round_trip(built):
    mask, frozen, lay = built
    m, f = lay.dense_masks()
    assert m.dtype == torch.bool and f.dtype == torch.bool
    assert torch.equal(m, mask)
    assert torch.equal(f, torch.zeros_like(mask) if frozen is None else frozen)
    again = BlockLayout.from_masks(m, f, lay.block_size)
    assert torch.equal(again.block_code, lay.block_code)
    assert torch.equal(again.element_state, lay.element_state)


def test_from_block_code_rebuilds_every_index(built):
    _, _, lay = built
    again = BlockLayout.from_block_code(lay.block_code, lay.element_state, lay.shape, lay.block_size)
    for field in dataclasses.fields(lay):
        a, b = getattr(lay, field.name), getattr(again, field.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), field.name
        else:
            assert a == b, field.name


# ------------------------------------------------------------------ traversals
def test_csr_and_transposed_traversals_agree(built):
    _, _, lay = built
    rb, cb = lay.grid
    computed = lay.block_code > 0
    nnzb = int(computed.sum())
    assert lay.nnz_blocks == nnzb
    for name in ("row_offsets", "col_indices", "row_indices", "storage", "aux", "col_offsets", "row_indices_t",
                 "block_index_t", "storage_t", "aux_t", "col_slot", "row_slot_t", "row_order", "col_order",
                 "train_index"):  # fmt: skip
        assert getattr(lay, name).dtype == torch.int32, name

    # CSR: rows ascending, columns ascending within a row.
    nz = computed.nonzero()
    row_counts = computed.sum(1)
    assert lay.row_offsets[0] == 0
    assert torch.equal(lay.row_offsets.long().diff(), row_counts)
    assert torch.equal(lay.row_indices.long(), nz[:, 0])
    assert torch.equal(lay.col_indices.long(), nz[:, 1])
    assert torch.equal(lay.row_indices.long(), torch.repeat_interleave(torch.arange(rb), row_counts))

    # Transposed: every computed block exactly once, pointing at its own CSR position.
    col_counts = computed.sum(0)
    bit = lay.block_index_t.long()
    assert lay.col_offsets[0] == 0
    assert torch.equal(lay.col_offsets.long().diff(), col_counts)
    assert torch.equal(bit.sort().values, torch.arange(nnzb))
    assert torch.equal(lay.row_indices.long()[bit], lay.row_indices_t.long())
    assert torch.equal(lay.col_indices.long()[bit], torch.repeat_interleave(torch.arange(cb), col_counts))
    nzt = computed.T.nonzero()  # (col, row), column-major
    assert torch.equal(lay.row_indices_t.long(), nzt[:, 1])

    # Load-balance orders: permutations, longest first.
    for order, counts in ((lay.row_order, row_counts), (lay.col_order, col_counts)):
        o = order.long()
        assert torch.equal(o.sort().values, torch.arange(counts.numel()))
        assert bool((counts[o].diff() <= 0).all())


def test_traversals_brute_force_small():
    """Python loops over blocks on a tiny layout, as an independent cross-check."""
    mask, frozen = make_masks((70, 50), 16, 0.5, "frozen")
    lay = BlockLayout.from_masks(mask, frozen, 16)
    code = lay.block_code.tolist()
    csr = []
    for r in range(lay.grid[0]):
        for p in range(int(lay.row_offsets[r]), int(lay.row_offsets[r + 1])):
            csr.append((r, int(lay.col_indices[p]), p))
    assert [(r, c) for r, c, _ in csr] == [
        (r, c) for r in range(lay.grid[0]) for c in range(lay.grid[1]) if code[r][c] > 0
    ]
    tr = []
    for c in range(lay.grid[1]):
        for q in range(int(lay.col_offsets[c]), int(lay.col_offsets[c + 1])):
            tr.append((int(lay.row_indices_t[q]), c, int(lay.block_index_t[q])))
    assert sorted(tr) == sorted(csr)
    assert len(set(tr)) == len(tr) == len(csr)


# ---------------------------------------------------------- trainable/storage
def test_trainable_set_storage_and_aux(built):
    mask, frozen, lay = built
    bm, bk = lay.block_size
    state = element_state(mask, frozen)
    computed = lay.block_code > 0
    nz = computed.nonzero()
    codes = lay.block_code[computed].long()
    blocks = padded_blocks(state, bm, bk)[nz[:, 0], nz[:, 1]].flatten(1)
    has_train = (blocks == 2).any(1)
    is_mixed = codes == 3

    # Trainable set = blocks with >= 1 trainable element, in CSR order.
    assert torch.equal(lay.train_index.long(), has_train.nonzero().squeeze(1))
    assert lay.n_frozen == int((codes == 1).sum())
    assert lay.n_frozen_slots == lay.n_frozen + lay.n_mixed

    # Slots of the joined store [w_train | w_frozen]: trainable first, then frozen, then fixed slots.
    s = lay.storage.long()
    mixed_rank = torch.cumsum(is_mixed, 0) - 1
    assert torch.equal(s[lay.train_index.long()], torch.arange(lay.n_train))
    slot = s - lay.n_train
    assert bool((slot[~has_train] >= 0).all())
    assert torch.equal(slot[codes == 1], torch.arange(lay.n_frozen))
    nt_mixed = is_mixed & ~has_train
    assert torch.equal(slot[nt_mixed], lay.n_frozen + mixed_rank[nt_mixed])
    # The transposed walk carries the same slots, in column-major order.
    bit = lay.block_index_t.long()
    assert torch.equal(lay.storage_t, lay.storage[bit])
    assert torch.equal(lay.aux_t, lay.aux[bit])
    assert torch.equal(lay.aux.long(), torch.where(is_mixed & has_train, mixed_rank, -1))
    # Uniform blocks never carry element state.
    assert bool((lay.aux.long()[codes == 2] == -1).all())


def test_train_rank_and_left(built):
    _, _, lay = built
    if not hasattr(lay, "train_rank"):
        pytest.skip("layout has no train_rank/train_left")
    rows = lay.row_indices.long()[lay.train_index.long()]
    # Brute force: rank among the row's trainable blocks, and how many remain (itself included).
    rank = [sum(1 for j in range(i) if rows[j] == rows[i]) for i in range(rows.numel())]
    total = torch.bincount(rows, minlength=lay.grid[0])[rows]
    assert lay.train_rank.dtype == lay.train_left.dtype == torch.int32
    assert lay.train_rank.tolist() == rank
    assert torch.equal(lay.train_left.long(), total - torch.tensor(rank, dtype=torch.long))


# ---------------------------------------------------------------- value stores
def test_split_merge_to_dense_exact(built):
    mask, frozen, lay = built
    bm, bk = lay.block_size
    w = torch.randn(lay.shape)
    wt, wf = lay.split_values(w)
    assert wt.shape == (lay.n_train, bm, bk)
    assert wf.shape == (lay.n_frozen_slots, bm, bk)
    assert torch.equal(lay.to_dense(wt, wf), w * mask)
    assert torch.equal(lay.merge_values(wt, wf), lay.gather_blocks(w * mask))
    assert torch.equal(lay.scatter_blocks(lay.gather_blocks(w * mask)), w * mask)

    # Stores hold zero where their elements do not live (and in the overhang).
    state = element_state(mask, frozen)
    computed = lay.block_code > 0
    nz = computed.nonzero()
    blocks = padded_blocks(state, bm, bk)[nz[:, 0], nz[:, 1]]
    assert bool((wt[blocks[lay.train_index.long()] != 2] == 0).all())
    fixed = wf[lay.n_frozen :]
    assert bool((fixed[lay.element_state != 1] == 0).all())


def test_pruned_and_drifted_values_never_reach_to_dense(built):
    mask, frozen, lay = built
    w = torch.randn(lay.shape)
    w[~mask] = float("nan")  # pruned elements are dropped by split_values
    wt, wf = lay.split_values(w)
    want = torch.where(mask, w, 0.0)
    assert torch.equal(lay.to_dense(wt, wf), want)
    # Optimizer drift in non-trainable positions of trainable mixed blocks is never seen.
    aux = lay.aux.long()[lay.train_index.long()]
    has = aux >= 0
    drift = wt.clone()
    drift[has] = torch.where(lay.element_state[aux[has]] == 2, wt[has], float("nan"))
    assert int(drift.isnan().sum()) == int((lay.element_state[aux[has]] != 2).sum())
    assert torch.equal(lay.to_dense(drift, wf), want)


def test_all_block_kinds_present():
    """The 'frozen' mask recipe really produces every code and both kinds of mixed block."""
    mask, frozen = make_masks((256, 256), 16, 0.9, "frozen")
    lay = BlockLayout.from_masks(mask, frozen, 16)
    assert set(lay.block_code.unique().tolist()) == {0, 1, 2, 3}
    mixed_trainable = int((lay.aux >= 0).sum())
    assert 0 < mixed_trainable < lay.n_mixed  # some mixed blocks train, some do not


def test_worked_example_from_docstring():
    """The module docstring's 4x4 example in 2x2 blocks, every element blown up to 16x16."""
    T, F, P = 2, 1, 0
    state = torch.tensor([[T, T, P, P], [T, T, P, P], [F, F, T, F], [F, F, P, T]])
    big = state.repeat_interleave(16, 0).repeat_interleave(16, 1)
    lay = BlockLayout.from_masks(big > 0, big == 1, 32)
    assert lay.block_code.tolist() == [[2, 0], [1, 3]]
    assert lay.row_offsets.tolist() == [0, 1, 3]
    assert lay.col_indices.tolist() == [0, 0, 1]
    assert lay.storage.tolist() == [0, 2, 1]
    assert lay.aux.tolist() == [-1, -1, 0]
    assert lay.col_offsets.tolist() == [0, 2, 3]
    assert lay.row_indices_t.tolist() == [0, 1, 1]
    assert lay.block_index_t.tolist() == [0, 1, 2]
    assert lay.storage_t.tolist() == [0, 2, 1]
    assert lay.aux_t.tolist() == [-1, -1, 0]


# ----------------------------------------------------------------------- flops
def _flops(lay, t):
    return {p: (v["dense"], v["element"], v["block"]) for p, v in lay.flops(t).items()}


def test_flops_dense_layer():
    lay = BlockLayout.from_masks(torch.ones(100, 70, dtype=torch.bool), block_size=32)
    d = 2 * 3 * 100 * 70
    assert _flops(lay, 3) == {p: (d, d, d) for p in ("forward", "input_grad", "weight_grad")}
    s = lay.summary()
    assert s["element_density"] == s["block_density"] == s["trainable_block_fraction"] == 1.0
    assert s["forward_flop_fraction"] == s["weight_grad_flop_fraction"] == 1.0


def test_flops_all_pruned():
    lay = BlockLayout.from_masks(torch.zeros(100, 70, dtype=torch.bool), block_size=(16, 64))
    d = 2 * 7 * 100 * 70
    assert lay.nnz_blocks == 0 and lay.n_train == 0
    assert _flops(lay, 7) == {p: (d, 0, 0) for p in ("forward", "input_grad", "weight_grad")}
    assert lay.summary()["forward_flop_fraction"] == 0.0


def test_flops_one_edge_block():
    # Block (3, 4) of a 100x70 weight in 32x16 blocks holds rows 96..99 and cols 64..69: area 24.
    mask = torch.zeros(100, 70, dtype=torch.bool)
    mask[96:, 64:] = True
    mask[97, 65] = False  # 23 kept
    frozen = torch.zeros_like(mask)
    frozen[99, 69] = True  # 22 trainable
    lay = BlockLayout.from_masks(mask, frozen, (32, 16))
    assert lay.grid == (4, 5) and lay.nnz_blocks == 1 and lay.n_train == 1
    d = 2 * 5 * 100 * 70
    assert _flops(lay, 5) == {
        "forward": (d, 2 * 5 * 23, 2 * 5 * 24),
        "input_grad": (d, 2 * 5 * 23, 2 * 5 * 24),
        "weight_grad": (d, 2 * 5 * 22, 2 * 5 * 24),
    }
    s = lay.summary()
    assert s["block_density"] == 1 / 20
    assert s["element_density"] == 23 / 7000


def test_flops_frozen_only():
    ones = torch.ones(64, 48, dtype=torch.bool)
    lay = BlockLayout.from_masks(ones, ones, 16)
    d = 2 * 4 * 64 * 48
    assert lay.n_train == 0 and lay.n_frozen == lay.nnz_blocks == 12 and lay.n_mixed == 0
    assert _flops(lay, 4) == {"forward": (d, d, d), "input_grad": (d, d, d), "weight_grad": (d, 0, 0)}
    assert lay.summary()["trainable_block_fraction"] == 0.0


# ---------------------------------------------------------------------- errors
def test_frozen_outside_mask_raises():
    mask = torch.ones(40, 40, dtype=torch.bool)
    mask[3, 5] = False
    frozen = torch.zeros_like(mask)
    frozen[3, 5] = True
    with pytest.raises(ValueError, match="frozen"):
        BlockLayout.from_masks(mask, frozen, 16)


@pytest.mark.parametrize(
    "mask_shape, frozen_shape",
    [((40,), None), ((2, 40, 40), None), ((40, 40), (40, 41)), ((40, 40), (40,))],
    ids=["mask-1d", "mask-3d", "frozen-wrong-shape", "frozen-1d"],
)
def test_bad_mask_shapes_raise(mask_shape, frozen_shape):
    mask = torch.ones(mask_shape, dtype=torch.bool)
    frozen = None if frozen_shape is None else torch.zeros(frozen_shape, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask"):
        BlockLayout.from_masks(mask, frozen, 16)


def test_weight_of_wrong_shape_raises():
    lay = BlockLayout.from_masks(torch.ones(40, 40, dtype=torch.bool), block_size=16)
    with pytest.raises(ValueError, match="shape"):
        lay.split_values(torch.randn(40, 41))


@pytest.mark.parametrize("bs", [48, 8, 256, 0, (16, 48), (32,), (16, 16, 16)], ids=str)
def test_unsupported_block_size_raises(bs):
    with pytest.raises(ValueError, match="block_size"):
        BlockLayout.from_masks(torch.ones(40, 40, dtype=torch.bool), block_size=bs)
    with pytest.raises(ValueError, match="block_size"):
        normalize_block_size(bs)


def test_non_tensor_or_complex_mask_raises():
    with pytest.raises(TypeError):
        BlockLayout.from_masks([[True, False]], block_size=16)
    with pytest.raises(TypeError):
        BlockLayout.from_masks(torch.ones(4, 4, dtype=torch.complex64), block_size=16)


def test_from_block_code_rejects_bad_shapes():
    code = torch.full((2, 3), 2, dtype=torch.int8)
    es = torch.zeros(0, 16, 16, dtype=torch.int8)
    BlockLayout.from_block_code(code, es, (32, 48), 16)  # fine
    with pytest.raises(ValueError, match="block_code"):
        BlockLayout.from_block_code(code, es, (32, 64), 16)
    code[0, 0] = 3
    with pytest.raises(ValueError, match="element_state"):
        BlockLayout.from_block_code(code, es, (32, 48), 16)


def test_validate_catches_corrupt_offsets():
    lay = BlockLayout.from_masks(torch.rand(64, 64) < 0.5, block_size=16)
    bad = dataclasses.replace(lay, row_offsets=lay.row_offsets[:-1])
    with pytest.raises(ValueError, match="row_offsets"):
        bad.validate()


# ----------------------------------------------------------------------- scale
def test_large_random_block_mask_builds():
    n, bs, density = 16384, 32, 0.1
    mask = random_block_mask((n, n), bs, density)
    t0 = time.perf_counter()
    lay = BlockLayout.from_masks(mask, block_size=bs)
    elapsed = time.perf_counter() - t0
    print(f"from_masks {n}x{n}, block {bs}, density {density}: {elapsed:.2f} s")
    blocks = (n // bs) ** 2
    assert lay.grid == (n // bs, n // bs)
    assert lay.nnz_blocks == lay.n_train == round(density * blocks)
    assert lay.n_mixed == 0 and lay.n_frozen == 0
    assert int(lay.row_offsets[-1]) == int(lay.col_offsets[-1]) == lay.nnz_blocks
    assert lay.element_counts()["kept"] == int(mask.sum())
