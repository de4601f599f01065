"""HTTP API of `irkit serve` (FastAPI TestClient over a tiny random-weight model).

Every endpoint once on the happy path, then a table of malformed and hostile requests that must
each get a 4xx JSON ``{"error": ...}`` (never a 500), then concurrent searches during adds.
"""
from __future__ import annotations

import asyncio
import io
import threading
import time

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

import serve_tiny  # noqa: E402  (tests/ is on sys.path under pytest's rootdir import mode)
from serve_tiny import png_bytes  # noqa: E402
from irkit.serve.app import create_app  # noqa: E402
from irkit.serve.concurrency import InferencePool, RWLock  # noqa: E402
from irkit.search.engine import SearchOptions  # noqa: E402
from irkit.serve.engine import Limits  # noqa: E402
from irkit.serve.errors import Busy  # noqa: E402

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = Limits(max_body_bytes=2 * 1024 * 1024, max_pixels=1_000_000, max_k=50, max_images_per_add=3)
OPTIONS = SearchOptions(topk=8)



def jpeg_bytes(seed: int = 2) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(seed))).save(buf, format="JPEG")
    return buf.getvalue()


def bomb_png() -> bytes:
    """A 3000x3000 PNG (9 Mpixel > the test's 1 Mpixel limit) that compresses to a few KB."""
    buf = io.BytesIO()
    Image.new("L", (3000, 3000), 0).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    store = serve_tiny.build_store(root, n=10)
    app = create_app(store, token=TOKEN, limits=LIMITS, workers=2, queue=32, options=OPTIONS)
    with TestClient(app) as client:
        yield client, root


@pytest.fixture(scope="module")
def client(served):
    return served[0]


def assert_json_error(resp, status: int | tuple[int, ...]):
    wanted = status if isinstance(status, tuple) else (status,)
    assert resp.status_code in wanted, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body.get("error"), str) and len(body["error"]) > 5, body
    return body["error"]


# ------------------------------------------------------------------------------------ happy paths

def test_health_stats_docs_page(client):
    assert client.get("/health").json() == {"status": "ok", "images": 10}
    stats = client.get("/stats").json()
    assert stats["model"] == serve_tiny.PRESET and stats["rerank_available"] is True
    assert stats["writes_enabled"] is True and stats["limits"]["max_k"] == 50
    assert client.get("/openapi.json").json()["paths"]["/search"]["post"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "app.js" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200


def test_search_by_upload_and_by_id(client):
    r = client.post("/search", files={"image": ("q.png", png_bytes(7), "image/png")}, data={"k": "4"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 4 and body["reranked"] is False
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert body["results"][0]["thumbnail"].startswith("/images/") and body["results"][0]["rank"] == 1
    r = client.post("/search", json={"id": "img004", "k": 3})
    assert r.status_code == 200 and r.json()["results"][0]["id"] in ("img004", "img005")
    # form (urlencoded) with an id works too
    r = client.post("/search", data={"id": "img004", "k": "2"})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


def test_search_rerank_qe_and_box(client):
    base = client.post("/search", json={"id": "img002", "k": 5}).json()
    rr = client.post("/search", json={"id": "img002", "k": 5, "rerank": True}).json()
    assert rr["reranked"] is True and rr["rerank"] == "cvnet"
    assert {h["stage"] for h in rr["results"][:5]} == {"cvnet"}  # all within the re-ranked top 8
    assert {h["id"] for h in rr["results"]} <= {f"img{i:03d}" for i in range(10)}
    for h in rr["results"]:   # final = global + 0.5 * P(same), P in [0, 1]
        assert h["global_score"] <= h["score"] <= h["global_score"] + 0.5 + 1e-6
    qe = client.post("/search", json={"id": "img002", "k": 5, "qe": True}).json()
    assert qe["qe"] is True and len(qe["results"]) == 5
    boxed = client.post("/search", files={"image": ("q.jpg", jpeg_bytes(3), "image/jpeg")},
                        data={"k": "3", "box": "8,8,40,40", "rerank": "on"})
    assert boxed.status_code == 200, boxed.text
    assert boxed.json()["query"]["box"] == [8.0, 8.0, 40.0, 40.0]
    assert base["results"][0]["id"] in ("img002", "img003")   # itself or its near-duplicate


def test_thumbnail_and_explain(client):
    r = client.get("/images/img001/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).format == "JPEG"
    r = client.get("/images/img001/explain", params={"query": "img000"})
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    r = client.post("/images/img001/explain", files={"image": ("q.png", png_bytes(5), "image/png")},
                    data={"box": "0,0,32,32"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_add_search_delete_roundtrip(served):
    client, root = served
    data = png_bytes(99)
    r = client.post("/images", headers=AUTH, files=[("images", ("x.png", data, "image/png")),
                                                    ("images", ("y.jpg", jpeg_bytes(98), "image/jpeg"))],
                    data={"ids": "added/one,added-two"})
    assert r.status_code == 201, r.text
    assert [a["id"] for a in r.json()["added"]] == ["added/one", "added-two"]
    assert client.get("/health").json()["images"] == 12
    hit = client.post("/search", files={"image": ("q.png", data, "image/png")}, data={"k": "1"}).json()
    assert hit["results"][0]["id"] == "added/one"          # searchable without a restart
    assert client.get("/images/added/one/thumbnail").status_code == 200
    uploads = list((root / "store" / "uploads").iterdir())
    assert len(uploads) == 2 and all(".." not in p.name for p in uploads)
    # ids without explicit names are generated
    r = client.post("/images", headers=AUTH, files={"images": ("z.png", png_bytes(97), "image/png")})
    gen = r.json()["added"][0]["id"]
    assert r.status_code == 201 and gen.startswith("upload-")
    for image_id in ("added/one", "added-two", gen):
        r = client.delete(f"/images/{image_id}", headers=AUTH)
        assert r.status_code == 200, r.text
    assert client.get("/health").json()["images"] == 10
    assert not list((root / "store" / "uploads").iterdir())
    assert_json_error(client.get("/images/added/one/thumbnail"), 404)


def test_restart_sees_committed_adds(served, tmp_path):
    client, root = served
    r = client.post("/images", headers=AUTH, files={"images": ("r.png", png_bytes(55), "image/png")},
                    data={"ids": "persisted"})
    assert r.status_code == 201
    # a second server over the same store (as after a restart) rebuilds its index from the store
    other = create_app(root / "store", limits=LIMITS)
    with TestClient(other) as c2:
        assert c2.get("/health").json()["images"] == 11
        assert c2.post("/search", json={"id": "persisted", "k": 1}).json()["results"][0]["id"] == "persisted"
        assert_json_error(c2.post("/images", headers=AUTH, files={"images": ("a.png", png_bytes(1), "image/png")}), 401)
    assert client.delete("/images/persisted", headers=AUTH).status_code == 200


def test_explain_unavailable_without_reranker(tmp_path):
    store = serve_tiny.build_store(tmp_path, n=4, preset=serve_tiny.PLAIN_PRESET)
    with TestClient(create_app(store, limits=LIMITS)) as c:
        msg = assert_json_error(c.get("/images/img001/explain", params={"query": "img000"}), 501)
        assert "re-ranker" in msg
        assert "re-ranker" in assert_json_error(c.post("/search", json={"id": "img000", "rerank": True}), 501)
        assert c.get("/stats").json()["rerank_available"] is False
        assert c.post("/search", json={"id": "img000", "k": 2}).status_code == 200


# ---------------------------------------------------------------------------- hostile requests

def _multipart_garbage(c):
    return c.post("/search", content=b"--xyz\r\nnot a header\r\n\r\n\x00\x01",
                  headers={"content-type": "multipart/form-data; boundary=xyz"})


def _chunked_oversize(c):
    def gen():
        for _ in range(40):
            yield b"\0" * 65536          # 2.5 MB without a Content-Length
    return c.post("/images", content=gen(), headers={**AUTH, "content-type": "multipart/form-data; boundary=b"})


TEXT_AS_JPG = b"this is plain text pretending to be a JPEG\n" * 10
HOSTILE = {
    # --- /search: body shape
    "search: no body": (lambda c: c.post("/search"), 400),
    "search: text/plain body": (lambda c: c.post("/search", content=b"id=img001",
                                                 headers={"content-type": "text/plain"}), 400),
    "search: invalid JSON": (lambda c: c.post("/search", content=b"{id:", headers={"content-type": "application/json"}), 400),
    "search: JSON array": (lambda c: c.post("/search", json=[1, 2, 3]), 400),
    "search: JSON without query": (lambda c: c.post("/search", json={"k": 3}), 400),
    "search: garbage multipart": (_multipart_garbage, 400),
    # --- /search: wrong types and ranges
    "search: k not a number": (lambda c: c.post("/search", data={"id": "img001", "k": "abc"}), 400),
    "search: negative k": (lambda c: c.post("/search", json={"id": "img001", "k": -1}), 400),
    "search: k zero": (lambda c: c.post("/search", json={"id": "img001", "k": 0}), 400),
    "search: huge k": (lambda c: c.post("/search", json={"id": "img001", "k": 10 ** 12}), 400),
    "search: fractional k": (lambda c: c.post("/search", json={"id": "img001", "k": 2.5}), 400),
    "search: boolean k": (lambda c: c.post("/search", json={"id": "img001", "k": True}), 400),
    "search: rerank not a boolean": (lambda c: c.post("/search", data={"id": "img001", "rerank": "maybe"}), 400),
    "search: id is a number": (lambda c: c.post("/search", json={"id": 123}), 400),
    "search: id is an object": (lambda c: c.post("/search", json={"id": {"$ne": None}}), 400),
    "search: unknown id": (lambda c: c.post("/search", json={"id": "no-such-image"}), 404),
    "search: traversal id": (lambda c: c.post("/search", json={"id": "../../etc/passwd"}), 400),
    "search: absolute path id": (lambda c: c.post("/search", json={"id": "/etc/passwd"}), 400),
    "search: overlong id": (lambda c: c.post("/search", json={"id": "a" * 5000}), 400),
    "search: box with 3 numbers": (lambda c: c.post("/search", json={"id": "img001", "box": [1, 2, 3]}), 400),
    "search: inverted box": (lambda c: c.post("/search", json={"id": "img001", "box": [30, 30, 10, 10]}), 400),
    "search: box of words": (lambda c: c.post("/search", data={"id": "img001", "box": "a,b,c,d"}), 400),
    "search: NaN box": (lambda c: c.post("/search", data={"id": "img001", "box": "nan,0,10,10"}), 400),
    "search: box outside the image": (lambda c: c.post("/search", files={"image": ("q.png", png_bytes(), "image/png")},
                                                       data={"box": "1000,1000,2000,2000"}), 400),
    # --- /search: uploaded content
    "search: text disguised as .jpg": (lambda c: c.post("/search", files={"image": ("photo.jpg", TEXT_AS_JPG, "image/jpeg")}), 415),
    "search: HTML disguised as .png": (lambda c: c.post("/search", files={"image": ("x.png", b"<html><script>alert(1)</script>", "image/png")}), 415),
    "search: truncated PNG": (lambda c: c.post("/search", files={"image": ("t.png", png_bytes()[:90], "image/png")}), 400),
    "search: truncated JPEG": (lambda c: c.post("/search", files={"image": ("t.jpg", jpeg_bytes()[:200], "image/jpeg")}), 400),
    "search: empty file": (lambda c: c.post("/search", files={"image": ("e.jpg", b"", "image/jpeg")}), 400),
    "search: two images": (lambda c: c.post("/search", files=[("image", ("a.png", png_bytes(), "image/png")),
                                                              ("image", ("b.png", png_bytes(), "image/png"))]), 400),
    "search: image and id": (lambda c: c.post("/search", files={"image": ("a.png", png_bytes(), "image/png")},
                                              data={"id": "img001"}), 400),
    "search: decompression bomb": (lambda c: c.post("/search", files={"image": ("b.png", bomb_png(), "image/png")}), 413),
    "search: body over the byte limit": (lambda c: c.post("/search", files={"image": ("big.png", b"\x89PNG" + b"\0" * (3 * 1024 * 1024), "image/png")}), 413),
    "search: GET instead of POST": (lambda c: c.get("/search"), 405),
    "search: unknown re-ranker": (lambda c: c.post("/search", json={"id": "img001", "rerank": "magic"}), 400),
    "search: unknown QE": (lambda c: c.post("/search", data={"id": "img001", "qe": "lots"}), 400),
    # --- writes: tokens
    "add: no token": (lambda c: c.post("/images", files={"images": ("a.png", png_bytes(), "image/png")}), 401),
    "add: wrong token": (lambda c: c.post("/images", headers={"Authorization": "Bearer nope"},
                                          files={"images": ("a.png", png_bytes(), "image/png")}), 401),
    "add: token prefix only": (lambda c: c.post("/images", headers={"Authorization": f"Bearer {TOKEN[:-1]}"},
                                                files={"images": ("a.png", png_bytes(), "image/png")}), 401),
    "add: Basic scheme": (lambda c: c.post("/images", headers={"Authorization": f"Basic {TOKEN}"},
                                           files={"images": ("a.png", png_bytes(), "image/png")}), 401),
    "delete: no token": (lambda c: c.delete("/images/img001"), 401),
    "delete: wrong token": (lambda c: c.delete("/images/img001", headers={"Authorization": "Bearer x"}), 401),
    # --- writes: content
    "add: empty multipart": (lambda c: c.post("/images", headers=AUTH, files={}, data={"ids": "a"}), 400),
    "add: JSON instead of multipart": (lambda c: c.post("/images", headers=AUTH, json={"images": ["x"]}), 400),
    "add: text disguised as .jpg": (lambda c: c.post("/images", headers=AUTH, data={"ids": "fake"},
                                                     files={"images": ("a.jpg", TEXT_AS_JPG, "image/jpeg")}), 415),
    "add: traversal id": (lambda c: c.post("/images", headers=AUTH, data={"ids": "../evil"},
                                           files={"images": ("a.png", png_bytes(), "image/png")}), 400),
    "add: dot-file id": (lambda c: c.post("/images", headers=AUTH, data={"ids": ".hidden"},
                                          files={"images": ("a.png", png_bytes(), "image/png")}), 400),
    "add: id count mismatch": (lambda c: c.post("/images", headers=AUTH, data={"ids": "a,b"},
                                                files={"images": ("a.png", png_bytes(), "image/png")}), 400),
    "add: duplicate ids": (lambda c: c.post("/images", headers=AUTH, data={"ids": "d,d"},
                                            files=[("images", ("a.png", png_bytes(1), "image/png")),
                                                   ("images", ("b.png", png_bytes(2), "image/png"))]), 400),
    "add: id already indexed": (lambda c: c.post("/images", headers=AUTH, data={"ids": "img001"},
                                                 files={"images": ("a.png", png_bytes(), "image/png")}), 409),
    "add: too many images": (lambda c: c.post("/images", headers=AUTH,
                                              files=[("images", (f"{i}.png", png_bytes(i), "image/png")) for i in range(4)]), 413),
    "add: chunked body over the limit": (_chunked_oversize, 413),
    # --- ids in URLs
    "delete: unknown id": (lambda c: c.delete("/images/not-there", headers=AUTH), 404),
    "delete: encoded traversal %2e%2e%2f": (lambda c: c.delete("/images/%2e%2e%2fstore%2fmanifest.json", headers=AUTH), 400),
    "thumbnail: unknown id": (lambda c: c.get("/images/unknown/thumbnail"), 404),
    "thumbnail: encoded ..": (lambda c: c.get("/images/%2e%2e/thumbnail"), 400),
    "thumbnail: encoded ../../etc/passwd": (lambda c: c.get("/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd/thumbnail"), 400),
    "thumbnail: backslash id": (lambda c: c.get("/images/a%5c..%5cb/thumbnail"), 400),
    "thumbnail: NUL in id": (lambda c: c.get("/images/img001%00.png/thumbnail"), 400),
    "thumbnail: double slash": (lambda c: c.get("/images/a//b/thumbnail"), 400),
    "explain: missing query": (lambda c: c.get("/images/img001/explain"), 400),
    "explain: unknown query": (lambda c: c.get("/images/img001/explain", params={"query": "zzz"}), 404),
    "explain: traversal query": (lambda c: c.get("/images/img001/explain", params={"query": "../x"}), 400),
    "explain: POST text as image": (lambda c: c.post("/images/img001/explain", files={"image": ("a.jpg", TEXT_AS_JPG, "image/jpeg")}), 415),
    "explain: bad box": (lambda c: c.get("/images/img001/explain", params={"query": "img000", "box": "1,2"}), 400),
    "unknown endpoint": (lambda c: c.get("/admin"), 404),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_request_gets_4xx_json(client, name):
    send, status = HOSTILE[name]
    assert_json_error(send(client), status)


def test_hostile_requests_changed_nothing(served):
    client, root = served
    stats = client.get("/stats").json()
    assert stats["images"] == 10 and stats["index"]["ntotal"] == 10
    uploads = root / "store" / "uploads"
    stored = set(client.app.state.engine.store.paths)
    assert not uploads.exists() or all(str(p.resolve()) in stored for p in uploads.iterdir())  # no stray files
    ids = {h["id"] for h in client.post("/search", json={"id": "img000", "k": 50}).json()["results"]}
    assert ids == {f"img{i:03d}" for i in range(10)}


def test_read_only_server_refuses_writes(served):
    _, root = served
    with TestClient(create_app(root / "store", limits=LIMITS)) as c:
        msg = assert_json_error(c.delete("/images/img001", headers=AUTH), 401)
        assert "--token" in msg


# -------------------------------------------------------------------------------- concurrency

def test_concurrent_searches_during_adds(client):
    errors: list[str] = []
    done = threading.Event()
    counts = {"search": 0}

    def searcher(seed: int) -> None:
        while not done.is_set():
            r = client.post("/search", files={"image": ("q.png", png_bytes(seed), "image/png")},
                            data={"k": "5", "rerank": "true" if seed % 2 else "false"})
            if r.status_code != 200:
                errors.append(f"search {r.status_code}: {r.text}")
            counts["search"] += 1

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(5):
            r = client.post("/images", headers=AUTH, data={"ids": f"conc{i}"},
                            files={"images": ("a.png", png_bytes(200 + i), "image/png")})
            if r.status_code != 201:
                errors.append(f"add {r.status_code}: {r.text}")
        r = client.delete("/images/conc0", headers=AUTH)
        if r.status_code != 200:
            errors.append(f"delete {r.status_code}: {r.text}")
    finally:
        time.sleep(0.2)
        done.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    assert counts["search"] >= 3
    assert client.get("/health").json()["images"] == 14
    for i in range(1, 5):
        assert client.delete(f"/images/conc{i}", headers=AUTH).status_code == 200


def test_pool_refuses_when_full():
    pool = InferencePool(workers=1, queue=1)
    gate = threading.Event()

    async def main():
        first = asyncio.ensure_future(pool.run(gate.wait, 5))
        second = asyncio.ensure_future(pool.run(gate.wait, 5))
        await asyncio.sleep(0.05)
        with pytest.raises(Busy):
            await pool.run(time.sleep, 0)
        gate.set()
        await asyncio.gather(first, second)

    asyncio.run(main())
    assert pool.rejected == 1 and pool.pending == 0
    pool.shutdown()


def test_rwlock_writer_excludes_readers():
    lock = RWLock()
    inside: list[str] = []

    def reader():
        with lock.read():
            inside.append("r")
            time.sleep(0.02)
            inside.append("R")

    def writer():
        with lock.write():
            inside.append("w")
            time.sleep(0.02)
            inside.append("W")

    ts = [threading.Thread(target=f) for f in (reader, writer, reader, writer, reader)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    text = "".join(inside)
    assert "wW" in text and text.count("w") == 2
    for i, ch in enumerate(text):      # nothing happens between a writer's enter and exit
        if ch == "w":
            assert text[i + 1] == "W"
