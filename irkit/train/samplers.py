"""Class-balanced batch sampling (P classes × m images per batch), deterministic and DDP-aware."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from irkit.errors import ConfigError
from irkit.train import distributed as D

__all__ = ["ClassBalancedBatchSampler"]


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Yield batches (lists of dataset indices) of ``classes_per_batch`` (P) distinct classes with
    ``m_per_class`` (m) images each; batch size P·m. Use as ``DataLoader(ds, batch_sampler=...)``.

    Epoch ``e`` (see :meth:`set_epoch`): a generator seeded with ``seed + e`` permutes the classes;
    consecutive groups of P classes form the batches (a class appears in at most one batch per
    epoch; the ``num_classes mod P`` left over are skipped this epoch and get their turn in other
    permutations). Within a class, m images are drawn without replacement, or with replacement
    when the class has fewer than m images.

    DDP: the epoch's batches are truncated to a multiple of the world size and rank r takes
    batches ``r, r + W, r + 2W, …`` — ranks get disjoint batches (disjoint classes, hence disjoint
    images), all ranks the same number. ``num_replicas``/``rank`` default to the process group.
    ``len(sampler)`` = ``(num_classes // P) // W``.
    """

    def __init__(self, labels: Sequence[int] | torch.Tensor, m_per_class: int, classes_per_batch: int,
                 seed: int = 0, num_replicas: int | None = None, rank: int | None = None) -> None:
        labels_t = torch.as_tensor(labels)
        if labels_t.dim() != 1 or labels_t.dtype.is_floating_point:
            raise ConfigError("labels must be a 1-D sequence of integer class ids")
        if m_per_class < 1 or classes_per_batch < 1:
            raise ConfigError(f"m_per_class and classes_per_batch must be >= 1; got {m_per_class}, {classes_per_batch}")
        self.m = int(m_per_class)
        self.p = int(classes_per_batch)
        self.seed = int(seed)
        self.epoch = 0
        self.num_replicas = D.world_size() if num_replicas is None else int(num_replicas)
        self.rank = D.rank() if rank is None else int(rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ConfigError(f"rank {self.rank} is outside [0, {self.num_replicas})")
        labels_t = labels_t.long()
        classes, inverse = torch.unique(labels_t, return_inverse=True)
        self.classes = classes
        order = torch.argsort(inverse, stable=True)
        counts = torch.bincount(inverse, minlength=len(classes))
        self._members = list(torch.split(order, counts.tolist()))
        n_batches = len(classes) // self.p
        if n_batches < self.num_replicas:
            raise ConfigError(
                f"{len(classes)} classes give {n_batches} batches of {self.p} classes, fewer than the "
                f"{self.num_replicas} ranks: lower classes_per_batch or use more classes")
        self._len = n_batches // self.num_replicas

    @property
    def batch_size(self) -> int:
        return self.p * self.m

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use epoch ``epoch`` (call it every epoch, on every rank)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.classes), generator=g)
        total = self._len * self.num_replicas
        for b in range(total):
            # Draw every batch's images (same generator sequence on every rank), keep ours.
            batch: list[int] = []
            for c in perm[b * self.p:(b + 1) * self.p].tolist():
                members = self._members[c]
                if len(members) >= self.m:
                    pick = members[torch.randperm(len(members), generator=g)[: self.m]]
                else:
                    pick = members[torch.randint(len(members), (self.m,), generator=g)]
                batch.extend(pick.tolist())
            if b % self.num_replicas == self.rank:
                yield batch
