"""The offline kernel check: compiles for sm_80/sm_90 without a GPU and finds no spills.

The end-to-end test runs ``python -m sparsekern.check --quick`` in a subprocess
without ``TRITON_INTERPRET``/``SPARSEKERN_INTERPRET`` (conftest turns the
interpreter on for this process, and the check must compile, not interpret).
It takes about two minutes on two cores with a cold Triton cache.
"""

import os
import subprocess
import sys

import pytest

from sparsekern import check

pytest.importorskip("triton")

KERNELS = (
    "_bsmm_fwd_kernel",
    "_bsmm_dx_kernel",
    "_bsmm_dw_kernel",
    "_bsconv_fwd_kernel",
    "_bsconv_dx_kernel",
    "_bsconv_dw_kernel",
)


def _table_rows(stdout: str) -> list[list[str]]:
    rows = []
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(("_bsmm_", "_bsconv_")):
            rows.append(cells)
    return rows


def test_quick_check_compiles_every_kernel_without_spills():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPARSEKERN_INTERPRET")}
    proc = subprocess.run(
        [sys.executable, "-m", "sparsekern.check", "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    rows = _table_rows(proc.stdout)
    seen = {(cells[0].split()[0], cells[1]) for cells in rows}
    for kernel in KERNELS:
        for arch in ("sm_80", "sm_90"):
            assert (kernel, arch) in seen, f"no row for {kernel} on {arch}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"the kernel check found problems:\n{proc.stdout}"


def test_parse_ptxas_reads_registers_and_spills():
    log = (
        "ptxas info    : Compiling entry function '_bsmm_fwd_kernel' for 'sm_80'\n"
        "ptxas info    : Function properties for _bsmm_fwd_kernel\n"
        "    600 bytes stack frame, 608 bytes spill stores, 680 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 600 bytes cumulative stack size\n"
    )
    assert check.parse_ptxas(log) == {"regs": 255, "stack_bytes": 600, "spill_stores": 608, "spill_loads": 680}


def test_tensor_core_count_matches_whole_opcodes():
    sass = (
        "/*0100*/ HMMA.16816.F32 R4, R8, R12, R4 ;\n"
        "/*0110*/ HGMMA.64x64x16.F32 R24, gdesc[UR4], R24 ;\n"
        "/*0120*/ HMMA.1688.F32.TF32 R4, R8, R12, R4 ;\n"
        "/*0130*/ IMMA.8816.S32 R4, R8, R12, R4 ;\n"
    )
    assert check.count_tensor_core_ops(sass, ("HGMMA", "HMMA")) == {"HGMMA": 1, "HMMA": 2}
    assert check.count_tensor_core_ops("FFMA R1, R2, R3, R4 ;", ("HMMA",)) == {}


@pytest.mark.parametrize(
    ("regs", "shared", "warps", "cap", "expected"),
    [
        (32, 0, 4, 80, (1.0, 16, "regs")),  # 128 threads x 32 regs: 16 blocks fill the SM
        (255, 0, 4, 80, (0.125, 2, "regs")),  # 256 regs/thread allocated: 8 warps per SM
        (64, 100_000, 4, 80, (0.0625, 1, "smem")),  # one block's shared memory fills an A100 SM
        (64, 100_000, 4, 90, (0.125, 2, "smem")),  # an H100 SM holds two
        (64, 200_000, 4, 80, (0.0, 0, "smem")),  # over sm_80's per-block limit
        (16, 0, 1, 90, (0.5, 32, "blocks")),  # tiny blocks hit the 32 blocks/SM cap
    ],
)
def test_occupancy_estimate(regs, shared, warps, cap, expected):
    assert check.occupancy(regs, shared, warps, check.ARCHS[cap]) == expected


def test_job_filter_and_conv_coverage():
    quick_conv = check.build_jobs("quick", only="bsconv")
    assert {j["kind"] for j in quick_conv} == {"conv_fwd", "conv_dx", "conv_wgrad"}
    assert {j["cap"] for j in quick_conv} == {80, 90} and all(j["config"].startswith("default") for j in quick_conv)
    conv = check.build_jobs("default", only="bsconv")
    assert {j["dtype"] for j in conv} == set(check.PRECISIONS)
    assert {(j["bm"], j["bk"]) for j in conv} == set(check.CONV_BLOCKS)
    assert not any(j["kind"].startswith("conv_") for j in check.build_jobs("quick", only="bsmm"))
    with pytest.raises(ValueError):
        check.build_jobs("quick", only="no-such-kernel")
