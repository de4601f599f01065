"""Load curve of `irkit serve`: throughput, p50/p99 latency and share of 503s at rising concurrency.

    python bench/serve.py [--levels 1,2,4,8,16,32,64] [--requests 96] [--png serve_load.png]
                          [--store DIR] [--workers 2] [--max-queue 128] [--queue-timeout 5]

Starts a live server on 127.0.0.1 only (by default over a generated store of the tiny test preset
of tests/serve_tiny.py, so the curve measures the service, not a big network; ``--store`` serves an
existing store with the model it was extracted with, searches only, nothing is written to it).
At each concurrency level, that many clients send query-image searches back to back until the
level's request count (or time bound) is reached; the table gives requests/s of 200 answers, p50
and p99 latency of the 200s, and the share of 503s. Then the burst check of issue 18: 100
concurrent searches, each must be a 200 within the queue deadline plus its own run time, or a
503 with ``Retry-After`` that says the queue deadline passed or the queue was full. The load
average is printed before and after; a busy machine is reported loudly, because then the figures
say more about the neighbours than about the service. Exits non-zero if the burst check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import serve_tiny  # noqa: E402
from serve_tiny import png_bytes  # noqa: E402
from _machine import machine_report  # noqa: E402

LEVELS = (1, 2, 4, 8, 16, 32, 64)


def load_report(tag: str) -> tuple[float, bool]:
    """Print the machine report (bench/_machine.py: load, other processes' share, a loud warning when
    busy); (1-minute load, busy)."""
    report = machine_report()
    print(f"[{tag}] {report}", flush=True)
    return os.getloadavg()[0], "BUSY" in report


def queries_from_store(store: Path, n: int) -> list[bytes]:
    """Up to ``n`` image files of an existing store, as upload bytes (query images the model has seen)."""
    from irkit.store import FeatureStore

    out = []
    for p in FeatureStore.open(store).paths:
        try:
            out.append(Path(p).read_bytes())
        except OSError:
            continue
        if len(out) >= n:
            break
    if not out:
        raise SystemExit(f"no readable image files among the paths of store {store}")
    return out


def sweep_level(url: str, concurrency: int, n_requests: int, max_s: float, queries: list[bytes],
                k: int, rerank: bool) -> dict:
    """``concurrency`` clients search back to back until ``n_requests`` are sent or ``max_s`` passes."""
    import httpx

    lat_ok: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()
    sent = iter(range(n_requests))
    stop_at = time.monotonic() + max_s
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    with httpx.Client(base_url=url, timeout=120, limits=limits) as c:
        def client(_: int) -> None:
            while time.monotonic() < stop_at:
                with lock:
                    i = next(sent, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    r = c.post("/search", files={"image": ("q.png", queries[i % len(queries)], "image/png")},
                               data={"k": str(k), "rerank": str(rerank).lower()})
                    code = r.status_code
                except httpx.HTTPError:
                    code = -1
                dt = time.perf_counter() - t0
                with lock:
                    codes[code] = codes.get(code, 0) + 1
                    if code == 200:
                        lat_ok.append(dt)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as ex:
            list(ex.map(client, range(concurrency)))
        wall = time.perf_counter() - t0
    total = sum(codes.values())
    a = np.asarray(lat_ok) * 1000 if lat_ok else np.asarray([np.nan])
    return {"concurrency": concurrency, "requests": total, "wall_s": round(wall, 2),
            "ok_per_s": round(len(lat_ok) / wall, 1) if wall else 0.0,
            "p50_ms": round(float(np.percentile(a, 50)), 1), "p99_ms": round(float(np.percentile(a, 99)), 1),
            "share_503": round(codes.get(503, 0) / total, 3) if total else 0.0,
            "codes": {str(k_): v for k_, v in sorted(codes.items())}}


def burst_check(url: str, n: int, queries: list[bytes], queue_timeout: float, max_queue: int, workers: int) -> dict:
    """``n`` searches released at once; each must be 200 in time, or 503 + Retry-After past the queue."""
    import httpx

    barrier = threading.Barrier(n)
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    with httpx.Client(base_url=url, timeout=120, limits=limits) as c:
        c.get("/health")

        def one(i: int):
            barrier.wait(60)
            t0 = time.monotonic()
            r = c.post("/search", files={"image": ("q.png", queries[i % len(queries)], "image/png")},
                       data={"k": "10"})
            return r.status_code, r.headers.get("retry-after"), r.text, time.monotonic() - t0

        with ThreadPoolExecutor(n) as ex:
            results = list(ex.map(one, range(n)))
        mean_job_ms = c.get("/stats").json()["pool"]["mean_job_ms"]
    # a 200's deadline: its wait (at most the queue deadline) plus its own run, with a wide margin
    deadline_200 = queue_timeout + max(5.0, 20 * mean_job_ms / 1000)
    violations = []
    n_ok = n_busy = 0
    for code, retry, text, dt in results:
        if code == 200:
            n_ok += 1
            if dt > deadline_200:
                violations.append(f"200 after {dt:.2f} s (> {deadline_200:.1f} s)")
        elif code == 503:
            n_busy += 1
            try:
                msg = json.loads(text)["error"]
            except (ValueError, KeyError):
                msg = ""
            past_deadline = "queue deadline" in msg and dt >= 0.9 * queue_timeout
            past_queue = "queue is full" in msg and n > workers + max_queue
            if not retry or not (past_deadline or past_queue):
                violations.append(f"503 after {dt:.2f} s, Retry-After {retry!r}: {msg[:80]}")
        else:
            violations.append(f"status {code}: {text[:80]}")
    slowest = max((dt for code, _, _, dt in results if code == 200), default=0.0)
    return {"requests": n, "ok": n_ok, "busy_503": n_busy, "slowest_200_s": round(slowest, 2),
            "deadline_200_s": round(deadline_200, 1), "violations": violations[:10], "passed": not violations}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["concurrency"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(x, [r["ok_per_s"] for r in rows], "o-", color="tab:blue")
    ax1.set(xscale="log", xlabel="concurrent clients", ylabel="searches/s answered 200", title="throughput")
    ax1.set_xticks(x, [str(v) for v in x])
    ax1.set_ylim(bottom=0)
    ax1.grid(alpha=0.3)
    ax2.plot(x, [r["p50_ms"] for r in rows], "o-", label="p50 latency")
    ax2.plot(x, [r["p99_ms"] for r in rows], "s--", label="p99 latency")
    ax2.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms (200 answers)", title="latency")
    ax2.set_xticks(x, [str(v) for v in x])
    ax2.grid(alpha=0.3)
    share = ax2.twinx()
    share.bar(x, [100 * r["share_503"] for r in rows], width=[v * 0.3 for v in x], alpha=0.25, color="tab:red",
              label="503 share")
    share.set(ylabel="% answered 503", ylim=(0, 100))
    lines = ax2.get_legend_handles_labels()
    bars = share.get_legend_handles_labels()
    ax2.legend(lines[0] + bars[0], lines[1] + bars[1], loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrency levels (comma-separated)")
    ap.add_argument("--requests", type=int, default=96, help="requests per level (at least 2 per client)")
    ap.add_argument("--max-seconds", type=float, default=30.0, help="time bound per level")
    ap.add_argument("--burst", type=int, default=100, help="concurrent searches of the burst check (0 = skip)")
    ap.add_argument("--store", help="serve this existing store (searches only) instead of a generated one")
    ap.add_argument("--images", type=int, default=200, help="images in the generated store")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-queue", type=int, default=128)
    ap.add_argument("--queue-timeout", type=float, default=5.0)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rerank", action="store_true", help="re-rank every search (needs a store with maps)")
    ap.add_argument("--png", default="serve_load.png", help="where to write the curve")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    levels = [int(v) for v in args.levels.split(",") if v.strip()]
    if not levels or min(levels) < 1 or args.requests < 1:
        ap.error("--levels must be positive integers and --requests >= 1")

    load_before, busy_before = load_report("before")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.store:
            store = Path(args.store)
            queries = queries_from_store(store, 64)
        else:
            serve_tiny.register()
            store = serve_tiny.build_store(tmp, n=args.images)
            queries = [png_bytes(10_000 + i, 64) for i in range(64)]
        log = tmp / "server.log"
        server = serve_tiny.LiveServer(store, log, "--workers", str(args.workers), "--max-queue", str(args.max_queue),
                                       "--queue-timeout", str(args.queue_timeout), token=None)
        rows = []
        with server:
            print(f"server on {server.url} (workers {args.workers}, max queue {args.max_queue}, queue deadline "
                  f"{args.queue_timeout:g} s), store {store}", flush=True)
            sweep_level(server.url, 2, 8, 10, queries, args.k, args.rerank)          # warm-up
            print(f"{'clients':>7} {'requests':>8} {'200/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'503 share':>9}")
            for c in levels:
                row = sweep_level(server.url, c, max(args.requests, 2 * c), args.max_seconds, queries, args.k,
                                  args.rerank)
                rows.append(row)
                print(f"{c:>7} {row['requests']:>8} {row['ok_per_s']:>8.1f} {row['p50_ms']:>8.1f} "
                      f"{row['p99_ms']:>8.1f} {100 * row['share_503']:>8.1f}%", flush=True)
            burst = burst_check(server.url, args.burst, queries, args.queue_timeout, args.max_queue,
                                args.workers) if args.burst else None
        log_text = log.read_text(errors="replace")
    load_after, busy_after = load_report("after")
    busy = busy_before or busy_after
    label = "LOADED machine" if busy else "quiet machine"
    title = (f"irkit serve on 127.0.0.1, {os.cpu_count()} CPUs, {args.workers} workers, queue {args.max_queue}/"
             f"{args.queue_timeout:g} s, load {load_before:.1f}->{load_after:.1f} ({label})")
    png_path = Path(args.png)
    plot(rows, png_path, title)
    print(f"curve written to {png_path} ({label})")
    if burst is not None:
        print(f"burst of {burst['requests']} concurrent searches: {burst['ok']} x 200 (slowest "
              f"{burst['slowest_200_s']} s, deadline {burst['deadline_200_s']} s), {burst['busy_503']} x 503 "
              f"-> {'PASS' if burst['passed'] else 'FAIL'}")
        for v in burst["violations"]:
            print(f"  violation: {v}")
    tracebacks = log_text.count("Traceback")
    print(f"server log: {tracebacks} traceback(s)")
    result = {"machine": {"cpus": os.cpu_count(), "load_before": round(load_before, 2),
                          "load_after": round(load_after, 2), "busy": busy},
              "server": {"workers": args.workers, "max_queue": args.max_queue, "queue_timeout_s": args.queue_timeout,
                         "store": str(args.store or f"generated tiny store of {args.images} images")},
              "levels": rows, "burst": burst, "log_tracebacks": tracebacks}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    ok = (burst is None or burst["passed"]) and tracebacks == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
