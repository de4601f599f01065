"""Benchmark: exact (Flat) vs approximate faiss indexes on synthetic clustered descriptors.

    python bench/search.py                       # 1M x 512-D, then 1M x 2048-D
    python bench/search.py --dims 512 --n 200000 # smaller
    python bench/search.py --backend milvus --dims 128 --n 100000   # Milvus (Lite) HNSW / IVF_FLAT

Data: L2-normalised vectors around 50k cluster centres, the centres themselves grouped around
1k "landmarks", so that the exact top-100 of a query (its own cluster plus sibling clusters) is
meaningful rather than noise. Queries are fresh draws from the same clusters. Descriptors are
generated in chunks into a float32 .npy memory map (the "store"); every index is built from it
with irkit.search.Index and re-scoring reads it. Reported per index: build time, index bytes,
process RSS, queries/s, recall@100 against the exact top-100 (|approx ∩ exact| / 100), and the
ratios against the exact index measured in the same run.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from irkit.search.index import Index  # noqa: E402
from _machine import machine_report  # noqa: E402  (bench/ is the script's folder)


# Families that copy the database into RAM (RFlat, IVF-Flat) are left out at 2048-D: 1M x 2048
# float32 is 8 GiB, and with the memory-mapped store in page cache and faiss's vector growth that
# exhausts a 24 GiB machine. There, IVF-PQ re-scores from the memory-mapped store instead.
DEFAULT_INDEXES = {512: "ivfpq,ivfpq-refine,ivfflat", 2048: "ivfpq"}


def rss_gib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_data(path: Path, n: int, nq: int, dim: int, n_centres: int, n_groups: int, seed: int,
              chunk: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """Write n clustered unit vectors to a float32 .npy memmap (in chunks); return it and nq queries."""
    rng = np.random.default_rng(seed)
    groups = unit(rng.standard_normal((n_groups, dim), dtype=np.float32))
    centres = unit(groups[rng.integers(0, n_groups, n_centres)]
                   + 0.6 * rng.standard_normal((n_centres, dim), dtype=np.float32) * np.sqrt(1 / dim) * 1.7)
    noise = 0.6 / np.sqrt(dim)

    def draw(m: int) -> np.ndarray:
        c = rng.integers(0, n_centres, m)
        return unit(centres[c] + noise * rng.standard_normal((m, dim), dtype=np.float32)).astype(np.float32)

    db = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for s in range(0, n, chunk):
        db[s:s + chunk] = draw(min(chunk, n - s))
    db.flush()
    del db
    db = np.load(path, mmap_mode="r")
    for s in range(0, n, chunk):  # hot page cache, as in a running server: time search, not the disk
        float(db[s:s + chunk].sum())
    return db, draw(nq)


def recall_at(rows: np.ndarray, ref: np.ndarray) -> float:
    k = ref.shape[1]
    return float(np.mean([len(np.intersect1d(a, b, assume_unique=True)) / k for a, b in zip(rows, ref)]))


def timed_search(index: Index, q: np.ndarray, k: int, **kw) -> tuple[np.ndarray, float]:
    index.search(q[:8], k, **kw)  # warm caches / memmap pages of the first hits
    t0 = time.perf_counter()
    _, rows = index.search(q, k, **kw)
    return rows, q.shape[0] / (time.perf_counter() - t0)


def index_bytes(index: Index) -> int:
    inner = faiss.downcast_index(index.faiss_index)
    if isinstance(inner, faiss.IndexFlat):
        return index.ntotal * index.dim * 4
    return int(faiss.serialize_index(index.faiss_index).nbytes)


def run_dim(args: argparse.Namespace, dim: int, workdir: Path) -> list[dict]:
    n, k = args.n, args.k
    t0 = time.perf_counter()
    db, q = make_data(workdir / f"db{dim}.npy", n, args.nq, dim, args.centres, args.groups, args.seed)
    print(f"\n## dim {dim}: n={n:,} database vectors, {args.nq} queries, {args.centres:,} centres "
          f"in {args.groups:,} groups (generated in {time.perf_counter() - t0:.0f}s), faiss threads "
          f"{faiss.omp_get_max_threads()}", flush=True)
    nlist = args.nlist or int(2 ** round(np.log2(4 * np.sqrt(n))))
    m = args.pq_m or (dim // 8 if dim <= 512 else 128)
    rows: list[dict] = []

    t0 = time.perf_counter()
    flat = Index.build(db, "Flat", progress=False)
    build = time.perf_counter() - t0
    exact, qps_exact = timed_search(flat, q, k)
    rows.append(dict(index="Flat (exact)", params="", build=build, bytes=index_bytes(flat), rss=rss_gib(),
                     qps=qps_exact, recall=1.0))
    print(f"Flat: build {build:.1f}s, {qps_exact:.1f} q/s", flush=True)
    del flat
    gc.collect()
    if args.backend == "milvus":
        rows += run_milvus(args, db, q, exact, qps_exact, workdir, dim)
        del db
        (workdir / f"db{dim}.npy").unlink()
        return rows

    specs = []
    for fam in (args.indexes or DEFAULT_INDEXES.get(dim, DEFAULT_INDEXES[512])).split(","):
        if fam == "ivfpq":
            specs.append((f"IVF{nlist},PQ{m}", "nprobe", args.nprobe))
        elif fam == "ivfflat":
            specs.append((f"IVF{nlist},Flat", "nprobe", args.nprobe))
        elif fam == "hnsw":
            specs.append(("HNSW32", "ef_search", args.ef))
        elif fam == "ivfpq-refine":  # faiss re-scores k * k_factor PQ candidates exactly, in C++
            specs.append((f"IVF{nlist},PQ{m},RFlat", "k_factor", args.k_factor))
    for factory, pname, values in specs:
        t0 = time.perf_counter()
        idx = Index.build(db, factory, train_size=args.train_size, progress=False)
        build = time.perf_counter() - t0
        if args.rescore_in_ram:
            idx.attach(np.array(db))
        nbytes, rss = index_bytes(idx), rss_gib()
        print(f"{factory}: build {build:.1f}s, {nbytes / 2**20:.0f} MiB", flush=True)
        if pname == "k_factor":
            idx.set_params(nprobe=args.nprobe[0])
        rescore_ks = [0, *args.rescore_k] if "PQ" in factory and "RFlat" not in factory else [0]
        for v in values:
            idx.set_params(**{pname: v})
            for rk in rescore_ks:
                kw = dict(rescore=True, rescore_k=rk) if rk else {}
                got, qps = timed_search(idx, q, k, **kw)
                rows.append(dict(index=factory, params=f"{pname}={v}" + (f" +rescore{rk}" if rk else ""),
                                 build=build, bytes=nbytes, rss=rss, qps=qps, recall=recall_at(got, exact)))
                r = rows[-1]
                print(f"  {r['params']:<28} {qps:9.1f} q/s ({qps / qps_exact:6.1f}x)  recall@{k} "
                      f"{r['recall']:.3f}", flush=True)
        del idx
        gc.collect()
    del db
    (workdir / f"db{dim}.npy").unlink()
    return rows


def wait_for_milvus_index(idx, itype: str, q: np.ndarray, exact: np.ndarray, settle: float) -> bool:
    """Wait until searches go through the approximate index: Milvus (Lite) builds segment indexes in
    the background and searches unindexed segments exhaustively, which would report recall 1.0.
    Probe: top-10 with the weakest setting (nprobe 1 / ef 10) stops being exact once the index serves."""
    if not (itype.startswith("HNSW") or itype.startswith("IVF")):
        return True
    probe = {"nprobe": 1} if itype.startswith("IVF") else {"ef": 10}
    deadline = time.perf_counter() + settle
    while True:
        _, got = idx.search(q[:50], 10, search_params=probe)
        if recall_at(got, exact[:50, :10]) < 0.999:
            return True
        if time.perf_counter() > deadline:
            return False
        time.sleep(5)


def run_milvus(args: argparse.Namespace, db: np.ndarray, q: np.ndarray, exact: np.ndarray, qps_exact: float,
               workdir: Path, dim: int) -> list[dict]:
    """The same queries through Milvus collections (one per --milvus-indexes type), scored against
    the exact faiss top-k: build = insert + index, then each search setting's q/s and recall."""
    from irkit.search.milvus_index import MilvusIndex

    uri = args.uri or str(workdir / "bench_milvus.db")
    ids = [str(i) for i in range(db.shape[0])]
    rows = []
    for itype in args.milvus_indexes.split(","):
        itype = itype.strip().upper()
        name = f"bench_{itype.lower()}_{dim}"
        build_params = {"nlist": args.nlist or int(2 ** round(np.log2(4 * np.sqrt(db.shape[0]))))} \
            if itype.startswith("IVF") else None
        t0 = time.perf_counter()
        idx = MilvusIndex.open(uri, name, dim, index_type=itype, build_params=build_params)
        idx.drop()
        idx = MilvusIndex.open(uri, name, dim, index_type=itype, build_params=build_params)
        for s in range(0, db.shape[0], 50_000):
            idx.add(np.asarray(db[s:s + 50_000]), ids[s:s + 50_000], batch_size=5000)
        idx.flush()  # sealed segments get the index; unsealed rows would be searched by brute force
        idx.attach(db, ids)
        idx.search(q[:2], args.k)  # the first search waits for the index to be built and loaded
        in_use = wait_for_milvus_index(idx, itype, q, exact, args.milvus_settle)
        build = time.perf_counter() - t0
        print(f"milvus {itype} at {uri}: insert + index {build:.1f}s"
              + ("" if in_use else f" (searches still exhaustive after {args.milvus_settle}s: recall is not the index's)"),
              flush=True)
        settings = [{"ef": v} for v in args.ef] if itype.startswith("HNSW") else \
            [{"nprobe": v} for v in args.nprobe] if itype.startswith("IVF") else [{}]
        for sp in settings:
            t0 = time.perf_counter()
            _, got = idx.search(q, args.k, search_params=sp)
            qps = q.shape[0] / (time.perf_counter() - t0)
            label = ",".join(f"{k_}={max(v, args.k) if k_ == 'ef' else v}" for k_, v in sp.items())  # ef >= k
            rows.append(dict(index=f"milvus {itype}", params=label, build=build, bytes=0, rss=rss_gib(), qps=qps,
                             recall=recall_at(got, exact)))
            print(f"  {label:<28} {qps:9.1f} q/s ({qps / qps_exact:6.1f}x)  recall@{args.k} "
                  f"{rows[-1]['recall']:.3f}", flush=True)
        idx.drop()
        idx.close()
    return rows


def print_table(dim: int, n: int, rows: list[dict], k: int) -> None:
    ref = rows[0]
    print(f"\n### dim {dim}, n={n:,}, k={k} (ratios vs Flat measured in this run)")
    print(f"| index | params | build s | index MiB | RSS GiB | q/s | speed-up | recall@{k} |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['index']} | {r['params']} | {r['build']:.1f} | {r['bytes'] / 2**20:,.0f} | {r['rss']:.2f} | "
              f"{r['qps']:,.1f} | {r['qps'] / ref['qps']:.1f}x | {r['recall']:.3f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default="512,2048")
    p.add_argument("--n", type=int, default=1_000_000, help="database size (1M x 2048 float32 = 8 GiB)")
    p.add_argument("--nq", type=int, default=500)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--centres", type=int, default=50_000)
    p.add_argument("--groups", type=int, default=1_000)
    p.add_argument("--indexes", default=None,
                   help="comma list of ivfpq, ivfpq-refine (IVF-PQ + faiss exact refine), ivfflat, hnsw "
                        f"(default: {DEFAULT_INDEXES})")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(n), a power of 2)")
    p.add_argument("--pq-m", type=int, default=None, help="PQ sub-quantisers (default dim/8, 128 for 2048)")
    p.add_argument("--nprobe", type=lambda s: [int(v) for v in s.split(",")], default=[8, 16, 32])
    p.add_argument("--ef", type=lambda s: [int(v) for v in s.split(",")], default=[64, 256])
    p.add_argument("--k-factor", type=lambda s: [int(v) for v in s.split(",")], default=[4, 6],
                   help="ivfpq-refine: candidates re-scored = k * k_factor (nprobe = the first --nprobe)")
    p.add_argument("--rescore-k", type=lambda s: [int(v) for v in s.split(",")], default=[1000],
                   help="ivfpq: candidates re-scored exactly from the stored vectors (comma list)")
    p.add_argument("--rescore-in-ram", action="store_true",
                   help="re-score from an in-RAM copy of the vectors instead of the memory map "
                        "(on a machine short of page cache, memmap page faults dominate re-scoring)")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads (default: faiss's)")
    p.add_argument("--workdir", default=None, help="where the memmapped database goes (default: a temp dir)")
    p.add_argument("--backend", choices=["faiss", "milvus"], default="faiss",
                   help="milvus: the approximate indexes are Milvus collections (pip install 'irkit[milvus]')")
    p.add_argument("--uri", default=None, help="--backend milvus: server URI (default: a Milvus Lite file)")
    p.add_argument("--milvus-indexes", default="HNSW,IVF_FLAT", help="--backend milvus: index types (comma list)")
    p.add_argument("--milvus-settle", type=float, default=180,
                   help="--backend milvus: seconds to wait for the background index build before measuring")
    args = p.parse_args()
    print(machine_report(), flush=True)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(f"bench/search.py: {' '.join(sys.argv[1:]) or '(defaults)'}; faiss {faiss.__version__}, "
          f"{os.cpu_count()} CPUs", flush=True)
    tables = []
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for dim in (int(d) for d in args.dims.split(",")):
            tables.append((dim, run_dim(args, dim, Path(tmp))))
    for dim, rows in tables:
        print_table(dim, args.n, rows, args.k)
    print(f"\npeak RSS {peak_gib():.2f} GiB")
    print(machine_report(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
