"""Miners: hard negatives, confusion sampler, in-batch mining (triplets, contrastive pairs)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from irkit.errors import ConfigError, DatasetError
from irkit.train.miners import (ConfusionNegativeSampler, HardNegativeMiner, batch_hard_triplets, contrastive_pairs,
                                hardest_negatives, pairwise_distances, semi_hard_triplets)


def _descs(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _brute_force_negatives(descs, clusters, q, k, pool):
    cand = sorted(pool, key=lambda j: (-float(descs[q] @ descs[j]), j))
    out, seen = [], set()
    for j in cand:
        c = int(clusters[j])
        if c == int(clusters[q]) or c in seen:
            continue
        seen.add(c)
        out.append(j)
        if len(out) == k:
            break
    return out


def test_hard_negative_miner_matches_brute_force():
    descs = _descs(60, seed=1)
    clusters = torch.arange(60) // 4            # 15 clusters of 4 images
    queries = torch.tensor([0, 5, 13, 40, 59])
    positives = torch.tensor([1, 6, 14, 41, 58])
    miner = HardNegativeMiner(num_negatives=5, chunk=2)       # chunk < Q exercises the chunking
    tuples = miner.mine(descs, clusters, queries, positives)
    assert tuples.shape == (5, 7)
    assert tuples[:, 0].tolist() == queries.tolist() and tuples[:, 1].tolist() == positives.tolist()
    for r, q in enumerate(queries.tolist()):
        negs = tuples[r, 2:].tolist()
        assert negs == _brute_force_negatives(descs, clusters, q, 5, range(60))
        assert len({int(clusters[j]) for j in negs}) == 5                 # one per cluster
        assert all(int(clusters[j]) != int(clusters[q]) for j in negs)    # non-matching
    # a restricted pool
    pool = torch.arange(20, 60)
    t2 = miner.mine(descs, clusters, queries, positives, pool=pool)
    for r, q in enumerate(queries.tolist()):
        assert t2[r, 2:].tolist() == _brute_force_negatives(descs, clusters, q, 5, range(20, 60))


def test_hard_negative_miner_picks_most_similar_one_per_cluster():
    # query 0 (cluster 0); images 2 and 3 of cluster 1 are both very similar; 4 (cluster 2) less.
    e = torch.eye(4, dtype=torch.float64)
    descs = F.normalize(torch.stack([e[0], e[0] + 0.01 * e[1], e[0] + 0.1 * e[2], e[0] + 0.2 * e[2],
                                     e[0] + 0.5 * e[3], e[3]]), dim=1)
    clusters = torch.tensor([0, 0, 1, 1, 2, 3])
    t = HardNegativeMiner(num_negatives=3).mine(descs, clusters, torch.tensor([0]), torch.tensor([1]))
    assert t.tolist() == [[0, 1, 2, 4, 5]]
    with pytest.raises(DatasetError):
        HardNegativeMiner(num_negatives=4).mine(descs, clusters, torch.tensor([0]), torch.tensor([1]))
    assert HardNegativeMiner(remine_every=3).due(0) and HardNegativeMiner(remine_every=3).due(6)
    assert not HardNegativeMiner(remine_every=3).due(4)


def test_confusion_sampler_from_predictions():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    preds = torch.tensor([0, 0, 0, 1, 0, 0, 2, 0, 1, 3])        # images 2, 4, 5, 7 predicted as class 0
    s = ConfusionNegativeSampler(labels, predictions=preds, num_negatives=3, seed=0)
    out = s.sample(torch.tensor([0, 1, 0]))
    for row in out.tolist():
        assert set(row) <= {2, 4, 5, 7} and len(set(row)) == 3
    # class 1 anchors: only image 8 (class 3) was predicted as 1 -> 1 confusion negative + random fill
    row = s.sample(torch.tensor([3]))[0].tolist()
    assert row[0] == 8 and len(set(row)) == 3 and all(int(labels[j]) != 1 for j in row)
    with pytest.raises(DatasetError):
        ConfusionNegativeSampler(labels, predictions=preds, num_negatives=3, fallback="error").sample(torch.tensor([3]))
    # deterministic given the seed
    a = ConfusionNegativeSampler(labels, predictions=preds, num_negatives=2, seed=5).sample(torch.arange(10))
    b = ConfusionNegativeSampler(labels, predictions=preds, num_negatives=2, seed=5).sample(torch.arange(10))
    assert torch.equal(a, b)
    with pytest.raises(ConfigError):
        ConfusionNegativeSampler(labels)


def test_confusion_sampler_from_matrix():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    conf = torch.zeros(4, 4)
    conf[2, 0] = 5.0            # class 2 is often predicted as class 0
    conf[0, 0] = 9.0            # the diagonal (own class) never yields negatives
    s = ConfusionNegativeSampler(labels, confusion=conf, num_negatives=2, seed=1, fallback="error")
    w = s.candidate_weights(0)
    assert (w > 0).nonzero().squeeze(1).tolist() == [4, 5]
    assert sorted(s.sample(torch.tensor([1]))[0].tolist()) == [4, 5]


def test_batch_hard_and_semi_hard_match_loops():
    x = _descs(12, d=4, seed=3)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 5])
    d = pairwise_distances(x)
    a, p, n = batch_hard_triplets(x, y)
    exp = []
    for i in range(12):
        pos = [j for j in range(12) if j != i and y[j] == y[i]]
        neg = [j for j in range(12) if y[j] != y[i]]
        if pos and neg:
            exp.append((i, max(pos, key=lambda j: float(d[i, j])), min(neg, key=lambda j: float(d[i, j]))))
    assert list(zip(a.tolist(), p.tolist(), n.tolist())) == exp
    assert 10 not in a.tolist() and 11 not in a.tolist()      # singletons have no positive
    margin = 0.5
    a, p, n = semi_hard_triplets(x, y, margin=margin)
    exp = []
    for i, j in itertools.permutations(range(12), 2):
        if y[i] != y[j]:
            continue
        cands = [k for k in range(12) if y[k] != y[i] and d[i, j] < d[i, k] < d[i, j] + margin]
        if cands:
            exp.append((i, j, min(cands, key=lambda k: float(d[i, k]))))
    exp.sort()
    assert sorted(zip(a.tolist(), p.tolist(), n.tolist())) == exp
    assert len(exp) > 0


def test_miner_form_contrastive_pairs_and_hardest_negatives_match_loops():
    """One form, miner(embeddings, labels) -> indices: checked against plain loops."""
    x = _descs(12, seed=3).float()
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    hn = hardest_negatives(x, y, 3)
    sim = x @ x.T
    for i in range(12):
        ref = sorted((j for j in range(12) if y[j] != y[i]), key=lambda j: -float(sim[i, j]))[:3]
        assert hn[i].tolist() == ref
    a, b, t = contrastive_pairs(x, y, hard_negatives=2)
    pos = [(i, j) for i in range(12) for j in range(i + 1, 12) if y[i] == y[j]]
    assert [(int(i), int(j)) for i, j, tt in zip(a, b, t) if tt == 1] == pos
    negs = [(int(i), int(j)) for i, j, tt in zip(a, b, t) if tt == 0]
    assert negs == [(i, j) for i in range(12) for j in hn[i, :2].tolist()]
    assert hardest_negatives(x[:2], y[:2], 3).shape == (2, 0)          # no other label: no negatives
    # the offline miner in the same form: [Q, k] negatives, equal to its tuple form's columns 2:
    m = HardNegativeMiner(num_negatives=2)
    q = torch.tensor([0, 5])
    assert torch.equal(m(x, y, queries=q), m.mine(x, y, q, q)[:, 2:])

