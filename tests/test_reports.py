"""``sparsekern.reports``: the one report type, on hand-made records (no model, no kernels)."""

import json

import pytest

import sparsekern
from sparsekern.reports import (
    COLUMNS,
    LEVELS,
    PASSES,
    ConversionReport,
    FlopReport,
    LayerRecord,
    LayerReport,
    Report,
    SparsifyReport,
)


def per_pass(dense, element, block):
    return {p: {"dense": dense, "element": element, "block": block} for p in PASSES}


def two_layers() -> Report:
    a = LayerRecord(
        "a",
        kind="linear",
        shape=(4, 8),  # 32 weights
        sparse=True,
        block_size=(4, 4),
        element_density=0.5,
        trainable_fraction=0.5,
        block_fraction=0.5,
        trainable_block_fraction=0.5,
        flops_per_token=per_pass(64, 32, 32),
        tokens=10,
        flops=per_pass(640, 320, 320),
        memory={"params": 8, "grads": 4},
    )
    b = LayerRecord(
        "b",
        kind="linear",
        shape=(8, 12),  # 96 weights, left dense
        sparse=False,
        reason="too small",
        element_density=1.0,
        trainable_fraction=1.0,
        block_fraction=1.0,
        trainable_block_fraction=1.0,
        flops_per_token=per_pass(192, 192, 192),
        tokens=10,
        flops=per_pass(1920, 1920, 1920),
        memory={"params": 32, "grads": 32},
    )
    return Report([a, b], columns=("layer", "density", "fwd saved", "note"))


def test_construction_indexing_iteration():
    rep = two_layers()
    assert len(rep) == 2 and "a" in rep and "c" not in rep
    assert [r.name for r in rep] == ["a", "b"] and list(rep.layers) == ["a", "b"]
    assert rep["a"].kind == "linear" and rep.sparse_layers == ["a"]
    same = Report({"a": rep["a"], "b": rep["b"]})
    assert list(same.layers) == ["a", "b"]
    empty = Report()
    assert len(empty) == 0 and empty.add(LayerRecord("x")).name == "x" and "x" in empty


def test_unknown_names_are_clear_errors():
    rep = two_layers()
    with pytest.raises(KeyError, match=r"no layer 'c' in this report; its layers: \['a', 'b'\]"):
        rep["c"]
    with pytest.raises(ValueError, match="already holds a layer named 'a'"):
        rep.add(LayerRecord("a"))
    with pytest.raises(ValueError, match="already holds a layer named 'a'"):
        Report([LayerRecord("a"), LayerRecord("a")])
    with pytest.raises(TypeError, match="holds LayerRecords, got dict"):
        rep.add({"name": "c"})
    with pytest.raises(ValueError, match=r"unknown report columns \['bogus'\]"):
        rep.table(columns=["layer", "bogus"])
    with pytest.raises(ValueError, match="unknown report columns"):
        Report(columns=("fwd saved", "nope"))


def test_flops_saved_per_pass():
    rep = two_layers()
    assert rep["a"].flops_saved == dict.fromkeys(PASSES, 0.5)
    assert rep["b"].flops_saved == dict.fromkeys(PASSES, 0.0)
    # flops over tokens first, else per token; a pass of no dense work saves 0; nothing counted: None.
    only_per_token = LayerRecord("c", flops_per_token=per_pass(10, 5, 2))
    assert only_per_token.flops_saved == dict.fromkeys(PASSES, 0.8)
    assert LayerRecord("d", flops=per_pass(0, 0, 0)).flops_saved == dict.fromkeys(PASSES, 0.0)
    assert LayerRecord("e").flops_saved is None


def test_total_sums_counts_and_weights_fractions():
    t = two_layers().total()
    assert t.name == "total" and t.kind is None and t.shape is None and t.reason is None
    assert t.tokens == 20
    assert t.flops == per_pass(2560, 2240, 2240) and t.flops_per_token == per_pass(256, 224, 224)
    assert t.flops_saved == {p: pytest.approx(1 - 2240 / 2560) for p in PASSES}
    assert t.memory == {"params": 40, "grads": 36}
    # Weighted by weights (32 and 96); the trainable fraction by kept weights (16 and 96).
    assert t.element_density == pytest.approx((0.5 * 32 + 96) / 128)
    assert t.trainable_fraction == pytest.approx((0.5 * 16 + 96) / 112)
    assert t.block_fraction == pytest.approx((0.5 * 32 + 96) / 128)
    # Kept only when shared: layer b has no block size, so a's counts as shared; granularities are absent.
    assert t.block_size == (4, 4) and t.granularity is None and t.choices is None
    assert t.mask_density is None  # no layer has one
    assert Report().total().flops is None and Report().total().element_density is None


def test_total_of_choices_and_disagreeing_fields():
    def rec(name, g, bs, saved_block):
        choices = {c: LayerRecord(name, shape=(4, 4), flops_per_token=per_pass(32, 16, b)) for c, b in saved_block}
        return LayerRecord(name, shape=(4, 4), block_size=bs, granularity=g, mask_density=0.5, choices=choices)

    rep = Report(
        [rec("a", "exact", (4, 4), [("exact", 32), ("block", 16)]), rec("b", "block", (2, 2), [("exact", 16)])]
    )
    t = rep.total()
    assert t.granularity is None and t.block_size is None  # the layers disagree
    assert t.mask_density == pytest.approx(0.5)
    assert list(t.choices) == ["exact", "block"]
    assert t.choices["exact"].flops_per_token == per_pass(64, 32, 48)
    assert t.choices["block"].flops_saved == dict.fromkeys(PASSES, 0.5)  # only layer a has it


def test_table_default_explicit_and_missing_cells():
    rep = two_layers()
    lines = rep.table().splitlines()
    assert lines[0] == "| layer | density | fwd saved | note |" and lines[1] == "|---|---|---|---|"
    assert lines[2] == "| a | 0.500 | 0.500 |  |"
    assert lines[3] == "| b | 1.000 | 0.000 | too small |"
    assert lines[4] == "| total | 0.875 | 0.125 |  |"
    # Any known columns; a record without the field gets an empty cell.
    rep.add(LayerRecord("c"))
    lines = rep.table(columns=["layer", "tokens", "params MB", "exact fwd saved"]).splitlines()
    assert lines[4] == "| c |  |  |  |"
    assert lines[2].startswith("| a | 10 | 0.00 |")


def test_table_without_columns_shows_what_some_layer_has():
    rep = Report([LayerRecord("a", shape=(2, 3), mask_density=0.25)])
    header = rep.table().splitlines()[0]
    assert header == "| layer | shape | mask density |"
    assert set(COLUMNS) >= {"layer", "fwd block", "dW element", "block dW saved", "dense params+grads+optim MB"}


def test_to_dict_is_plain_data():
    rep = two_layers()
    rep.add(LayerRecord("c", shape=(2, 2), choices={"exact": LayerRecord("c", flops_per_token=per_pass(8, 4, 4))}))
    d = rep.to_dict()
    assert list(d["layers"]) == ["a", "b", "c"]
    a = d["layers"]["a"]
    assert a["flops"]["forward"]["block"] == 320 and a["flops_saved"]["weight_grad"] == 0.5
    assert a["mask_density"] is None and a["choices"] is None  # fields that do not apply stay, as None
    assert d["layers"]["c"]["choices"]["exact"]["flops_saved"]["forward"] == 0.5
    assert d["total"]["name"] == "total" and d["total"]["tokens"] == 20
    json.dumps(d)  # serialisable as it is
    a["flops"]["forward"]["block"] = -1  # a copy: the report is untouched
    assert rep["a"].flops["forward"]["block"] == 320


def test_old_names_are_aliases_and_import_where_they_did():
    assert FlopReport is SparsifyReport is ConversionReport is Report and LayerReport is LayerRecord
    from sparsekern.adapters import ConversionReport as from_adapters
    from sparsekern.flops import LEVELS as flops_levels
    from sparsekern.flops import PASSES as flops_passes
    from sparsekern.flops import FlopReport as from_flops
    from sparsekern.methods import LayerReport as from_methods_record
    from sparsekern.methods import SparsifyReport as from_methods

    assert from_adapters is from_flops is from_methods is sparsekern.FlopReport is sparsekern.Report is Report
    assert from_methods_record is sparsekern.LayerRecord is LayerRecord
    assert flops_passes is PASSES and flops_levels is LEVELS
    assert PASSES == ("forward", "input_grad", "weight_grad") and LEVELS == ("dense", "element", "block")
