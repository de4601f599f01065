"""Mining of training tuples; pure tensor operations, no model inside.

- :class:`HardNegativeMiner`: offline hard negatives by global-descriptor similarity over a pool
  (cirtorch style: the most similar non-matching images, at most one per cluster), re-mined by the
  caller every ``remine_every`` steps (``miner.due(step)``) from freshly extracted descriptors.
- :class:`ConfusionNegativeSampler`: CFCD's sampler; negatives are images of other classes that a
  stage-1 classifier predicted as the anchor's class.
- :func:`batch_hard_triplets`, :func:`semi_hard_triplets`: in-batch triplet mining.
- :func:`contrastive_pairs`: every positive pair plus each image's hardest negatives (cirtorch tuples).
- :func:`hardest_negatives`: each image's k most similar images of other labels.

One form: every miner is called as ``miner(embeddings, labels, **options) -> index tensors`` (rows
of ``embeddings``); the recipes gather the descriptors (or maps) at those indices themselves.
Descriptors are L2-normalised [N, D]; similarity is the dot product.
"""
from __future__ import annotations

import torch

from irkit.errors import ConfigError, DatasetError

__all__ = ["HardNegativeMiner", "ConfusionNegativeSampler", "batch_hard_triplets", "semi_hard_triplets",
           "contrastive_pairs", "hardest_negatives", "pairwise_distances"]


def _as_long(x, name: str, device=None) -> torch.Tensor:
    t = torch.as_tensor(x, device=device)
    if t.dtype.is_floating_point or t.dim() != 1:
        raise ConfigError(f"{name} must be a 1-D integer tensor, got dtype {t.dtype}, shape {tuple(t.shape)}")
    return t.long()


class HardNegativeMiner:
    """Build tuples ``(query, positive, n₁ … n_k)`` with the hardest negatives of a pool.

    For each query ``q`` the pool images are ranked by ``descs[q] · descs[j]`` (descending);
    images of the query's cluster (``clusters[j] == clusters[q]``, which covers the query itself
    and its positive) are skipped, and of each other cluster only its most similar image is kept
    (at most one negative per cluster, as cirtorch does). The first ``num_negatives`` survive.
    Ties in similarity are broken by the lower pool position (stable sort).

    Args:
        num_negatives: negatives per tuple (k).
        remine_every: the caller re-mines when ``due(step)`` is true (every that many steps).
        chunk: queries scored per matrix product (memory bound).
    """

    def __init__(self, num_negatives: int = 5, remine_every: int = 2000, chunk: int = 1024) -> None:
        if num_negatives < 1 or remine_every < 1 or chunk < 1:
            raise ConfigError("HardNegativeMiner needs num_negatives >= 1, remine_every >= 1 and chunk >= 1; got "
                              f"{num_negatives}, {remine_every}, {chunk}")
        self.num_negatives = int(num_negatives)
        self.remine_every = int(remine_every)
        self.chunk = int(chunk)

    def due(self, step: int) -> bool:
        """True when the caller should re-extract descriptors and call :meth:`mine` (step 0 included)."""
        return step % self.remine_every == 0

    @torch.no_grad()
    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor | None = None,
                 pool: torch.Tensor | None = None) -> torch.Tensor:
        """The miner form: LongTensor [Q, num_negatives], the hard negatives of each query (default:
        every row), drawn from ``pool`` (default: every row)."""
        q = torch.arange(embeddings.shape[0]) if queries is None else torch.as_tensor(queries)
        return self.mine(embeddings, labels, q, q, pool=pool)[:, 2:]

    @torch.no_grad()
    def mine(self, descs: torch.Tensor, clusters: torch.Tensor, queries: torch.Tensor, positives: torch.Tensor,
             pool: torch.Tensor | None = None) -> torch.Tensor:
        """Return LongTensor [Q, 2 + num_negatives]: rows ``(query, positive, negatives…)``.

        Args:
            descs: [N, D] descriptors of every image that may appear (queries, positives, pool).
            clusters: [N] cluster/class id of each image; equal ids match.
            queries, positives: [Q] indices into ``descs`` (the query/positive pairs).
            pool: optional [P] indices of the negative candidates (default: all N images).

        Raises DatasetError when a query has fewer than ``num_negatives`` non-matching clusters.
        """
        if descs.dim() != 2:
            raise ConfigError(f"descs must be [N, D], got {tuple(descs.shape)}")
        n = descs.shape[0]
        dev = descs.device
        clusters = _as_long(clusters, "clusters", dev)
        queries = _as_long(queries, "queries", dev)
        positives = _as_long(positives, "positives", dev)
        if clusters.shape[0] != n or queries.shape != positives.shape:
            raise ConfigError(f"clusters must have {n} entries and queries/positives the same length; got "
                              f"{clusters.shape[0]}, {queries.shape[0]}, {positives.shape[0]}")
        pool = torch.arange(n, device=dev) if pool is None else _as_long(pool, "pool", dev)
        for name, ix in (("queries", queries), ("positives", positives), ("pool", pool)):
            if ix.numel() and (int(ix.min()) < 0 or int(ix.max()) >= n):
                raise ConfigError(f"{name} index out of range [0, {n})")
        k = self.num_negatives
        out = torch.empty(queries.shape[0], 2 + k, dtype=torch.long, device=dev)
        out[:, 0], out[:, 1] = queries, positives
        pool_desc, pool_cl = descs[pool], clusters[pool]
        pos_in_pool = torch.arange(pool.shape[0], device=dev)
        for start in range(0, queries.shape[0], self.chunk):
            qi = queries[start:start + self.chunk]
            sims = descs[qi] @ pool_desc.T                                   # [q, P]
            sims = sims.masked_fill(pool_cl[None, :] == clusters[qi][:, None], float("-inf"))
            order = torch.sort(sims, dim=1, descending=True, stable=True).indices
            for r in range(qi.shape[0]):
                o = order[r]
                valid = torch.isfinite(sims[r, o])
                o = o[valid]
                cl = pool_cl[o]
                # first occurrence (in similarity order) of each cluster
                uniq, inv = torch.unique(cl, return_inverse=True)
                first = torch.full((uniq.shape[0],), o.shape[0], dtype=torch.long, device=dev)
                first = first.scatter_reduce(0, inv, pos_in_pool[: o.shape[0]], reduce="amin")
                first = torch.sort(first).values
                if first.shape[0] < k:
                    raise DatasetError(
                        f"query {int(qi[r])} has only {first.shape[0]} candidate negative clusters in the pool, "
                        f"{k} are needed: enlarge the pool or lower num_negatives")
                out[start + r, 2:] = pool[o[first[:k]]]
        return out


class ConfusionNegativeSampler:
    """CFCD hard-negative sampler: negatives of an anchor of class ``c`` are images of other classes
    that a stage-1 classifier predicted as ``c``.

    Give either ``predictions`` [N] (the stage-1 predicted class of every image) or ``confusion``
    [C, C] (``confusion[t, p]`` = how often true class t was predicted as p; then an image of class
    ``t ≠ c`` is a candidate for anchors of class c when ``confusion[t, c] > 0``, and candidates are
    drawn with probability proportional to ``confusion[t, c]`` / |images of t|, i.e. classes in
    proportion to their confusion, images uniformly within a class).

    ``sample(anchors)`` returns LongTensor [A, num_negatives], drawn without replacement where the
    candidates suffice. When an anchor has fewer candidates than needed, ``fallback="random"`` fills
    up with uniformly drawn images of other classes, ``fallback="error"`` raises DatasetError.
    Deterministic given ``seed`` (a private generator; ``set_epoch`` reseeds with ``seed + epoch``).
    """

    def __init__(self, labels: torch.Tensor, predictions: torch.Tensor | None = None,
                 confusion: torch.Tensor | None = None, num_negatives: int = 6, seed: int = 0,
                 fallback: str = "random") -> None:
        self.labels = _as_long(labels, "labels").cpu()
        if (predictions is None) == (confusion is None):
            raise ConfigError("ConfusionNegativeSampler needs exactly one of predictions [N] or confusion [C, C]")
        if fallback not in ("random", "error"):
            raise ConfigError(f"fallback={fallback!r}: use 'random' or 'error'")
        if num_negatives < 1:
            raise ConfigError(f"num_negatives must be >= 1, got {num_negatives}")
        n = self.labels.shape[0]
        num_classes = int(self.labels.max()) + 1 if n else 0
        if predictions is not None:
            predictions = _as_long(predictions, "predictions").cpu()
            if predictions.shape[0] != n:
                raise ConfigError(f"predictions has {predictions.shape[0]} entries, labels {n}")
            # weight[i, c] = 1 when image i (of another class) was predicted as c
            self._pred = predictions
            self._conf = None
        else:
            confusion = torch.as_tensor(confusion, dtype=torch.float64).cpu()
            if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1] or confusion.shape[0] < num_classes:
                raise ConfigError(f"confusion must be [C, C] with C >= {num_classes}, got {tuple(confusion.shape)}")
            if (confusion < 0).any():
                raise ConfigError("confusion must be non-negative counts or rates")
            self._pred = None
            self._conf = confusion
            self._class_size = torch.bincount(self.labels, minlength=confusion.shape[0]).double()
        self.num_negatives = int(num_negatives)
        self.seed = int(seed)
        self.fallback = fallback
        self._gen = torch.Generator().manual_seed(self.seed)

    def set_epoch(self, epoch: int) -> None:
        self._gen = torch.Generator().manual_seed(self.seed + int(epoch))

    def candidate_weights(self, anchor: int) -> torch.Tensor:
        """[N] non-negative weights of every image as a negative of ``anchor`` (0 = not a candidate)."""
        c = int(self.labels[anchor])
        other = self.labels != c
        if self._pred is not None:
            return (other & (self._pred == c)).double()
        if c >= self._conf.shape[1]:
            return torch.zeros(self.labels.shape[0], dtype=torch.float64)
        w = self._conf[self.labels, c] / self._class_size[self.labels].clamp(min=1.0)
        return w * other.double()

    def sample(self, anchors: torch.Tensor) -> torch.Tensor:
        anchors = _as_long(anchors, "anchors").cpu()
        k = self.num_negatives
        out = torch.empty(anchors.shape[0], k, dtype=torch.long)
        for r, a in enumerate(anchors.tolist()):
            w = self.candidate_weights(a)
            n_cand = int((w > 0).sum())
            take = min(k, n_cand)
            chosen = torch.multinomial(w, take, replacement=False, generator=self._gen) if take else \
                torch.empty(0, dtype=torch.long)
            if take < k:
                if self.fallback == "error":
                    raise DatasetError(f"anchor {a} has only {n_cand} confusion negatives, {k} are needed; "
                                       "use fallback='random' or lower num_negatives")
                rest = (self.labels != self.labels[a]).double()
                rest[chosen] = 0.0
                if int((rest > 0).sum()) < k - take:
                    raise DatasetError(f"anchor {a}: fewer than {k} images of other classes exist")
                chosen = torch.cat([chosen, torch.multinomial(rest, k - take, replacement=False,
                                                               generator=self._gen)])
            out[r] = chosen
        return out


def pairwise_distances(x: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean (or squared) distances between the rows of x [N, D] -> [N, N] (exact 0 diagonal)."""
    d2 = (x.pow(2).sum(1)[:, None] + x.pow(2).sum(1)[None, :] - 2.0 * x @ x.T).clamp(min=0.0)
    d2 = d2 * (1.0 - torch.eye(x.shape[0], device=x.device, dtype=x.dtype))
    return d2 if squared else torch.sqrt(d2 + eps) * (d2 > 0)


@torch.no_grad()
def batch_hard_triplets(x: torch.Tensor, labels: torch.Tensor,
                        squared: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-hard mining (Hermans et al.): for every anchor with at least one positive and one
    negative in the batch, its farthest positive and its nearest negative.

    Returns index tensors ``(anchor, positive, negative)``, each [T]. Ties: lowest index.
    """
    labels = _as_long(labels, "labels", x.device)
    d = pairwise_distances(x.detach().float(), squared=squared)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=x.device)
    pos_mask, neg_mask = same & ~eye, ~same
    keep = pos_mask.any(1) & neg_mask.any(1)
    p = d.masked_fill(~pos_mask, float("-inf")).argmax(1)
    n = d.masked_fill(~neg_mask, float("inf")).argmin(1)
    a = torch.nonzero(keep).squeeze(1)
    return a, p[a], n[a]


@torch.no_grad()
def semi_hard_triplets(x: torch.Tensor, labels: torch.Tensor, margin: float = 0.1,
                       squared: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Semi-hard mining (FaceNet): for every positive pair (a, p), a ≠ p, the nearest negative n with
    ``d(a, p) < d(a, n) < d(a, p) + margin``; pairs without such a negative are dropped.

    Returns index tensors ``(anchor, positive, negative)``, each [T] (pairs in row-major order).
    """
    labels = _as_long(labels, "labels", x.device)
    d = pairwise_distances(x.detach().float(), squared=squared)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=x.device)
    a, p = torch.nonzero(same & ~eye, as_tuple=True)
    dap = d[a, p][:, None]                                   # [T, 1]
    dan = d[a]                                               # [T, N]
    ok = (~same[a]) & (dan > dap) & (dan < dap + margin)
    n = dan.masked_fill(~ok, float("inf")).argmin(1)
    keep = ok.any(1)
    return a[keep], p[keep], n[keep]


@torch.no_grad()
def hardest_negatives(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k'] indices of each row's ``k`` most similar rows (dot product) with another label, most
    similar first; ``k' = min(k, fewest other-label rows of any row)`` so every row has as many."""
    labels = _as_long(labels, "labels", x.device)
    other = labels[:, None] != labels[None, :]
    k = min(int(k), int(other.sum(1).min())) if len(labels) else 0
    if k <= 0:
        return torch.zeros((len(labels), 0), dtype=torch.long, device=x.device)
    sim = (x.detach().float() @ x.detach().float().T).masked_fill(~other, float("-inf"))
    return sim.topk(k, dim=1).indices


@torch.no_grad()
def contrastive_pairs(x: torch.Tensor, labels: torch.Tensor, hard_negatives: int = 5
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs for a contrastive loss (cirtorch-style tuples within a batch): every positive pair
    (i < j, same label) and, for each image, its ``hard_negatives`` most similar other-label images.

    Returns ``(i, j, target)``: index tensors [P] and ``target`` 1 for positives, 0 for negatives.
    """
    labels = _as_long(labels, "labels", x.device)
    idx = torch.arange(len(labels), device=x.device)
    same = labels[:, None] == labels[None, :]
    pi, pj = torch.nonzero(same & (idx[:, None] < idx[None, :]), as_tuple=True)
    nj = hardest_negatives(x, labels, hard_negatives)
    ni = idx[:, None].expand_as(nj).reshape(-1)
    return (torch.cat([pi, ni]), torch.cat([pj, nj.reshape(-1)]),
            torch.cat([torch.ones_like(pi), torch.zeros_like(ni)]))
