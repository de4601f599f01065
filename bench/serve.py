"""Benchmark of `irkit serve` on loopback: concurrent searches mixed with adds, then kill -9 during adds.

    python bench/serve.py [--searches 200] [--adds 20] [--concurrency 8] [--rerank-every 4]

Builds a tiny random-weight store in a temp dir (the test preset of tests/serve_tiny.py, so the
figures measure the service, not a big network), starts a live server on 127.0.0.1 and reports
p50/p99 latency and error counts. Then it kills the server with SIGKILL while adds are in flight,
several times, and checks after each restart that the store loads, the index answers, the image
count equals the committed adds, and no orphan upload is left. Bounded: it stops by itself.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import serve_tiny  # noqa: E402

TOKEN = "bench-token"


def png(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size // 8, size // 8, 3)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(store: Path, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "serve_tiny.py"), "serve", "--store", str(store),
                             "--host", "127.0.0.1", "--port", str(port), "--token", TOKEN, "--workers", "2",
                             "--queue", "64"], stdout=open(log, "a"), stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    raise RuntimeError(f"server did not start; see {log}")


def bench_mixed(client, args) -> dict:
    import httpx  # noqa: F401

    lat: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()

    def search(i: int) -> None:
        t0 = time.perf_counter()
        rerank = args.rerank_every and i % args.rerank_every == 0
        r = client.post("/search", files={"image": ("q.png", png(i % 50), "image/png")},
                        data={"k": "10", "rerank": str(bool(rerank)).lower()})
        dt = time.perf_counter() - t0
        with lock:
            lat.append(dt)
            if r.status_code != 200:
                errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1

    def add(i: int) -> None:
        r = client.post("/images", headers={"Authorization": f"Bearer {TOKEN}"}, data={"ids": f"bench{i}"},
                        files={"images": ("a.png", png(1000 + i), "image/png")})
        if r.status_code != 201:
            with lock:
                errors[f"add {r.status_code}"] = errors.get(f"add {r.status_code}", 0) + 1

    jobs = [(search, i) for i in range(args.searches)] + [(add, i) for i in range(args.adds)]
    random.Random(0).shuffle(jobs)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(lambda j: j[0](j[1]), jobs))
    wall = time.perf_counter() - t0
    a = np.asarray(lat) * 1000
    return {"searches": len(lat), "adds": args.adds, "concurrency": args.concurrency, "wall_s": round(wall, 2),
            "search_p50_ms": round(float(np.percentile(a, 50)), 1),
            "search_p99_ms": round(float(np.percentile(a, 99)), 1),
            "searches_per_s": round(len(lat) / wall, 1), "errors": errors}


def bench_kill(store: Path, log: Path, rounds: int) -> list[dict]:
    import httpx

    from irkit.store import FeatureStore

    out = []
    for k in range(rounds):
        port = free_port()
        proc = start(store, port, log)
        before = len(FeatureStore.open(store))
        url = f"http://127.0.0.1:{port}"
        acks: list[str] = []

        def adder() -> None:
            with httpx.Client(base_url=url, timeout=10) as c:
                for i in range(100):
                    try:
                        r = c.post("/images", headers={"Authorization": f"Bearer {TOKEN}"},
                                   data={"ids": f"kill{k}-{i}a,kill{k}-{i}b"},
                                   files=[("images", ("a.png", png(5000 + 2 * i), "image/png")),
                                          ("images", ("b.png", png(5001 + 2 * i), "image/png"))])
                    except httpx.HTTPError:
                        return
                    if r.status_code == 201:
                        acks.extend(a["id"] for a in r.json()["added"])

        th = threading.Thread(target=adder)
        th.start()
        time.sleep(1.0 + 1.0 * random.Random(k).random())  # some adds commit, one is cut
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        th.join()
        store_after = FeatureStore.open(store)
        n = len(store_after)
        port = free_port()
        proc = start(store, port, log)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            health = c.get("/health").json()
            r = c.post("/search", files={"image": ("q.png", png(1), "image/png")}, data={"k": "5"})
            acked_present = all(c.post("/search", json={"id": i, "k": 1}).status_code == 200 for i in acks)
        uploads = store / "uploads"
        paths = {Path(p).name for p in store_after.paths}
        orphans = [p.name for p in uploads.iterdir() if p.name not in paths] if uploads.is_dir() else []
        proc.terminate()
        proc.wait(10)
        out.append({"round": k, "before": before, "acked_adds": len(acks), "after": n,
                    "health_images": health["images"], "search_status": r.status_code,
                    "all_acked_present": acked_present, "extra_unacked_rows": n - before - len(acks),
                    "orphan_uploads_after_restart": len(orphans)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--searches", type=int, default=200)
    ap.add_argument("--adds", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rerank-every", type=int, default=4, help="every Nth search re-ranks (0 = never)")
    ap.add_argument("--images", type=int, default=200, help="images in the generated store")
    ap.add_argument("--kill-rounds", type=int, default=3)
    args = ap.parse_args()
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        serve_tiny.register()
        store = serve_tiny.build_store(tmp, n=args.images)
        log = tmp / "server.log"
        port = free_port()
        proc = start(store, port, log)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                mixed = bench_mixed(client, args)
        finally:
            proc.terminate()
            proc.wait(10)
        kills = bench_kill(store, log, args.kill_rounds)
    print(json.dumps({"mixed": mixed, "kill9_during_add": kills}, indent=2))
    ok = not mixed["errors"] and all(k["search_status"] == 200 and k["all_acked_present"]
                                     and k["orphan_uploads_after_restart"] == 0 for k in kills)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
