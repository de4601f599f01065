"""2 CPU processes (gloo) vs 1 process on the concatenated batch: same parameters, same MadaCos s and m."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from irkit.train import distributed as D
from irkit.train.losses import CosFace, MadaCos, TripletLoss

WORLD = 2
STEPS = 3
N_PER_RANK = 4
IN_DIM, EMB, CLASSES = 6, 5, 3


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(IN_DIM, EMB)
        self.head = CosFace(EMB, CLASSES, scale=10.0, margin=0.2)
        nn.init.normal_(self.head.weight)
        self.triplet = TripletLoss(margin=0.5)

    def forward(self, x, xp, xn, y):
        e = F.normalize(self.body(x), dim=1)
        ep = F.normalize(self.body(xp), dim=1)
        en = F.normalize(self.body(xn), dim=1)
        # a term across the global batch through all_gather_with_grad (identity in 1 process):
        # (1/n_local)·Σ_{i local} Σ_{j global} e_i·e_j per rank; DDP's mean over ranks = 1-process value.
        g = D.all_gather_with_grad(e)
        cross = (e @ g.T).sum() / e.shape[0]
        return self.head(e, y) + self.triplet(e, ep, en) + 0.1 * cross


def _data():
    g = torch.Generator().manual_seed(1)
    n = WORLD * N_PER_RANK
    x, xp, xn = (torch.randn(STEPS, n, IN_DIM, generator=g) for _ in range(3))
    y = torch.randint(0, CLASSES, (STEPS, n), generator=g)
    # MadaCos: 20 classes, a global batch of 5 near its class weights (positive median), split 3 + 2
    w_mada = torch.randn(20, EMB, generator=g)
    y_mada = torch.randint(0, 20, (5,), generator=g)
    f_mada = w_mada[y_mada] + 0.5 * torch.randn(5, EMB, generator=g)
    return x, xp, xn, y, (w_mada, f_mada, y_mada)


def _mada_split(r):
    return slice(0, 3) if r == 0 else slice(3, 5)       # uneven split: variable-size all-gather


def _train(model, batches, opt):
    for x, xp, xn, y in batches:
        opt.zero_grad()
        model(x, xp, xn, y).backward()
        opt.step()


def _worker(r: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=WORLD)
    try:
        x, xp, xn, y, (w_mada, f_mada, y_mada) = _data()
        net = _Net()
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        sl = slice(r * N_PER_RANK, (r + 1) * N_PER_RANK)
        _train(ddp, [(x[k, sl], xp[k, sl], xn[k, sl], y[k, sl]) for k in range(STEPS)], opt)
        mada = MadaCos(EMB, 20)
        with torch.no_grad():
            mada.weight.copy_(w_mada)
        mada(f_mada[_mada_split(r)], y_mada[_mada_split(r)])
        # all_gather_with_grad on uneven sizes: L_r = (r+1)·Σ gathered², dΣL/dx_r = 2·x_r·Σ(r+1)
        xg = torch.randn(3 - r, 2, generator=torch.Generator().manual_seed(10 + r)).requires_grad_(True)
        ((r + 1) * D.all_gather_with_grad(xg).pow(2).sum()).backward()
        torch.save({"params": {k: v.detach().clone() for k, v in net.state_dict().items()},
                    "s": mada.last_s, "m": mada.last_m, "xg": xg.detach(), "xg_grad": xg.grad,
                    "world": D.world_size(), "rank": D.rank(),
                    "worker_s": time.perf_counter() - t0}, os.path.join(out_dir, f"rank{r}.pt"))
        dist.barrier()  # no rank tears gloo down while its peer's last collective is in flight (SIGABRT)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process(tmp_path: Path):
    t0 = time.perf_counter()
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    print(f"spawn+join {time.perf_counter() - t0:.1f}s, worker bodies {[round(r['worker_s'], 2) for r in res]}")
    assert [r["rank"] for r in res] == [0, 1] and all(r["world"] == WORLD for r in res)

    # single process on the concatenated batch
    assert not D.is_dist()
    x, xp, xn, y, (w_mada, f_mada, y_mada) = _data()
    net = _Net()
    init = {k: v.clone() for k, v in net.state_dict().items()}
    _train(net, [(x[k], xp[k], xn[k], y[k]) for k in range(STEPS)], torch.optim.SGD(net.parameters(), lr=0.5))
    for k, v in net.state_dict().items():
        assert not torch.allclose(v, init[k])                 # training moved every parameter
        for r in range(WORLD):
            torch.testing.assert_close(res[r]["params"][k], v, atol=1e-6, rtol=0)

    mada = MadaCos(EMB, 20)
    with torch.no_grad():
        mada.weight.copy_(w_mada)
    mada(f_mada, y_mada)
    for r in range(WORLD):
        assert res[r]["s"] == pytest.approx(mada.last_s, rel=1e-5)
        assert res[r]["m"] == pytest.approx(mada.last_m, rel=1e-5, abs=1e-6)
    assert mada.last_m > 0

    for r in range(WORLD):
        torch.testing.assert_close(res[r]["xg_grad"], 2 * 3 * res[r]["xg"])
