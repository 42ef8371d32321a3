"""What each rank runs in ``test_distributed.py``: gloo, 2 processes, a file rendezvous (no network).

Every case writes what the test asserts on into ``<out>/<case>.<rank>.pt``; a case that
raises writes its traceback instead, so one failure does not hide the others. Kept out of
``test_*.py`` so pytest does not collect it, and importable by the spawned processes.
"""

from __future__ import annotations

import copy
import os
import traceback
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from sparsekern import SparseConv2d, SparseLinear
from sparsekern.methods.blocks import expand_blocks
from sparsekern.methods.dst import DSTScheduler, layout_fingerprint

BS = 16
D_IN, D_HID, D_OUT = 48, 64, 32


def block_mask(shape, density, gen, bs=BS):
    grid = ((shape[0] + bs - 1) // bs, (shape[1] + bs - 1) // bs)
    return expand_blocks(torch.rand(grid, generator=gen) < density, tuple(shape), bs)


def mlp(seed: int) -> nn.Module:
    """Two SparseLinear layers (one with frozen blocks) around a dense one; the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m1 = block_mask((D_HID, D_IN), 0.6, gen)
    f1 = m1 & block_mask((D_HID, D_IN), 0.3, gen)
    m2 = block_mask((D_OUT, D_HID), 0.5, gen)
    return nn.Sequential(
        SparseLinear(D_IN, D_HID, block_size=BS, mask=m1, frozen_mask=f1),
        nn.ReLU(),
        nn.Linear(D_HID, D_HID),
        nn.ReLU(),
        SparseLinear(D_HID, D_OUT, block_size=BS, mask=m2),
    )


def conv(seed: int) -> nn.Module:
    """A 3x3 SparseConv2d, 16 -> 32 channels, with one pruned 16x16 block (output rows 0-15 at tap (0, 0))."""
    torch.manual_seed(seed)
    keep = torch.ones(32, 16, 3, 3, dtype=torch.bool)
    keep[:16, :, 0, 0] = False
    return SparseConv2d.from_dense(nn.Conv2d(16, 32, 3, padding=1), mask=keep, block_size=BS)


def batch(step: int, n: int = 8, t: int = 3):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, t, D_IN, generator=gen), torch.randn(n, t, D_OUT, generator=gen)


def dense_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every sparse layer's gradient as a dense, weight-shaped tensor (zero off the trainable elements)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (SparseLinear, SparseConv2d)):
            g = mod.weight_train.grad
            g = g.full_tensor() if hasattr(g, "full_tensor") else g
            lay = mod.layout
            out[name] = mod._from_matrix(lay.to_dense(g, torch.zeros(lay.n_frozen_slots, *lay.block_size)))
    return out


def reference(model: nn.Module, x, t) -> dict[str, torch.Tensor]:
    """float64 gradients of the masked dense model on the whole batch, masked to the trainable elements."""
    grads = {}
    dense = nn.Sequential(*[m.to_dense() if hasattr(m, "to_dense") else copy.deepcopy(m) for m in model]).double()
    loss = nn.functional.mse_loss(dense(x.double()), t.double())
    loss.backward()
    for i, mod in enumerate(model):
        if isinstance(mod, (SparseLinear, SparseConv2d)):
            grads[str(i)] = dense[i].weight.grad * (mod.mask & ~mod.frozen_mask)
    return grads


def _local(x, rank, world):
    return x.chunk(world)[rank]


# ------------------------------------------------------------------ cases
def case_ddp_grads(rank, world, out):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = mlp(0)
    ref_model = mlp(0)
    x, t = batch(0)
    ddp = DDP(model)
    nn.functional.mse_loss(ddp(_local(x, rank, world)), _local(t, rank, world)).backward()
    res = {"actual": dense_grads(model), "expected": reference(ref_model, x, t)}
    # The conv layer: NCHW input, the batch split over the ranks.
    cmodel, cref = conv(1), conv(1)
    xc = torch.randn(4, 16, 5, 5, generator=torch.Generator().manual_seed(5))
    dconv = DDP(cmodel)
    dconv(_local(xc, rank, world)).square().mean().backward()
    dense = cref.to_dense().double()
    dense(xc.double()).square().mean().backward()
    res["conv_actual"] = dense_grads(nn.Sequential(cmodel))["0"]
    res["conv_expected"] = dense.weight.grad * (cref.mask & ~cref.frozen_mask)
    return res


def case_fsdp2(rank, world, out):
    from torch.distributed.fsdp import fully_shard

    model, ref_model = mlp(0), mlp(0)
    opt_ref = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in (0, 4):
            fully_shard(model[i])
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, t = batch(0)
        nn.functional.mse_loss(model(_local(x, rank, world)), _local(t, rank, world)).backward()
        res = {"actual": dense_grads(model), "expected": reference(ref_model, x, t)}
        # One count-preserving mask change on the sharded layers, then another step.
        opt.step()
        nn.functional.mse_loss(ref_model(x), t).backward()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
        gen = torch.Generator().manual_seed(9)
        for i in (0, 4):
            layer, ref = model[i], ref_model[i]
            keep = layer.mask.clone()
            # Move the trainable blocks of the layer: a permutation of the block rows keeps the count.
            perm = torch.randperm(keep.shape[0] // BS, generator=gen)
            new = keep.view(-1, BS, keep.shape[1])[perm].reshape(keep.shape)
            frozen = layer.frozen_mask.view(-1, BS, keep.shape[1])[perm].reshape(keep.shape)
            layer.set_masks(new, frozen, optimizer=opt)
            ref.set_masks(new, frozen, optimizer=opt_ref)
        x, t = batch(1)
        nn.functional.mse_loss(model(_local(x, rank, world)), _local(t, rank, world)).backward()
        res["after_actual"] = dense_grads(model)
        res["after_expected"] = reference(ref_model, x, t)
        held = opt.param_groups[0]["params"]
        res["same_param_objects"] = all(p is q for p, q in zip(model.parameters(), held, strict=True))
    res["warnings"] = [str(w.message) for w in caught if "view" in str(w.message)]
    return res


def _train_dst(method, steps, delta_t, seed=0):
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(), dist.get_world_size()
    model = mlp(seed)
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    sched = DSTScheduler(ddp, opt, method=method, delta_t=delta_t, end_step=steps, drop_fraction=0.5, seed=seed)
    masks0 = [model[i].mask.clone() for i in (0, 4)]
    changes = 0
    for step in range(steps):
        x, t = batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(_local(x, rank, world)), _local(t, rank, world)).backward()
        opt.step()
        changes += sum(u["dropped"] > 0 for u in sched.last_update if u["step"] == sched.step_count)
    return model, sched, masks0, changes


def case_ddp_dst(rank, world, out):
    res = {}
    for method in ("rigl", "set"):
        model, sched, masks0, changes = _train_dst(method, 50, 5)
        res[method] = {
            "fingerprints": torch.stack([layout_fingerprint(model[i]) for i in (0, 4)]),
            "masks": [(model[i].mask.clone(), model[i].frozen_mask.clone()) for i in (0, 4)],
            "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
            "changed": any(not torch.equal(model[i].mask, m) for i, m in zip((0, 4), masks0, strict=True)),
            "updates": changes,
            "dense_grads": sched.dense_grad_count,
        }
    return res


def case_dcp_resume(rank, world, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    def build(seed):
        model = mlp(seed)
        ddp = DDP(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        sched = DSTScheduler(ddp, opt, method="rigl", delta_t=3, end_step=100, drop_fraction=0.5)
        return model, ddp, opt, sched

    def run(ddp, opt, steps):
        for step in steps:
            x, t = batch(step)
            opt.zero_grad()
            nn.functional.mse_loss(ddp(_local(x, rank, world)), _local(t, rank, world)).backward()
            opt.step()

    model, ddp, opt, _ = build(0)
    run(ddp, opt, range(12))
    straight = [p.detach().clone() for p in model.parameters()]

    model, ddp, opt, sched = build(0)
    run(ddp, opt, range(7))  # layouts changed at steps 3 and 6
    msd, osd = get_state_dict(ddp, opt)
    path = os.path.join(out, "dcp")
    dcp.save({"model": msd, "optim": osd, "sched": sched.state_dict()}, checkpoint_id=path)
    moved = int(sum(not torch.equal(model[i].mask, mlp(0)[i].mask) for i in (0, 4)))

    # A fresh model of the same config (DCP plans the load by the current shapes, which block DST keeps),
    # its values scrambled so that everything must come from the checkpoint.
    model, ddp, opt, sched = build(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1, 1)
    msd, osd = get_state_dict(ddp, opt)
    state = {"model": msd, "optim": osd, "sched": sched.state_dict()}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(ddp, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sched.load_state_dict(state["sched"])
    run(ddp, opt, range(7, 12))
    resumed = [p.detach().clone() for p in model.parameters()]
    return {"straight": straight, "resumed": resumed, "moved": moved}


def case_fsdp2_dst_dcp(rank, world, out):
    """RigL on FSDP2-sharded layers, saved and restored mid-run through DCP: bit-exact against no restore."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    def build():
        model = mlp(0)
        for i in (0, 4):
            fully_shard(model[i])
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = DSTScheduler(model, opt, method="rigl", delta_t=3, end_step=100, drop_fraction=0.5)
        return model, opt, sched

    def run(model, opt, steps):
        for step in steps:
            x, t = batch(step)
            opt.zero_grad()
            nn.functional.mse_loss(model(_local(x, rank, world)), _local(t, rank, world)).backward()
            opt.step()

    def params(model):
        return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]

    model, opt, _ = build()
    run(model, opt, range(10))
    straight = params(model)
    fingerprints = torch.stack([layout_fingerprint(model[i]) for i in (0, 4)])

    model, opt, sched = build()
    run(model, opt, range(7))
    moved = int(sum(not torch.equal(model[i].mask, mlp(0)[i].mask) for i in (0, 4)))
    msd, osd = get_state_dict(model, opt)
    path = os.path.join(out, "dcp_fsdp2")
    dcp.save({"model": msd, "optim": osd, "sched": sched.state_dict()}, checkpoint_id=path)

    model, opt, sched = build()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1, 1)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "sched": sched.state_dict()}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sched.load_state_dict(state["sched"])
    run(model, opt, range(7, 10))
    return {
        "straight": straight,
        "resumed": params(model),
        "moved": moved,
        "fingerprints": fingerprints,
        "resumed_fingerprints": torch.stack([layout_fingerprint(model[i]) for i in (0, 4)]),
    }


def case_divergent_layouts(rank, world, out):
    """SET seeded differently per rank would grow other blocks on each: the check must refuse it."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = mlp(0)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    DSTScheduler(ddp, opt, method="set", delta_t=1, end_step=10, drop_fraction=0.5, seed=rank)
    x, t = batch(0)
    nn.functional.mse_loss(ddp(_local(x, rank, world)), _local(t, rank, world)).backward()
    try:
        opt.step()
    except RuntimeError as e:
        return {"raised": str(e)}
    return {"raised": None}


CASES = {
    "ddp_grads": case_ddp_grads,
    "fsdp2": case_fsdp2,
    "ddp_dst": case_ddp_dst,
    "dcp_resume": case_dcp_resume,
    "fsdp2_dst_dcp": case_fsdp2_dst_dcp,
    "divergent_layouts": case_divergent_layouts,
}


def worker(rank: int, world: int, init_file: str, out: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    # A bounded timeout: a collective-order bug fails the test in a minute instead of hanging CI for 30.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=90)
    )
    try:
        for name in names:
            try:
                result = {"ok": True, **CASES[name](rank, world, out)}
            except Exception:  # reported by the test, with the traceback
                result = {"ok": False, "error": traceback.format_exc()}
            torch.save(result, os.path.join(out, f"{name}.{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()
