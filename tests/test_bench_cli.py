"""The benchmark CLI and the plot script run end to end and write well-formed files.

Speed is never judged here: the quick configuration only checks the plumbing.
"""

import ast
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REQUIRED = [
    "device",
    "torch",
    "triton",
    "git_sha",
    "dtype",
    "block",
    "density",
    "shape",
    "provider",
    "mode",
    "p20",
    "p50",
    "p80",
    "flop_fraction",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env():
    # conftest turns the Triton interpreter on for this process; the benchmark
    # must time the real CPU path, as a user running it would.
    return {k: v for k, v in os.environ.items() if k not in ("SPARSEKERN_INTERPRET", "TRITON_INTERPRET")}


def _run(args, timeout=600, cwd=None, exe=sys.executable):
    # By default from an empty folder: ``python -m`` puts the current folder on sys.path, and from the
    # checkout its ``sparsekern/`` would shadow an installed (non-editable) sparsekern.
    with tempfile.TemporaryDirectory() as empty:
        proc = subprocess.run(
            [exe, *args], cwd=cwd or empty, env=_env(), capture_output=True, text=True, timeout=timeout
        )
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    # Run from a folder outside the checkout: the installed module must not depend on the current folder.
    out, cwd = tmp_path_factory.mktemp("bench"), tmp_path_factory.mktemp("elsewhere")
    proc = _run(["-m", "sparsekern.bench", "--quick", "--device", "cpu", "--out", str(out)], cwd=cwd)
    return out, proc


def _one(out: Path, pattern: str) -> Path:
    found = sorted(out.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {out}, found {[p.name for p in out.iterdir()]}"
    return found[0]


def test_quick_run_writes_csv_json_markdown(quick_run):
    out, proc = quick_run
    csv_path, json_path, md_path = (_one(out, f"linear_cpu_*.{ext}") for ext in ("csv", "json", "md"))

    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in reader.fieldnames]
        assert not missing, f"CSV lacks columns {missing}; has {reader.fieldnames}"
        rows = list(reader)
    providers = {r["provider"] for r in rows}
    for prov in ("dense", "masked", "sparsekern", "torch_bsr"):
        assert prov in providers, f"no rows for provider {prov}; providers: {sorted(providers)}"
    for prov in ("dense", "masked", "sparsekern"):
        modes = {r["mode"] for r in rows if r["provider"] == prov}
        assert {"forward", "backward", "step"} <= modes, f"{prov} has modes {sorted(modes)}"
    assert {r["mode"] for r in rows if r["provider"] == "torch_bsr"} == {"forward"}
    for r in rows:
        assert r["device"] and r["torch"] and r["git_sha"] and r["shape"] == "64x256x256", r
        if not r["note"].startswith("unavailable"):
            p20, p50, p80 = float(r["p20"]), float(r["p50"]), float(r["p80"])
            assert 0 < p20 <= p50 <= p80, r
        assert 0 < float(r["flop_fraction"]) <= 1, r

    doc = json.loads(json_path.read_text())
    assert len(doc["rows"]) == len(rows)
    assert doc["environment"]["device_type"] == "cpu"
    assert doc["environment"]["interpret"] is False

    md = md_path.read_text()
    assert "| provider" in md and "sparsekern" in md
    assert "| provider" in proc.stdout, "the table is printed to stdout"
    assert "GPU numbers are absent" in proc.stdout or "cuda" in doc["environment"]["device"].lower()


def _assert_plots(csv_path: Path, out_dir: Path) -> None:
    """``python -m sparsekern.bench.plot`` turns the CSV into a PNG in ``out_dir``."""
    pytest.importorskip("matplotlib")
    proc = _run(["-m", "sparsekern.bench.plot", str(csv_path), str(out_dir)])
    png = out_dir / (csv_path.stem + ".png")
    assert png.exists(), f"no {png.name}; plot printed {proc.stdout!r}"
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_plot_writes_png(quick_run, tmp_path):
    _assert_plots(_one(quick_run[0], "linear_cpu_*.csv"), tmp_path)


@pytest.fixture(scope="module")
def layout_quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_layout")
    proc = _run(["-m", "sparsekern.bench", "--suite", "layout", "--quick", "--device", "cpu", "--out", str(out)])
    return out, proc


def test_layout_quick_run_writes_csv_json_markdown(layout_quick_run):
    out, proc = layout_quick_run
    csv_path, json_path, md_path = (_one(out, f"layout_cpu_*.{ext}") for ext in ("csv", "json", "md"))

    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in reader.fieldnames]
        assert not missing, f"CSV lacks columns {missing}; has {reader.fieldnames}"
        rows = list(reader)
    assert {r["provider"] for r in rows} == {"sparsekern"}
    by_mode = {}
    for r in rows:
        by_mode.setdefault(r["mode"], []).append(r)
    assert set(by_mode) == {"build", "set_masks", "train_step"}, sorted(by_mode)
    for r in rows:
        assert r["device"] and r["torch"] and r["git_sha"] and r["block"] and r["density"], r
        p20, p50, p80 = float(r["p20"]), float(r["p50"]), float(r["p80"])
        assert 0 < p20 <= p50 <= p80, r

    builds = by_mode["build"]
    assert {r["shape"] for r in builds} == {"512x512"}
    assert sorted(float(r["frozen_fraction"]) for r in builds) == [0.0, 0.5], "one build without, one half frozen"
    (step,), (update,) = by_mode["train_step"], by_mode["set_masks"]
    assert step["shape"] == "16x512x512" and step["tokens"] == "16" and step["dtype"] == "float32", step
    assert 0 < float(step["flop_fraction"]) <= 1, step
    assert update["shape"] == "512x512" and (update["block"], update["density"]) == ("64", "0.1"), update
    # The note states set_masks as a share of 100 steps: it must be the ratio of the two p50s.
    pct = float(update["note"].split("%")[0])
    expected = 100 * float(update["p50"]) / (100 * float(step["p50"]))
    assert pct == pytest.approx(expected, rel=0.02, abs=0.01), update["note"]

    doc = json.loads(json_path.read_text())
    assert len(doc["rows"]) == len(rows)
    assert doc["environment"]["device_type"] == "cpu"
    assert doc["environment"]["interpret"] is False
    assert {r["mode"] for r in doc["rows"]} == set(by_mode)

    md = md_path.read_text()
    assert "| weight" in md and "set_masks / 100 train steps" in md
    assert "| weight" in proc.stdout and "set_masks / 100 train steps" in proc.stdout, "the table is printed"


# ---------------------------------------------------------------- conv suite
@pytest.fixture(scope="module")
def conv_quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_conv")
    proc = _run(
        ["-m", "sparsekern.bench", "--suite", "conv", "--quick", "--device", "cpu", "--roofline", "--out", str(out)]
    )
    return out, proc


def test_conv_quick_run_writes_csv_json_markdown(conv_quick_run):
    out, proc = conv_quick_run
    csv_path, json_path, md_path = (_one(out, f"conv_cpu_*.{ext}") for ext in ("csv", "json", "md"))
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in [*REQUIRED, "layer", "floor_ms"] if c not in reader.fieldnames]
        assert not missing, f"CSV lacks columns {missing}; has {reader.fieldnames}"
        rows = list(reader)
    assert {r["provider"] for r in rows} == {"dense", "masked", "sparsekern"}
    assert {r["mode"] for r in rows} == {"forward", "backward", "step"}
    for r in rows:
        assert r["layer"] == "3x3 32->32 @8" and r["dtype"] == "float32", r
        p20, p50, p80 = float(r["p20"]), float(r["p50"]), float(r["p80"])
        assert 0 < p20 <= p50 <= p80, r
        assert float(r["floor_ms"]) > 0 and float(r["flops"]) > 0, r
    sparse = [r for r in rows if (r["provider"], r["mode"]) == ("sparsekern", "step")]
    assert float(sparse[0]["flop_fraction"]) == pytest.approx(0.5), "quick: density 0.5 in 16x16 blocks"
    doc = json.loads(json_path.read_text())
    assert len(doc["rows"]) == len(rows)
    md = md_path.read_text()
    assert "| layer" in md and "| layer" in proc.stdout and "step vs dense" in md


# ----------------------------------------------------------------- e2e suite
@pytest.fixture(scope="module")
def e2e_quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_e2e")
    proc = _run(
        ["-m", "sparsekern.bench", "--suite", "e2e", "--quick", "--device", "cpu", "--roofline", "--out", str(out)]
    )
    return out, proc


def test_plot_writes_png_for_e2e(e2e_quick_run, tmp_path):
    """``make bench`` plots the e2e CSV too, whose dense rows carry no block (density written as 1)."""
    _assert_plots(_one(e2e_quick_run[0], "e2e_cpu_*.csv"), tmp_path)


def test_e2e_quick_run_writes_csv_json_markdown(e2e_quick_run):
    out, proc = e2e_quick_run
    csv_path, json_path, md_path = (_one(out, f"e2e_cpu_*.{ext}") for ext in ("csv", "json", "md"))
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [
            c for c in [*REQUIRED, "model", "flops", "bytes", "floor_ms", "pct_of_floor"] if c not in reader.fieldnames
        ]
        assert not missing, f"CSV lacks columns {missing}; has {reader.fieldnames}"
        rows = list(reader)
    assert {r["model"] for r in rows} == {"mlp", "cnn", "transformer"}
    for model in ("mlp", "cnn", "transformer"):
        providers = {r["provider"] for r in rows if r["model"] == model}
        assert {"dense", "masked", "sparsekern"} <= providers, (model, providers)
    assert {r["mode"] for r in rows} == {"forward", "backward", "optimizer", "step"}
    for r in rows:
        assert r["device"] and r["torch"] and r["git_sha"] and r["dtype"] == "float32", r
        if r["note"].startswith("unavailable"):
            assert r["p50"] == "" and r["floor_ms"] == "", r
            continue
        p20, p50, p80 = float(r["p20"]), float(r["p50"]), float(r["p80"])
        assert 0 < p20 <= p50 <= p80, r
        assert 0 < float(r["flop_fraction"]) <= 1, r
        # --roofline on the CPU: every measured row has a floor and its share
        floor, pct = float(r["floor_ms"]), float(r["pct_of_floor"])
        assert floor > 0 and pct == pytest.approx(100 * floor / p50, rel=1e-3), r
        assert float(r["bytes"]) > 0 and (float(r["flops"]) > 0 or r["mode"] == "optimizer"), r
    sparse_mlp = [r for r in rows if (r["model"], r["provider"], r["mode"]) == ("mlp", "sparsekern", "step")]
    assert float(sparse_mlp[0]["flop_fraction"]) == pytest.approx(0.5), "quick: density 0.5 in 32x32 blocks"

    doc = json.loads(json_path.read_text())
    assert len(doc["rows"]) == len(rows) and doc["environment"]["device_type"] == "cpu"
    md = md_path.read_text()
    for text in ("| model", "Roofline", "% of floor", "Masks:"):
        assert text in md and text in proc.stdout, text


# ------------------------------------------------------------ roofline model
def test_roofline_gemm_pass_hand_counted():
    from sparsekern.bench import roofline

    # 4 tokens, 8 x 16 weight, half the blocks, fp32: 2*4*8*16*0.5 FLOPs; 4*(4*16 + 4*8 + 0.5*8*16) bytes
    c = roofline.gemm_pass(4, 8, 16, 0.5, 4)
    assert (c.flops, c.bytes) == (512.0, 4 * (64 + 32 + 64))
    assert roofline.gemm_pass(4, 8, 16, 0.0, 4) == roofline.Cost()
    # 1 GFLOP/s and 1 GB/s: 512 FLOPs + 640 B = 0.000512 + 0.00064 ms
    peaks = {"matmul_flops_per_s": 1e9, "copy_bytes_per_s": 1e9}
    assert c.floor_ms(peaks) == pytest.approx(1.152e-3)


def test_roofline_docstring_example():
    from sparsekern.bench import roofline

    c = roofline.gemm_pass(2048, 4096, 4096, 0.25, 2)
    assert c.flops == pytest.approx(17.18e9, rel=1e-3)
    assert c.bytes == pytest.approx(41.94e6, rel=1e-3)
    assert c.floor_ms({"matmul_flops_per_s": 500e12, "copy_bytes_per_s": 2e12}) == pytest.approx(0.0554, rel=1e-2)


def test_roofline_step_modes_and_adamw():
    from sparsekern.bench import roofline

    fr = {"forward": 1.0, "input_grad": 1.0, "weight_grad": 0.5}
    passes = roofline.linear_step(2, 3, 5, fr, 2, input_grad=False)
    assert passes["input_grad"] == roofline.Cost()
    assert passes["forward"] == roofline.Cost(60.0, 2 * (10 + 6 + 15))
    assert passes["weight_grad"] == roofline.Cost(30.0, 2 * (10 + 6 + 7.5))
    opt = roofline.adamw(100, 4)
    assert opt == roofline.Cost(0.0, 7 * 100 * 4)
    modes = roofline.mode_costs(passes, opt)
    assert modes["backward"] == passes["weight_grad"]
    assert modes["step"] == roofline.Cost(90.0, 62 + 47 + 2800)
    assert modes["optimizer"] == opt


def test_roofline_annotate_and_table():
    import math

    from sparsekern.bench import roofline

    peaks = {"matmul_flops_per_s": 1e12, "copy_bytes_per_s": 1e12}
    rows = [
        {"block": 64, "density": 0.5, "provider": "sparsekern", "mode": "step", "p50": 2.0, "flops": 1e9, "bytes": 1e9},
        {
            "block": 64,
            "density": 0.5,
            "provider": "torch_bsr",
            "mode": "forward",
            "p50": math.nan,
            "flops": 1e9,
            "bytes": 0.0,
        },  # fmt: skip
        {"block": 64, "density": 0.5, "provider": "x", "mode": "step", "p50": 1.0, "flops": None, "bytes": None},
    ]
    roofline.annotate(rows, peaks)
    assert rows[0]["floor_ms"] == pytest.approx(2.0) and rows[0]["pct_of_floor"] == pytest.approx(100.0)
    assert rows[1]["floor_ms"] == pytest.approx(1.0) and math.isnan(rows[1]["pct_of_floor"])
    assert "floor_ms" not in rows[2]
    table = roofline.table(rows)
    assert "| block" in table and "100%" in table and "step floor ms" in table


def test_static_section_from_rows(tmp_path):
    """The static report's writer, fed rows in sparsekern.check's format (no compiling in this test)."""
    from sparsekern.bench.static import write_static

    row = {
        "kernel": "_bsmm_fwd_kernel", "kind": "fwd", "has_mixed": False, "arch": "sm_90", "dtype": "fp16",
        "block": "64x64", "config": "default", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4,
        "num_stages": 3, "kwargs": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, "notes": [], "problems": [],
        "regs": 128, "stack_bytes": 0, "spill_stores": 0, "spill_loads": 0, "shared": 49152,
        "tc_instr": {"HGMMA": 8}, "occupancy": 0.25, "blocks_per_sm": 4, "occupancy_limiter": "regs", "status": "ok",
    }  # fmt: skip
    section, paths, bad = write_static(tmp_path, "static_test", "quick", rows=[row, dict(row, arch="sm_80", regs=96)])
    assert bad == 0 and "2 kernels, 0 with problems" in section and "static_test.md" in section
    assert "| _bsmm_fwd_kernel" in section and "0.25–0.25" in section
    md = paths["static_md"].read_text()
    assert "| kernel" in md and "HGMMA 8" in md and "0.25 (4 blk, regs)" in md
    assert len(json.loads(paths["static_json"].read_text())) == 2


def test_suite_registry_lists_available_suites():
    from sparsekern.bench.cli import SUITES, available_suites, parse_suites

    have = available_suites()
    assert {"linear", "layout", "e2e"} <= set(have) and set(have) <= set(SUITES)
    assert parse_suites("linear,e2e") == ["linear", "e2e"]
    assert parse_suites("all") == have
    with pytest.raises(SystemExit):
        parse_suites("nope")


def test_registered_suite_missing_from_the_checkout(monkeypatch):
    """A suite registered before its module lands: ``all`` skips it, naming it is a clear error."""
    from sparsekern.bench import cli

    monkeypatch.setattr(cli, "SUITES", {**cli.SUITES, "ghost": "sparsekern.bench.ghost_suite_not_written_yet"})
    assert "ghost" not in cli.available_suites()
    assert "ghost" not in cli.parse_suites("all")
    with pytest.raises(SystemExit, match="not available in this checkout"):
        cli.parse_suites("linear,ghost")


def test_e2e_gemm_costs_hand_counted():
    import torch
    from torch import nn

    from sparsekern.bench import e2e

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    costs = e2e.gemm_costs(model, e2e.gemm_layers(model, torch.randn(3, 4)), 4)
    # layer 0: 2*3*8*4 = 192 FLOPs, x 12 + y 24 + W 32 elements, no input gradient (first layer)
    # layer 1: 2*3*2*8 = 96 FLOPs, x 24 + y 6 + W 16 elements
    assert (costs["forward"].flops, costs["forward"].bytes) == (288, 4 * (68 + 46))
    assert (costs["backward"].flops, costs["backward"].bytes) == (192 + 2 * 96, 4 * (68 + 2 * 46))
    assert (costs["optimizer"].flops, costs["optimizer"].bytes) == (0, 7 * 4 * (32 + 8 + 16 + 2))
    assert costs["step"].flops == 672 and costs["step"].bytes == 456 + 640 + 1624

    # Half the 32x32 blocks of a 64x64 layer kept: half the FLOPs and weight bytes in every pass.
    dense = nn.Sequential(nn.Linear(64, 64))
    x = torch.randn(2, 64)
    layers = e2e.gemm_layers(dense, x)
    sparse, note = e2e.sparse_model(dense, 0.5, 32)
    got = e2e.gemm_costs(sparse, layers, 4)
    assert note == "" and got["forward"].flops == 2 * 2 * 64 * 64 * 0.5
    assert got["forward"].bytes == 4 * (128 + 128 + 0.5 * 64 * 64)


def test_multi_suite_run_isolates_a_failing_suite(tmp_path, monkeypatch):
    """Two registered suites in one run: the broken one is reported, the other's files and the summary exist."""
    import math
    import types
    from dataclasses import dataclass

    import torch

    from sparsekern.bench import cli

    @dataclass
    class Cfg:
        dtype: torch.dtype = torch.float32
        warmup: int = 0
        repeats: int = 1
        shape: str = "1x1x1"

    def make(name, fail):
        mod = types.ModuleType(name)
        mod.default_config = lambda device, dtype=None, quick=False: Cfg()

        def run(cfg, device, env):
            if fail:
                raise RuntimeError("broken suite")
            row = {"provider": "dense", "mode": "step", "block": "", "density": 1.0, "shape": cfg.shape}
            return [dict(row, p20=1.0, p50=1.0, p80=1.0, flops=1e6, bytes=1e6, flop_fraction=1.0)]

        mod.run = run
        mod.tables = lambda rows: "| provider |\n|---|\n| dense |"
        mod.headline = lambda rows: "Headline: fine."
        monkeypatch.setitem(sys.modules, name, mod)
        return name

    monkeypatch.setattr(cli, "SUITES", {"good": make("fake_good_suite", False), "bad": make("fake_bad_suite", True)})
    rc = cli.main(
        ["--suite", "good,bad", "--device", "cpu", "--quick", "--roofline", "--run-folder", "--out", str(tmp_path)]
    )
    assert rc == 1, "a failed suite makes the run's exit status 1"
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("cpu-")
    names = sorted(p.name for p in run_dir.iterdir())
    assert [n.split("_")[0] for n in names] == ["good", "good", "good", "run"], names
    summary = next(run_dir.glob("run_*.md")).read_text()
    assert "good" in summary and "Headline: fine." in summary and "bad: FAILED" in summary
    assert "roofline peaks measured" in summary
    row = json.loads(next(run_dir.glob("good_*.json")).read_text())["rows"][0]
    assert row["floor_ms"] > 0 and not math.isnan(row["pct_of_floor"])


def test_e2e_failing_sparse_model_leaves_an_unavailable_row(monkeypatch):
    """A sparse model that cannot run (say, no kernels for a layer kind on this device) costs only its own rows."""
    import dataclasses
    import math

    import torch

    from sparsekern import SparseLinear
    from sparsekern.bench import e2e
    from sparsekern.bench.common import environment

    def broken(self, x):
        raise NotImplementedError("no kernel here")

    monkeypatch.setattr(SparseLinear, "forward", broken)
    device = torch.device("cpu")
    cfg = dataclasses.replace(e2e.default_config(device, quick=True), models=("mlp",), warmup=0, repeats=1)
    rows = e2e.run(cfg, device, environment(device))
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert not math.isnan(by[("dense", "step")]["p50"]) and not math.isnan(by[("masked", "step")]["p50"])
    bad = by[("sparsekern", "step")]
    assert math.isnan(bad["p50"]) and bad["note"].startswith("unavailable: NotImplementedError"), bad
    assert "| mlp" in e2e.tables(rows)


# ------------------------------------------------- installed command, from anywhere
def test_console_script_runs_outside_the_checkout(tmp_path):
    """``sparsekern-bench`` is installed with the package; run from a folder that is no checkout and
    given no ``--out``, it writes ``./sparsekern-results``."""
    script = Path(sys.executable).with_name("sparsekern-bench")
    assert script.exists(), f"no {script}: reinstall the package (pip install -e .) to get the console script"
    proc = _run(["--suite", "linear", "--quick", "--device", "cpu"], cwd=tmp_path, exe=str(script))
    out = tmp_path / "sparsekern-results"
    csv_path, json_path, _ = (_one(out, f"linear_cpu_*.{ext}") for ext in ("csv", "json", "md"))
    assert "| provider" in proc.stdout
    env = json.loads(json_path.read_text())["environment"]
    assert env["sparsekern"] and env["device_type"] == "cpu"
    import sparsekern

    if Path(sparsekern.__file__).resolve().parent.parent == REPO and shutil.which("git"):
        assert env["git_sha"] != "unknown", f"run from this checkout (editable install), yet no commit: {env}"


def test_repo_root_shim_runs_the_same_command(tmp_path):
    """``python -m bench`` from the repository root (the old spelling) forwards to ``sparsekern.bench``.

    Only for the checkout that is installed (editable, as ``make`` does): from the root, the
    checkout's ``sparsekern/`` comes first on sys.path, so it must be the installed one.
    """
    import sparsekern

    if Path(sparsekern.__file__).resolve().parent.parent != REPO:
        pytest.skip(f"sparsekern is installed from {sparsekern.__file__}, not from this checkout (editable)")
    cmd = ["-m", "bench", "--suite", "linear", "--quick", "--device", "cpu", "--out", str(tmp_path)]
    proc = _run(cmd, cwd=REPO)
    _one(tmp_path, "linear_cpu_*.csv")
    assert "| provider" in proc.stdout


def test_default_out_inside_and_outside_a_checkout(tmp_path):
    from sparsekern.bench.common import default_out

    assert default_out(REPO) == REPO / "bench" / "results"
    assert default_out(REPO / "tests") == REPO / "bench" / "results", "any folder inside the checkout"
    assert default_out(tmp_path) == tmp_path / "sparsekern-results"


def test_only_the_bench_subpackage_imports_bench():
    """Imports run one way: ``sparsekern.bench`` may import sparsekern, nothing else in it imports the benchmark."""
    bench_pkg = REPO / "sparsekern" / "bench"
    offenders = []
    for path in [*(REPO / "sparsekern").rglob("*.py"), *(REPO / "kernels").rglob("*.py")]:
        if bench_pkg in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            hits = [n for n in names if n == "bench" or n.startswith(("bench.", "sparsekern.bench"))]
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} imports {n}" for n in hits]
    assert not offenders, offenders
