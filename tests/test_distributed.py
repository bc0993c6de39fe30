"""Training at scale: a tiny fused FocalNet under DDP (2 CPU processes, gloo) gets the same gradients
as one process on the same global batch; activation checkpointing works with the fused op."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import focalnet
import focalnet_kernels as fk
from conftest import kernel_backends, rel_err

STEPS = 3


def _tiny(use_fused=True, **kw):
    torch.manual_seed(0)
    return focalnet.create_model("focalnet_tiny_srf", embed_dim=8, depths=(1, 1, 1, 1), num_classes=5,
                                 drop_path_rate=0.0, use_fused=use_fused, **kw)


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(STEPS)]


def _train(model, batches, rank=0, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for x, y in batches:
        n = x.shape[0] // world
        x, y = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append({k.removeprefix("module."): p.grad.detach().clone() for k, p in model.named_parameters()})
        opt.step()
    return grads


def _worker(rank, world, port, out_dir, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _tiny()
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for layer in model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)
        grads = _train(wrapped, _data(), rank, world)
        if mode != "ddp":  # FSDP grads are sharded DTensors: gather the full ones
            grads = [{k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in g.items()} for g in grads]
        if rank == 0:
            torch.save({"grads": grads, "calls": dict(fk.backend_calls)}, os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ddp_matches_single_process(tmp_path, monkeypatch, mode):
    names = kernel_backends()
    assert names, "no fused backend can run on CPU here"
    monkeypatch.setenv("FOCALNET_KERNELS_BACKEND", names[0])
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), mode), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt", weights_only=False)
    assert got["calls"].get(f"{names[0]}:bwd", 0) > 0, "the fused backward did not run in the workers"
    want = _train(_tiny(), _data())
    for step, (g, w) in enumerate(zip(got["grads"], want)):
        for k in w:
            assert rel_err(g[k], w[k]) < 1e-4, (step, k)


@pytest.mark.parametrize("how", ["torch.utils.checkpoint", "use_checkpoint"])
def test_activation_checkpointing(backend, how):
    names = kernel_backends()
    backend(names[0])
    x, y = _data()[0]
    ref = _tiny(use_fused=False)
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    if how == "use_checkpoint":
        model = _tiny(use_checkpoint=True)
        out = model(x)
    else:
        model = _tiny()
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
    torch.nn.functional.cross_entropy(out, y).backward()
    refp = dict(ref.named_parameters())
    for k, p in model.named_parameters():
        assert rel_err(p.grad, refp[k].grad) < 1e-4, k
