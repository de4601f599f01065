"""DDP training helpers (``torchrun``): all-gathers with and without gradient.

Rank queries and the process-group setup live in :mod:`irkit.distributed` (shared with
distributed extraction) and are re-exported here.

Everything degrades to the single-process case when no process group is initialised, so losses
and miners can call :func:`all_gather_nograd` / :func:`all_gather_with_grad` unconditionally.

Gathers support a different number of rows per rank (the first dimension may differ; the other
dimensions must agree): sizes are exchanged first, rows are padded to the largest size, gathered,
and the padding is dropped. The result is the concatenation of the ranks' tensors in rank order,
i.e. exactly the tensor one process would hold for the concatenated batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# the process-group setup is shared with distributed extraction; re-exported for the train code
from irkit.distributed import cleanup, init_from_env, is_dist, is_main, local_rank, rank, world_size

__all__ = [
    "is_dist",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "all_gather_nograd",
    "all_gather_with_grad",
    "all_reduce_mean",
    "init_from_env",
    "cleanup",
]


def _gather_padded(t: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """All-gather ``t`` along dim 0 allowing per-rank sizes; returns the pieces and their sizes."""
    ws = world_size()
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes_t = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes_t, n)
    sizes = [int(s.item()) for s in sizes_t]
    max_n = max(sizes)
    if t.shape[0] < max_n:
        pad = t.new_zeros((max_n - t.shape[0],) + tuple(t.shape[1:]))
        t_pad = torch.cat([t, pad], dim=0)
    else:
        t_pad = t
    t_pad = t_pad.contiguous()
    pieces = [torch.empty_like(t_pad) for _ in range(ws)]
    dist.all_gather(pieces, t_pad)
    return [p[:s] for p, s in zip(pieces, sizes)], sizes


@torch.no_grad()
def all_gather_nograd(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` of every rank along dim 0 (rank order); no gradient. Identity without DDP."""
    if not is_dist() or world_size() == 1:
        return t.detach()
    pieces, _ = _gather_padded(t.detach())
    return torch.cat(pieces, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """Forward: concatenation of every rank's tensor. Backward: the incoming gradients of all ranks
    are summed (all-reduce) and each rank keeps the slice of its own rows.

    With ``L = sum_r L_r`` (the losses of all ranks), ``dL/dx_r = sum_r' dL_r'/d(gathered)[slice r]``,
    which is what the all-reduce computes; DDP then averages parameter gradients over ranks, so the
    update equals the one of a single process minimising ``mean_r L_r``.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        pieces, sizes = _gather_padded(t)
        ctx.sizes = sizes
        ctx.rank = rank()
        return torch.cat(pieces, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Autograd-aware all-gather along dim 0: gradients flow back to this rank's rows.

    See :class:`_GatherWithGrad` for the gradient convention. Identity without a process group.
    """
    if not is_dist() or world_size() == 1:
        return t
    return _GatherWithGrad.apply(t)


@torch.no_grad()
def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a new tensor; identity without a process group)."""
    if not is_dist() or world_size() == 1:
        return t.detach().clone()
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()
