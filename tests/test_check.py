"""The offline kernel check: compiles for sm_80/sm_90 without a GPU and finds no spills.

The end-to-end test runs ``python -m sparsekern.check --quick`` in a subprocess
without ``TRITON_INTERPRET``/``SPARSEKERN_INTERPRET`` (conftest turns the
interpreter on for this process, and the check must compile, not interpret).
Its quick scope includes the dense-twin proof of the three linear kernels
(64x64 blocks, bf16), so it passes only once those kernels pipeline like a
dense GEMM. The module takes about 70 s on two cores with a cold Triton cache.
The loop-analysis parsers and the proof's gates are tested on small synthetic
SASS/TTGIR snippets below.
"""

import json
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
RECT_KERNELS = ("_bsconv_fwd_tma_kernel", "_bsconv_dx_tma_kernel", "_bsconv_dw_tma_kernel")


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
    wanted = [(k, arch) for k in KERNELS for arch in ("sm_80", "sm_90")]
    wanted += [(k, "sm_90") for k in RECT_KERNELS]  # the descriptor conv kernels are sm_90's
    for kernel, arch in wanted:
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


# ------------------------------------------------------------ dense-twin proof: loop analysis
# A two-level loop nest: the inner loop (0x120-0x1a0) holds the MMAs; the outer one (0x100-0x1b0) and the
# trailing self-branch are not the MMA loop. The wait-all at 0x110 sits outside the inner loop.
SASS = """
        /*0100*/                   MOV R1, c[0x0][0x28] ;                  /* 0x000fe20000000f00 */
        /*0110*/                   DEPBAR.LE SB0, 0x0 ;                    /* 0x000080000000791a */
        /*0120*/                   WARPGROUP.ARRIVE ;                      /* 0x000fe20000000000 */
        /*0130*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0140*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0150*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0160*/                   UTMALDG.2D [UR8], [UR4] ;
        /*0170*/               @!P0 LDGSTS.E.BYPASS.128 [R104], desc[UR28][R20.64], P3 ;
        /*0180*/                   DEPBAR.LE SB0, 0x2 ;
        /*0190*/                   NOP ;
        /*01a0*/               @P1 BRA 0x120 ;
        /*01b0*/               @P2 BRA 0x100 ;
        /*01c0*/                   EXIT ;
        /*01d0*/                   BRA 0x1d0;
"""

TTGIR = """
    %x = ttg.local_alloc : () -> !ttg.memdesc<3x128x64xbf16, #shared, #smem, mutable> loc(#loc1)
    %w = ttg.local_alloc : () -> !ttg.memdesc<2x64x64xbf16, #shared1, #smem, mutable> loc(#loc2)
    %i = ttg.local_alloc : () -> !ttg.memdesc<1x1xi32, #shared, #smem, mutable> loc(#loc3)
    %o:2 = scf.for %j = %c0 to %n step %c1 iter_args(%a0 = %z) -> (tensor<128x64xf32, #mma>) : i32 {
      %q = tt.load %qp : !tt.ptr<i32> loc(#loc4)
      %r:3 = scf.for %k = %c0 to %m step %c1 iter_args(%acc = %a0) -> (tensor<128x64xf32, #mma>) : i32 {
        %t = ttg.async_wait %a, %b {num = 2 : i32} loc(#loc5)
        %c = ttg.async_copy_global_to_local %p, %i mask %msk : tensor<1x!tt.ptr<i32>, #blocked2> -> <1xi32, #shared>
        %d = ttg.async_copy_global_to_local %pp, %x : tensor<128x64x!tt.ptr<bf16>, #blocked1> -> <128x64xbf16, #s>
        %e = ttng.warp_group_dot %xa, %wb, %acc {isAsync = true} : !ttg.memdesc<128x64xbf16> -> tensor<128x64xf32>
        %f:3 = ttng.warp_group_dot_wait %e, %xa, %wb {pendings = 1 : i32} : tensor<128x64xf32, #mma>
        scf.yield %f#0 : tensor<128x64xf32, #mma> loc(#loc6)
      } {tt.num_stages = 3 : i32} loc(#loc7)
      scf.yield %r#0 : tensor<128x64xf32, #mma> loc(#loc8)
    } loc(#loc9)
    %z2 = ttg.async_wait {num = 0 : i32} loc(#loc10)
    %y = ttg.local_alloc %v : (tensor<128x64xbf16, #blocked>) -> !ttg.memdesc<128x64xbf16, #shared, #smem> loc(#loc11)
"""


def test_sass_mma_loop_reads_the_innermost_mma_loop():
    loop = check.sass_mma_loop(SASS)
    assert loop["range"] == "0x120-0x1a0"
    assert loop["hgmma"] == {"64x128x16": 2}
    assert (loop["instr"], loop["mma"], loop["non_mma"]) == (8, 2, 6)  # the NOP is not counted
    assert (loop["utmaldg"], loop["ldgsts"]) == (1, 1)
    assert loop["cp_wait"] == [2] and loop["wgmma_wait"] == [1]  # the outer wait-all is outside the loop
    assert check.sass_mma_loop(SASS.replace("HGMMA", "FFMA")) is None  # no MMA, no MMA loop
    # A wait-all inside the loop is seen.
    assert check.sass_mma_loop(SASS.replace("SB0, 0x2", "SB0, 0x0"))["cp_wait"] == [0]


def test_ttgir_mma_loop_reads_the_innermost_dot_loop():
    loop = check.ttgir_mma_loop(TTGIR)
    assert loop["async_wait"] == [2]  # the num = 0 after the loops is not in it
    assert (loop["index_copies"], loop["tile_copies"]) == (1, 1)
    assert loop["wgmma_pendings"] == [1]
    body = TTGIR.splitlines()[loop["lines"][0] : loop["lines"][1] + 1]
    assert "tt.load %qp" not in "\n".join(body)  # the outer loop's body is not the inner loop's
    assert check.ttgir_mma_loop(TTGIR.replace("{num = 2 : i32}", "{num = 0 : i32}"))["async_wait"] == [0]
    assert check.ttgir_mma_loop(TTGIR.replace("ttng.warp_group_dot %", "ttng.other %")) is None


def test_operand_buffers_match_tiles_by_shape():
    loop = check.ttgir_mma_loop(TTGIR)
    assert check.operand_buffers(TTGIR, [(128, 64), (64, 64)], "bf16", loop) == [3, 2]
    assert check.operand_buffers(TTGIR, [(64, 128), (64, 64)], "bf16", loop) == [3, 2]  # either orientation
    assert check.operand_buffers(TTGIR, [(128, 64), (64, 64)], "f16", loop) == [0, 0]  # other dtype
    # An operand staged through a single-tile alloc inside the loop has one buffer; the epilogue's
    # single-tile alloc after the loop is not an operand buffer.
    staged = TTGIR.replace(
        "%e = ttng", "%s = ttg.local_alloc %v : (tensor<64x64xbf16>) -> !ttg.memdesc<64x64xbf16>\n%e = ttng"
    )
    staged = staged.replace("memdesc<2x64x64xbf16", "memdesc<2x64x32xbf16")
    assert check.operand_buffers(staged, [(128, 64), (64, 64)], "bf16", check.ttgir_mma_loop(staged)) == [3, 1]
    assert check.operand_buffers(TTGIR, [(128, 64), (128, 64)], "bf16", loop) == [3, 0]


def test_operand_buffers_match_descriptor_boxes_exactly():
    """A descriptor conv kernel's x box ``1x16x16x64`` pipelined 4 deep is ``4x1x16x16x64``; the
    epilogue's ``1x16x16x64`` store tile (no leading buffer count) is not an operand buffer."""
    ttgir = TTGIR.replace("memdesc<3x128x64xbf16", "memdesc<4x1x16x16x64xbf16")
    loop = check.ttgir_mma_loop(ttgir)
    assert check.operand_buffers(ttgir, [(1, 16, 16, 64), (64, 64)], "bf16", loop) == [4, 2]
    assert check.operand_buffers(ttgir, [(16, 16, 64), (64, 64)], "bf16", loop) == [0, 2]  # rank must match


def test_ptxas_wgmma_serialization_warning():
    log = (
        "ptxas warning : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized "
        "due to the presence of Extern calls in the function '_bsmm_fwd_kernel'.\n"
        "ptxas info    : Used 90 registers\n"
    )
    warnings = check.ptxas_perf_warnings(log)
    assert len(warnings) == 1 and check.wgmma_serialized(warnings)
    assert not check.wgmma_serialized(check.ptxas_perf_warnings("ptxas info    : Used 90 registers\n"))


def _proof_row(**over):
    row = {
        "status": "ok", "arch": "sm_90", "num_stages": 3, "bufs": [3, 3], "serialized": False,
        "spill_stores": 0, "spill_loads": 0, "problems": [],
        "ttgir_loop": {"async_wait": [], "index_copies": 0},
        "sass_loop": {"cp_wait": [], "hgmma": {"64x128x16": 4}, "non_mma": 70},
    }  # fmt: skip
    for key, value in over.items():
        if key in ("ttgir_loop", "sass_loop"):
            row[key] = dict(row[key], **value)
        else:
            row[key] = value
    return row


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({}, None),
        ({"bufs": [3, 1]}, "shared buffers"),
        ({"ttgir_loop": {"async_wait": [0, 2]}}, "wait-all"),
        ({"sass_loop": {"cp_wait": [0]}}, "wait-all"),
        ({"ttgir_loop": {"index_copies": 2}}, "index copies"),
        ({"sass_loop": {"hgmma": {"64x64x16": 8}}}, "HGMMA"),
        ({"serialized": True}, "serialized"),
        ({"sass_loop": {"non_mma": 87}}, "non-MMA"),
        ({"sass_loop": {"non_mma": 86}}, None),  # twin + 16 is still allowed
        ({"spill_loads": 8}, "spills"),
    ],
)
def test_proof_gates(change, problem):
    problems = check.judge_proof(_proof_row(**change), _proof_row())
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0], problems


def test_proof_gates_on_sm80_are_buffers_and_waits_only():
    row = _proof_row(arch="sm_80", serialized=True, ttgir_loop={"index_copies": 3}, sass_loop={"non_mma": 500})
    assert check.judge_proof(row, None) == []
    assert "wait-all" in check.judge_proof(_proof_row(arch="sm_80", sass_loop={"cp_wait": [0]}), None)[0]


def test_twin_proof_of_the_linear_forward_runs_end_to_end(tmp_path):
    """Kernel, mixed variant and twin of one linear kernel compile and are read; the twin pipelines."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPARSEKERN_INTERPRET")}
    out = tmp_path / "proof.json"
    cmd = [sys.executable, "-m", "sparsekern.check", "--twins", "--quick", "--only", "_bsmm_fwd"]
    cmd += ["--proof-json", str(out), "--dump", str(tmp_path / "dump")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stderr[-3000:]
    rows = {(r["proof"], r["arch"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {("kernel", "sm_90"), ("mixed", "sm_90"), ("twin", "sm_90"), ("kernel", "sm_80")}
    for key, row in rows.items():
        assert row["status"] != "ERROR", f"{key}: {row['problems']}"
        assert row["sass_loop"] and row["ttgir_loop"], f"{key}: no MMA loop found"
    twin = rows["twin", "sm_90"]
    assert twin["status"] == "info" and twin["notes"] == [], twin
    assert twin["sass_loop"]["hgmma"] and min(twin["bufs"]) >= twin["num_stages"] - 1
    assert "| _bsmm_fwd_kernel " in proc.stdout and " / " in proc.stdout  # the side-by-side table
    for label in ("fwd-64x64-bf16-sm_90", "fwd-64x64-bf16-twin-sm_90", "fwd-64x64-bf16-sm_80"):
        d = tmp_path / "dump" / label
        assert {p.name for p in d.iterdir()} == {"kernel.ttgir", "kernel.sass", "meta.json"}, label
    meta = json.loads((tmp_path / "dump" / "fwd-64x64-bf16-sm_90" / "meta.json").read_text())
    assert meta["twin"] == "fwd-64x64-bf16-twin" and meta["arch"] == "sm_90"
