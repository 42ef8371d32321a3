"""The benchmark CLI and the plot script run end to end and write well-formed files.

Speed is never judged here: the quick configuration only checks the plumbing.
"""

import csv
import json
import os
import subprocess
import sys
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
    env = {k: v for k, v in os.environ.items() if k not in ("SPARSEKERN_INTERPRET", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(args, timeout=600):
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = _run(["-m", "bench", "--quick", "--device", "cpu", "--out", str(out)])
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


def test_plot_writes_png(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    out, _ = quick_run
    csv_path = _one(out, "linear_cpu_*.csv")
    proc = _run([str(REPO / "bench" / "plot.py"), str(csv_path), str(tmp_path)])
    png = tmp_path / (csv_path.stem + ".png")
    assert png.exists(), f"no {png.name}; plot printed {proc.stdout!r}"
    assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def layout_quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_layout")
    proc = _run(["-m", "bench", "--suite", "layout", "--quick", "--device", "cpu", "--out", str(out)])
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
