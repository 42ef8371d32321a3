"""Packaging: a CPU-only install runs without triton, and the Triton paths say how to get it.

The no-triton tests run in subprocesses that install a ``sys.meta_path`` finder
refusing ``triton`` before anything is imported, which is how an environment
without the package behaves (``find_spec`` and ``import`` both fail). The
interpreter variables that conftest sets for this process are removed there:
a CPU-only install runs the CPU kernels.
"""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Prepended to every subprocess script: triton cannot be found or imported.
NO_TRITON = textwrap.dedent(
    """
    import sys

    class RefuseTriton:
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                # what a missing package raises, so pytest.importorskip treats it alike
                raise ModuleNotFoundError(f"No module named {name!r} (refused by the test's finder)", name=name)
            return None

    sys.meta_path.insert(0, RefuseTriton())
    """
)

# The CPU paths a user of a CPU-only install meets first.
CPU_WORKLOAD = textwrap.dedent(
    """
    import warnings

    import torch
    from torch import nn

    import sparsekern

    warnings.simplefilter("ignore")  # the mixed-block notice is not what this checks
    torch.manual_seed(0)
    lin = sparsekern.SparseLinear(64, 48, block_size=16, mask=torch.rand(3, 4).lt(0.5).repeat_interleave(16, 0)
                                  .repeat_interleave(16, 1))
    x = torch.randn(5, 64, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None and lin.weight_train.grad is not None
    conv = sparsekern.SparseConv2d(32, 32, 3, padding=1, block_size=16)
    xc = torch.randn(2, 32, 8, 8, requires_grad=True)
    conv(xc).sum().backward()
    assert xc.grad is not None
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    sparsekern.sparsify(model, method="magnitude", density=0.5, block_size=16)
    model(torch.randn(4, 64)).sum().backward()
    assert any(isinstance(m, sparsekern.SparseLinear) for m in model.modules())
    """
)


def _run(script: str, extra_env: dict | None = None, timeout=300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SPARSEKERN_INTERPRET", "TRITON_INTERPRET")}
    env.update(extra_env or {})
    # From an empty folder: ``-c`` puts the current folder on sys.path, and the checkout's own
    # ``sparsekern/`` would shadow an installed (non-editable) sparsekern, which has ``kernels`` inside.
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd
        )


def _ok(proc: subprocess.CompletedProcess) -> None:
    out, err = proc.stdout[-3000:], proc.stderr[-3000:]
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"


def test_cpu_paths_run_without_triton():
    proc = _run(
        NO_TRITON
        + CPU_WORKLOAD
        + textwrap.dedent(
            """
            from sparsekern import kernels
            assert kernels.HAS_TRITON is False
            assert "triton" not in sys.modules, sorted(m for m in sys.modules if m.startswith("triton"))
            print("cpu ok")
            """
        )
    )
    _ok(proc)
    assert "cpu ok" in proc.stdout


def test_import_does_not_load_triton():
    """Even with triton installed, ``import sparsekern`` and building layers leave it unloaded.

    (The first custom-op call loads ``torch._dynamo``, which itself imports triton when
    present; that is torch's doing, so this stops before a forward.)
    """
    script = textwrap.dedent(
        """
        import sys
        import torch
        import sparsekern
        sparsekern.SparseLinear(64, 64, block_size=16)
        sparsekern.SparseConv2d(32, 32, 3, block_size=16)
        assert "triton" not in sys.modules, "import sparsekern loaded triton"
        """
    )
    _ok(_run(script))


def test_cuda_without_triton_names_the_fix():
    """A CUDA tensor takes the Triton branch even without triton, and the import error says what to install."""
    script = NO_TRITON + textwrap.dedent(
        """
        import torch
        from sparsekern import kernels
        assert kernels.use_triton(torch.device("cuda"))
        for name in ("bsmm", "bsconv"):
            try:
                getattr(kernels, name)
            except ImportError as err:
                msg = str(err)
                assert "pip install triton" in msg and "CUDA" in msg, msg
            else:
                raise AssertionError(f"kernels.{name} loaded without triton")
        print("clear error")
        """
    )
    proc = _run(script)
    _ok(proc)
    assert "clear error" in proc.stdout


def test_interpreter_without_triton_names_the_fix():
    """``SPARSEKERN_INTERPRET=1`` asks for Triton: without it the first forward fails clearly, never silently
    running the CPU kernels instead."""
    script = NO_TRITON + textwrap.dedent(
        """
        import torch
        import sparsekern
        layer = sparsekern.SparseLinear(32, 32, block_size=16)
        try:
            layer(torch.randn(3, 32))
        except ImportError as err:
            assert "SPARSEKERN_INTERPRET=1" in str(err) and "pip install triton" in str(err), err
            print("clear error")
        """
    )
    proc = _run(script, {"SPARSEKERN_INTERPRET": "1"})
    _ok(proc)
    assert "clear error" in proc.stdout


def test_check_cli_without_triton():
    """``python -m sparsekern.check --help`` works; a check run says it needs triton instead of a traceback."""
    run_check = NO_TRITON + "import runpy\nrunpy.run_module('sparsekern.check', run_name='__main__')\n"
    helped = _run(run_check.replace("import runpy", "sys.argv = ['check', '--help']\nimport runpy"))
    _ok(helped)
    assert "--quick" in helped.stdout
    refused = _run(run_check.replace("import runpy", "sys.argv = ['check', '--quick']\nimport runpy"))
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "pip install triton" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr[-2000:]


def test_test_suite_collects_without_triton():
    """Tests that need triton skip (``importorskip``) instead of failing at collection."""
    script = NO_TRITON + textwrap.dedent(
        """
        import pytest
        sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", TESTS]))
        """
    ).replace("TESTS", repr(str(REPO / "tests")))
    proc = _run(script)
    _ok(proc)
    assert "error" not in proc.stdout.splitlines()[-1].lower(), proc.stdout[-2000:]


def test_installed_metadata_makes_triton_optional():
    """The installed distribution asks for triton only through extras (``[triton]``, ``[dev]``)."""
    try:
        requires = importlib.metadata.requires("sparsekern") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("sparsekern is imported from a source tree, not installed")
    triton = [r for r in requires if r.replace(" ", "").lower().startswith("triton")]
    assert triton, f"no triton extra in {requires}"
    assert all("extra" in r for r in triton), f"triton is required unconditionally: {triton}"
    extras = importlib.metadata.metadata("sparsekern").get_all("Provides-Extra") or []
    assert {"triton", "dev"} <= set(extras), extras


def test_import_kernels_from_the_checkout_fails_and_points_at_sparsekern_kernels():
    """``kernels/`` is ``sparsekern.kernels`` only: ``import kernels`` from the repository root refuses to load."""
    script = textwrap.dedent(
        """
        import sys
        try:
            import kernels.bsmm_cpu
        except ImportError as e:
            assert "sparsekern.kernels" in str(e), e
        else:
            raise AssertionError("import kernels loaded a second copy")
        assert not any(m == "kernels" or m.startswith("kernels.") for m in sys.modules), sorted(sys.modules)
        import sparsekern.kernels.bsmm_cpu
        print(sparsekern.kernels.__name__)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("SPARSEKERN_INTERPRET", "TRITON_INTERPRET")}
    # From the repository root: ``-c`` puts it first on sys.path, so ``kernels`` is found there.
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=REPO, timeout=300
    )
    _ok(proc)
    assert proc.stdout.strip() == "sparsekern.kernels"


def test_a_regular_install_imports_sparsekern_kernels(tmp_path):
    """``pip install .`` (not editable) puts kernels/ at sparsekern/kernels/, where the guard lets it import."""
    # Built from a copy: pip builds in the source folder (build/, *.egg-info), which stays the checkout's own.
    src, target = tmp_path / "src", tmp_path / "site"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("sparsekern", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=skip)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    build = subprocess.run(
        [*pip, "--target", str(target), str(src)], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    if build.returncode != 0:
        pytest.skip(f"pip cannot build the package offline here: {build.stderr[-500:]}")
    env = {k: v for k, v in os.environ.items() if k not in ("SPARSEKERN_INTERPRET", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(target)
    script = "import sparsekern.kernels.bsmm_cpu as m, sparsekern; print(m.__file__)"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    _ok(proc)
    assert Path(proc.stdout.strip()) == target / "sparsekern" / "kernels" / "bsmm_cpu.py"
