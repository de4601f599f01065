"""The re-rank pipeline: candidate selection (plain / protocol-aware), score mixing, re-sorting,
and the CVNet scorer over a map store (caching, batching by size and memory budget)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from irkit.errors import ConfigError
from irkit.search.rerank import CVNetScorer, RerankScorer, ignored_rows, rerank, select_candidates

# 12 database images, 2 queries; global scores descending with the row index for query 0
N_DB = 12
SCORES = np.stack([np.linspace(1.0, 0.45, N_DB), np.linspace(0.2, 0.9, N_DB)]).astype(np.float32)
GND = [
    {"easy": [3, 7], "hard": [1, 9], "junk": [0, 5]},
    {"easy": [10], "hard": [2], "junk": [11, 4]},
]


pytestmark = pytest.mark.usefixtures("single_thread")


class TableScorer:
    """Re-rank score = a fixed table value per (query, row); records what it was asked."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self.calls: list[tuple[int, list[int]]] = []

    def score(self, query, candidates):
        self.calls.append((query, list(map(int, candidates))))
        return self.table[query, np.asarray(candidates)]


def _table(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((2, N_DB))


def test_scorer_protocol() -> None:
    assert isinstance(TableScorer(_table()), RerankScorer)


def test_ignored_rows_per_protocol() -> None:
    assert ignored_rows(GND[0], "easy").tolist() == [0, 1, 5, 9]      # junk + hard
    assert ignored_rows(GND[0], "medium").tolist() == [0, 5]          # junk
    assert ignored_rows(GND[0], "hard").tolist() == [0, 3, 5, 7]      # junk + easy
    with pytest.raises(ConfigError):
        ignored_rows(GND[0], "extreme")


def test_plain_vs_protocol_candidates() -> None:
    ranking = np.arange(N_DB)
    assert select_candidates(ranking, 4).tolist() == [0, 1, 2, 3]
    assert select_candidates(ranking, 4, ignored_rows(GND[0], "easy")).tolist() == [2, 3, 4, 6]
    assert select_candidates(ranking, 4, ignored_rows(GND[0], "hard")).tolist() == [1, 2, 4, 6]
    scorer = TableScorer(_table())
    out = rerank(SCORES, scorer, k=4, lam=0.5, mode="protocol", gnd=GND)
    assert set(out.ranks) == {"easy", "medium", "hard"}
    # query 0, Medium: candidates skip junk 0 and 5 -> {1, 2, 3, 4}, re-sorted, then the rest in order
    med = out.ranks["medium"][:, 0]
    assert set(med[:4].tolist()) == {1, 2, 3, 4}
    assert med[4:].tolist() == [0, 5, 6, 7, 8, 9, 10, 11]
    # each query is scored once, on the union of its protocols' candidates, best-first
    assert [c[0] for c in scorer.calls] == [0, 1]
    assert scorer.calls[0][1] == [1, 2, 3, 4, 6]
    for name, ranks in out.ranks.items():
        for q in range(2):
            assert sorted(ranks[:, q].tolist()) == list(range(N_DB))       # still a permutation
            ign = ignored_rows(GND[q], name)
            assert not np.isin(ranks[:4, q], ign).any()
    plain = rerank(SCORES, TableScorer(_table()), k=4, lam=0.5)
    assert set(plain.ranks) == {"plain"} and set(plain.ranks["plain"][:4, 0].tolist()) == {0, 1, 2, 3}


def test_resorted_top_k_by_mixed_score() -> None:
    table = _table(3)
    out = rerank(SCORES, TableScorer(table), k=5, lam=0.5)
    ranks = out.ranks["plain"]
    for q in range(2):
        glob = np.argsort(-SCORES[q], kind="stable")
        top = glob[:5]
        final = SCORES[q, top] + 0.5 * table[q, top]
        assert ranks[:5, q].tolist() == top[np.argsort(-final, kind="stable")].tolist()
        assert ranks[5:, q].tolist() == glob[5:].tolist()
        assert out.scored[q] == pytest.approx({int(r): table[q, r] for r in top})
    # a large lambda lets the re-rank score decide alone
    big = rerank(SCORES, TableScorer(table), k=5, lam=1e6).ranks["plain"]
    top0 = np.argsort(-SCORES[0], kind="stable")[:5]
    assert big[:5, 0].tolist() == top0[np.argsort(-table[0, top0], kind="stable")].tolist()


def test_lambda_zero_and_none_keep_global_ranking() -> None:
    glob = np.argsort(-SCORES, axis=1, kind="stable").T
    scorer = TableScorer(_table())
    assert np.array_equal(rerank(SCORES, scorer, k=5, lam=0.0).ranks["plain"], glob)
    assert scorer.calls == []                                            # nothing scored
    assert np.array_equal(rerank(SCORES, None, k=5).ranks["plain"], glob)
    assert np.array_equal(rerank(SCORES, None, k=100).ranks["plain"], glob)   # k beyond the database
    prot = rerank(SCORES, None, k=3, mode="protocol", gnd=GND)
    for name, ranks in prot.ranks.items():           # the same order once ignored images are dropped
        for q in range(2):
            ign = ignored_rows(GND[q], name)
            assert ranks[~np.isin(ranks[:, q], ign), q].tolist() == glob[~np.isin(glob[:, q], ign), q].tolist()


def test_rerank_refuses_bad_input() -> None:
    with pytest.raises(ConfigError, match="ground truth"):
        rerank(SCORES, None, mode="protocol")
    with pytest.raises(ConfigError, match="mode"):
        rerank(SCORES, None, mode="fancy")
    with pytest.raises(ConfigError):
        rerank(SCORES, None, k=0)


# ----------------------------------------------------------------------------- CVNet scorer

class MapStore:
    """Stands in for a FeatureStore with re-rank maps."""

    has_maps = True

    def __init__(self, maps):
        self.maps = maps
        self.reads = 0

    def get_map(self, i):
        self.reads += 1
        return self.maps[i]


@pytest.fixture(scope="module")
def reranker():
    from irkit.models.cvnet import CVNetReranker

    torch.manual_seed(0)
    return CVNetReranker().eval()


def test_cvnet_scorer_matches_direct_scoring(reranker) -> None:
    rng = np.random.default_rng(0)
    sizes = [(6, 8), (7, 5), (6, 8), (7, 5), (6, 8)]
    db = MapStore([rng.standard_normal((1024, h, w)).astype(np.float32) for h, w in sizes])
    qmap = rng.standard_normal((1024, 5, 7)).astype(np.float32)
    queries = MapStore([qmap])
    with torch.no_grad():
        q_levels = reranker.prepare(torch.from_numpy(qmap)[None])
        direct = np.array([float(reranker.score(q_levels, reranker.prepare(torch.from_numpy(m)[None])))
                           for m in db.maps])
    scorer = CVNetScorer(reranker, db, queries, memory_budget=1)          # one pair per batch
    cands = np.array([4, 1, 0, 3, 2])
    np.testing.assert_allclose(scorer.score(0, cands), direct[cands], atol=1e-5, rtol=0)
    assert db.reads == 5 and scorer.misses == 5
    big = CVNetScorer(reranker, db, memory_budget=1 << 30)                 # batches per map size
    np.testing.assert_allclose(big.score(qmap, cands), direct[cands], atol=1e-5, rtol=0)
    np.testing.assert_allclose(big.score(q_levels, cands[:2]), direct[cands[:2]], atol=1e-5, rtol=0)
    assert big.hits == 2 and big.misses == 5                               # maps prepared once
    tiny = CVNetScorer(reranker, db, cache_bytes=1)                        # nothing fits in the cache
    tiny.score(qmap, cands)
    assert tiny.misses == 5 and tiny._cached_bytes == 0
    # through the pipeline
    out = rerank(np.array([[0.5, 0.4, 0.3, 0.2, 0.1]], np.float32), big, k=3, lam=0.5, queries=[qmap])
    top = np.array([0, 1, 2])
    exp = top[np.argsort(-(np.array([0.5, 0.4, 0.3]) + 0.5 * direct[top]), kind="stable")]
    assert out.ranks["plain"][:3, 0].tolist() == exp.tolist()


def test_cvnet_scorer_needs_maps(reranker) -> None:
    class NoMaps:
        has_maps = False

        def get_map(self, i):
            raise AssertionError

    with pytest.raises(ConfigError, match="maps"):
        CVNetScorer(reranker, NoMaps())
    with pytest.raises(ConfigError, match="get_map"):
        CVNetScorer(reranker, object())
