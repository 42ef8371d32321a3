"""Sparse layers under torch.distributed: DDP, FSDP2, DST mask updates and DCP resume, on 2 gloo processes.

The processes are spawned once for the module (``dist_cases.py`` runs every case on both ranks);
each test checks one case's results. Loopback only: a file rendezvous, no network address.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsekern.testing import assert_close

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import dist_cases

    out = tmp_path_factory.mktemp("dist")
    init = str(out / "rendezvous")
    mp.spawn(dist_cases.worker, args=(WORLD, init, str(out), list(dist_cases.CASES)), nprocs=WORLD, join=True)

    def load(name):
        per_rank = []
        for rank in range(WORLD):
            res = torch.load(os.path.join(out, f"{name}.{rank}.pt"), weights_only=False)
            if not res["ok"]:
                pytest.fail(f"case {name} failed on rank {rank}:\n{res['error']}")
            per_rank.append(res)
        return per_rank

    return load


def _check_grads(actual, expected, what):
    for name, exp in expected.items():
        assert_close(actual[name], exp, torch.float32, 64, f"{what} layer {name}", scale=4.0)


def test_ddp_gradients_equal_one_process_on_the_whole_batch(results):
    for rank, res in enumerate(results("ddp_grads")):
        _check_grads(res["actual"], res["expected"], f"DDP rank {rank}")
        assert_close(res["conv_actual"], res["conv_expected"], torch.float32, 16 * 9 * 50, f"DDP conv rank {rank}")


def test_fsdp2_gradients_and_an_in_place_mask_change(results):
    for rank, res in enumerate(results("fsdp2")):
        _check_grads(res["actual"], res["expected"], f"FSDP2 rank {rank}")
        _check_grads(res["after_actual"], res["after_expected"], f"FSDP2 after set_masks, rank {rank}")
        assert res["same_param_objects"]
        assert res["warnings"] == [], "FSDP2 warned that a layer returned a view"


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_dst_under_ddp_keeps_ranks_identical(results, method):
    r0, r1 = (res[method] for res in results("ddp_dst"))
    assert r0["changed"] and r0["updates"] > 0, "50 steps with delta_t=5 changed no mask"
    for (m0, f0), (m1, f1) in zip(r0["masks"], r1["masks"], strict=True):
        assert torch.equal(m0, m1) and torch.equal(f0, f1), "ranks ended with different masks"
    assert torch.equal(r0["fingerprints"], r1["fingerprints"])
    assert torch.equal(r0["params"], r1["params"]), "ranks ended with different parameters"
    if method == "rigl":
        assert r0["dense_grads"] > 0


def test_dcp_resume_mid_dst_is_exact(results):
    for rank, res in enumerate(results("dcp_resume")):
        assert res["moved"] > 0, "the checkpoint was taken before any layout change"
        for i, (a, b) in enumerate(zip(res["straight"], res["resumed"], strict=True)):
            assert torch.equal(a, b), f"rank {rank}: parameter {i} differs after a DCP save and restore"


def test_rigl_on_fsdp2_with_a_dcp_resume_is_exact(results):
    for rank, res in enumerate(results("fsdp2_dst_dcp")):
        assert res["moved"] > 0, "the checkpoint was taken before any layout change"
        assert torch.equal(res["fingerprints"], res["resumed_fingerprints"])
        for i, (a, b) in enumerate(zip(res["straight"], res["resumed"], strict=True)):
            assert torch.equal(a, b), f"rank {rank}: parameter {i} differs after a DCP save and restore"


def test_ranks_with_different_layouts_raise(results):
    for res in results("divergent_layouts"):
        assert res["raised"] is not None and "different layouts" in res["raised"]
