"""Faults that must lose nothing: kill -9 during writes, a full disk during an add, a read-only store.

Written against the HTTP API and the store on disk only, so they hold whatever the engine does
inside (in-memory index rebuilt at start or a persisted id-mapped index): after each fault the
store, the index (everything a search can return) and the count the service reports agree, every
add the service confirmed is there, and every delete it confirmed is gone.
"""
from __future__ import annotations

import contextlib
import errno
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

import serve_tiny  # noqa: E402
from serve_tiny import png_bytes  # noqa: E402
from irkit.serve.app import create_app  # noqa: E402
from irkit.serve.engine import Limits  # noqa: E402
from irkit.store import FeatureStore  # noqa: E402

TOKEN = "fault-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_K = 500



def listing(c, any_id: str) -> set[str]:
    """Every id the index can return (a search by an indexed id with k = all)."""
    r = c.post("/search", json={"id": any_id, "k": MAX_K})
    assert r.status_code == 200, r.text
    return {h["id"] for h in r.json()["results"]}


def assert_consistent(c, store_dir: Path, acked_adds: set[str] = frozenset(),
                      acked_deletes: set[str] = frozenset()) -> set[str]:
    """Store on disk == index == reported count; confirmed adds present, confirmed deletes absent."""
    on_disk = set(FeatureStore.open(store_dir).ids)
    assert c.get("/health").json()["images"] == len(on_disk)
    assert len(on_disk) < MAX_K
    if on_disk:
        assert listing(c, sorted(on_disk)[0]) == on_disk
    assert acked_adds <= on_disk, sorted(acked_adds - on_disk)[:5]
    assert not acked_deletes & on_disk, sorted(acked_deletes & on_disk)[:5]
    for image_id in sorted(acked_deletes)[:5]:
        assert c.post("/search", json={"id": image_id, "k": 1}).status_code == 404
    return on_disk


# ---------------------------------------------------------------------------------- kill -9

def _writer(url: str, mode: str, prefix: str, deletable: list[str], acked_adds: set[str],
            acked_deletes: set[str], stop: threading.Event) -> None:
    """Adds (two images per request) and/or deletes until the server dies or ``stop`` is set."""
    rng = random.Random(prefix)
    with httpx.Client(base_url=url, timeout=30) as c:
        i = 0
        while not stop.is_set():
            do_add = mode == "add" or (mode == "mixed" and (rng.random() < 0.6 or not deletable))
            try:
                if do_add:
                    ids = [f"{prefix}-{i}a", f"{prefix}-{i}b"]
                    r = c.post("/images", headers=AUTH, data={"ids": ",".join(ids)},
                               files=[("images", ("a.png", png_bytes(10_000 + 2 * i), "image/png")),
                                      ("images", ("b.png", png_bytes(10_001 + 2 * i), "image/png"))])
                    if r.status_code == 201:
                        acked_adds.update(a["id"] for a in r.json()["added"])
                        deletable.extend(ids)
                else:
                    if not deletable:
                        return
                    victim = deletable.pop(rng.randrange(len(deletable)))
                    acked_adds.discard(victim)   # from here its state is unknown until the delete is confirmed:
                    r = c.delete(f"/images/{victim}", headers=AUTH)   # a kill may land after the commit
                    if r.status_code == 200:
                        acked_deletes.add(victim)
            except httpx.HTTPError:
                return                       # the server was killed
            i += 1


def _saved_index(store: Path) -> list[Path]:
    return sorted(p for p in store.iterdir() if p.is_file() and "index" in p.name and not p.name.startswith("."))


@pytest.mark.parametrize("mode", ["add", "delete", "mixed", "index-update"])
def test_kill_9_during_writes_loses_nothing(tmp_path, mode):
    """``index-update``: the store has a saved index (``irkit index``) that the server re-saves after
    every 2 changes, so kills land while the index file is being written."""
    serve_tiny.register()
    store = serve_tiny.build_store(tmp_path, n=300 if mode == "delete" else 12)
    log = tmp_path / "server.log"
    args: tuple[str, ...] = ("--max-k", str(MAX_K), "--workers", "2")
    if mode == "index-update":
        res = subprocess.run([sys.executable, str(Path(serve_tiny.__file__).resolve()), "index", str(store)],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        assert _saved_index(store), f"`irkit index` saved no index file in {store}: {os.listdir(store)}"
        args += ("--index-save-every", "2")
        mode = "mixed"
    acked_adds: set[str] = set()
    acked_deletes: set[str] = set()
    deletable = list(FeatureStore.open(store).ids) if mode != "add" else []
    for round_ in range(2):
        server = serve_tiny.LiveServer(store, log, *args, token=TOKEN).start()
        try:
            stop = threading.Event()
            t = threading.Thread(target=_writer, args=(server.url, mode, f"k{round_}", deletable, acked_adds,
                                                       acked_deletes, stop))
            t.start()
            # kill once a few writes of this round are confirmed (counted, not timed: a fast machine
            # could otherwise finish every write first), so some commit and one is cut
            done_before = len(acked_adds) + len(acked_deletes)
            wanted = 3 + random.Random(round_).randrange(6)
            deadline = time.monotonic() + 60
            while (len(acked_adds) + len(acked_deletes) - done_before < wanted and t.is_alive()
                   and time.monotonic() < deadline):
                time.sleep(0.005)
            writing = t.is_alive()
            server.kill()
            stop.set()
            t.join(60)
            assert not t.is_alive()
            assert writing, "the writer had finished before the kill; the kill cut nothing"
        finally:
            server.kill()
        assert acked_adds or acked_deletes, "no write was confirmed before the kill; the test proved nothing"
    with serve_tiny.LiveServer(store, log, *args, token=TOKEN) as server, \
            httpx.Client(base_url=server.url, timeout=30) as c:
        on_disk = assert_consistent(c, store, acked_adds, acked_deletes)
        paths = {Path(p).name for p in FeatureStore.open(store).paths}
        uploads = store / "uploads"
        orphans = [p.name for p in uploads.iterdir() if p.name not in paths] if uploads.is_dir() else []
        assert not orphans, f"upload files no indexed image refers to: {orphans[:5]}"
        if "--index-save-every" in args:
            assert _saved_index(store), "the saved index file disappeared"
        # the service still writes: one more add and one delete, then consistent again
        r = c.post("/images", headers=AUTH, data={"ids": "after-kill"},
                   files={"images": ("a.png", png_bytes(77), "image/png")})
        assert r.status_code == 201, r.text
        victim = (sorted(on_disk) or ["after-kill"])[0]
        assert c.delete(f"/images/{victim}", headers=AUTH).status_code == 200
        assert_consistent(c, store, (acked_adds | {"after-kill"}) - {victim}, acked_deletes | {victim})
    assert "Traceback" not in server.log_text()


# ---------------------------------------------------------------------------------- disk full

def manifest_write_fails(real, fail: dict):
    """``atomic_write_json`` that finds the device full (ENOSPC) while ``fail["left"]`` > 0 (counting
    down, so a test can check the fault fired), then writes as usual."""
    def full_disk(path, obj):
        if fail["left"]:
            fail["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, obj)
    return full_disk


LIMITS = Limits(max_body_bytes=2 * 1024 * 1024, max_pixels=1_000_000, max_k=MAX_K, max_images_per_add=4)


def _store_files(store: Path) -> dict[str, int]:
    """Store files (not uploads) and their sizes: what a failed add must leave exactly as it was."""
    return {p.name: p.stat().st_size for p in store.iterdir() if p.is_file() and not p.name.startswith(".irkit-")}


def _add(c, image_id: str, seed: int):
    return c.post("/images", headers=AUTH, data={"ids": image_id},
                  files={"images": ("a.png", png_bytes(seed), "image/png")})


@pytest.mark.parametrize("where", ["chunk", "manifest"])
def test_disk_full_during_add_is_507_and_changes_nothing(tmp_path, monkeypatch, where):
    """ENOSPC while the store writes a chunk file, or while it commits the manifest."""
    import irkit.store as store_mod

    store = serve_tiny.build_store(tmp_path, n=8)
    target = "atomic_path" if where == "chunk" else "atomic_write_json"
    real = getattr(store_mod, target)
    fail = {"left": 1}

    if where == "chunk":
        @contextlib.contextmanager
        def full_disk(path, *a, **kw):
            with real(path, *a, **kw) as tmp:
                yield tmp                      # the bytes go out (partly, on a real disk) ...
                if fail["left"] and str(path).endswith(".npy"):
                    fail["left"] -= 1          # ... and then the device is full
                    raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    else:
        full_disk = manifest_write_fails(real, fail)

    with TestClient(create_app(store, token=TOKEN, limits=LIMITS)) as c:
        before = assert_consistent(c, store)
        files_before = _store_files(store)
        monkeypatch.setattr(store_mod, target, full_disk)
        r = _add(c, "on-full-disk", 5)
        assert r.status_code == 507, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert "disk is full" in r.json()["error"]
        assert fail["left"] == 0
        assert _store_files(store) == files_before, "a failed add left or changed files in the store"
        assert assert_consistent(c, store) == before
        assert c.post("/search", json={"id": "on-full-disk", "k": 1}).status_code == 404
        r = _add(c, "after-space-freed", 6)   # the fault is gone: the next add works
        assert r.status_code == 201, r.text
        assert assert_consistent(c, store, {"after-space-freed"}) == before | {"after-space-freed"}
    # and a fresh process sees the same
    with TestClient(create_app(store, token=TOKEN, limits=LIMITS)) as c:
        assert assert_consistent(c, store, {"after-space-freed"}) == before | {"after-space-freed"}


@contextlib.contextmanager
def tmpfs(path: Path, size: str, options: str = ""):
    """A small tmpfs mounted at ``path``; skips the test where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(path)],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=20)


def _fill(folder: Path) -> Path:
    """Write a file until the device is full (ENOSPC); returns it."""
    filler = folder / f"filler-{uuid.uuid4().hex}"
    block = b"\0" * 4096
    with open(filler, "wb", buffering=0) as fh:   # unbuffered: close() has nothing left to flush
        try:
            while True:
                fh.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def test_really_full_tmpfs_during_add_is_507_then_recovers(tmp_path):
    serve_tiny.register()
    built = serve_tiny.build_store(tmp_path / "build", n=8)
    with tmpfs(tmp_path / "disk", "4m") as disk:
        store = disk / "store"
        subprocess.run(["cp", "-a", str(built), str(store)], check=True)
        with TestClient(create_app(store, token=TOKEN, limits=LIMITS)) as c:
            before = assert_consistent(c, store)
            assert _add(c, "fits", 1).status_code == 201
            before = before | {"fits"}
            filler = _fill(disk)
            files_before = _store_files(store)
            r = _add(c, "no-room", 2)
            assert r.status_code == 507, r.text
            assert "disk is full" in r.json()["error"]
            assert _store_files(store) == files_before
            assert assert_consistent(c, store, {"fits"}) == before
            filler.unlink()
            r = _add(c, "room-again", 3)
            assert r.status_code == 201, r.text
            assert assert_consistent(c, store, {"fits", "room-again"}) == before | {"room-again"}
        store_files = FeatureStore.open(store)
        assert set(store_files.ids) == before | {"room-again"}


# ---------------------------------------------------------------------------------- read-only store

def test_read_only_store_starts_read_only_and_says_so(tmp_path, caplog):
    serve_tiny.register()
    built = serve_tiny.build_store(tmp_path / "build", n=6)
    with tmpfs(tmp_path / "ro", "8m") as disk:
        store = disk / "store"
        subprocess.run(["cp", "-a", str(built), str(store)], check=True)
        res = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot remount read-only: {res.stderr.strip()}")
        with pytest.raises(OSError):
            (store / "probe").write_bytes(b"x")
        with caplog.at_level("WARNING", logger="irkit.serve.app"), \
                TestClient(create_app(store, token=TOKEN, limits=LIMITS)) as c:
            stats = c.get("/stats").json()
            assert stats["read_only"] is True and stats["writes_enabled"] is False
            assert "cannot create files" in stats["read_only_reason"]
            assert c.post("/search", json={"id": "img000", "k": 3}).status_code == 200
            r = _add(c, "nope", 1)
            assert r.status_code == 403 and "read-only" in r.json()["error"], r.text
            r = c.delete("/images/img001", headers=AUTH)
            assert r.status_code == 403 and "read-only" in r.json()["error"], r.text
            assert c.get("/health").json()["images"] == 6
        assert any("read-only" in rec.getMessage() for rec in caplog.records), caplog.text
        assert sorted(os.listdir(store)) == sorted(os.listdir(built))


def test_disk_full_during_delete_is_507_and_changes_nothing(tmp_path, monkeypatch):
    """ENOSPC while the store commits a removal's tombstone: the image stays, everywhere."""
    import irkit.store as store_mod

    store = serve_tiny.build_store(tmp_path, n=8)
    fail = {"left": 1}
    full_disk = manifest_write_fails(store_mod.atomic_write_json, fail)

    with TestClient(create_app(store, token=TOKEN, limits=LIMITS)) as c:
        before = assert_consistent(c, store)
        monkeypatch.setattr(store_mod, "atomic_write_json", full_disk)
        r = c.delete("/images/img003", headers=AUTH)
        assert r.status_code == 507, r.text
        assert "disk is full" in r.json()["error"]
        assert assert_consistent(c, store) == before
        assert c.post("/search", json={"id": "img003", "k": 1}).status_code == 200
        assert c.delete("/images/img003", headers=AUTH).status_code == 200
        assert assert_consistent(c, store, acked_deletes={"img003"}) == before - {"img003"}
