"""Process-group helpers for ``torchrun``: the one place that joins, queries and leaves a group.

Why one module: distributed extraction (:mod:`irkit.shard`) and DDP training
(:mod:`irkit.train.distributed`) need the same setup (backend from the device, CUDA device from
``LOCAL_RANK``, CPU threads split between the ranks of a machine, a clean teardown). It depends
only on torch, os and :mod:`irkit.errors`, so any layer may import it. Every helper degrades to the
single-process case when no process group exists, so callers need no special case.
"""
from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from irkit.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TIMEOUT", "torchrun_env", "is_dist", "rank", "world_size", "local_rank", "is_main",
           "rank_device", "init_from_env", "barrier", "cleanup"]

#: how long a collective (a barrier included) waits for the slowest rank before failing
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)
BACKENDS = ("nccl", "gloo", "mpi")


def torchrun_env() -> tuple[int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` as torchrun sets them; ``(0, 1, 0)`` outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def is_dist() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    """Number of processes in the default group (1 without a process group)."""
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    """``LOCAL_RANK`` from the torchrun environment (0 when absent): the GPU this rank uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (the process that logs, merges and writes checkpoints)."""
    return rank() == 0


def rank_device(device: str | torch.device | None = "auto") -> str:
    """The device this rank runs on: ``auto``/None -> CUDA when present, else CPU; a CUDA device
    becomes ``cuda:<LOCAL_RANK>`` (one GPU per local rank)."""
    name = "auto" if device is None else str(device)
    if name in ("", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{local_rank()}" if name.startswith("cuda") else name


def init_from_env(backend: str | None = None, timeout: datetime.timedelta | float = DEFAULT_TIMEOUT,
                  device: str | torch.device | None = None) -> tuple[int, int, int]:
    """Join the default process group that torchrun describes (``env://``); returns
    ``(rank, world_size, local_rank)``.

    Backend: ``backend`` if given, else ``nccl`` for a CUDA ``device`` (or, without ``device``,
    whenever CUDA is available) and ``gloo`` otherwise; with ``nccl`` the current CUDA device
    becomes ``cuda:LOCAL_RANK``. CPU ranks of one machine split its cores when
    ``OMP_NUM_THREADS`` is unset. Without ``WORLD_SIZE`` > 1 nothing is initialised and
    ``(0, 1, 0)`` is returned; an already initialised group is reused. ``timeout``: seconds or a
    timedelta."""
    if is_dist():
        return rank(), world_size(), local_rank()
    _, world, local = torchrun_env()
    if world <= 1:
        return 0, 1, 0
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise ConfigError(f"WORLD_SIZE is set but {key} is not: launch with torchrun (e.g. "
                              "`torchrun --nproc-per-node N -m irkit.extract ...`) or unset WORLD_SIZE")
    if backend is None:
        cuda = rank_device(device).startswith("cuda") if device is not None else torch.cuda.is_available()
        backend = "nccl" if cuda else "gloo"
    if backend not in BACKENDS:
        raise ConfigError(f"unknown distributed backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "nccl":
        torch.cuda.set_device(local)
    elif not os.environ.get("OMP_NUM_THREADS"):
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    log.info("rank %d of %d joined the %s process group", rank(), world_size(), backend)
    return rank(), world_size(), local


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_dist():
        dist.barrier()


def cleanup(barrier: bool = False) -> None:
    """Destroy the default process group if one exists. ``barrier`` (on a clean exit): wait for every
    rank first — a rank that tears gloo down while a peer's last collective is in flight aborts
    that peer (SIGABRT, "terminate called without an active exception"; seen in 3 of 12 runs)."""
    if is_dist():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
