"""A Milvus collection as the index of a store, for collections past one machine.

Why Milvus: a distributed vector database (sharded, replicated, served) that engineers already run;
Milvus Lite (``milvus-lite``) is the same API in a local file, which the tests use. pymilvus is an
optional extra (``pip install 'irkit[milvus]'``), imported lazily so ``import irkit`` never needs it.

Same face as :class:`irkit.search.index.Index` where callers meet it: ``search(q, k)`` returns
(scores [nq, k] float32, rows [nq, k] int64 of the attached store, -1 / -inf for missing), scores
are inner products (the collection's metric is IP, as faiss's); ``add(vectors, ids)`` and
``remove(ids)`` go to the collection by image id; ``sync(store)`` brings it up to date; ``ntotal``,
``dim``, ``describe()``. Primary keys are irkit's stable id keys (:func:`irkit.search.index.id_keys`),
so store row renumbering never invalidates the collection; the image id is stored beside its key.

What a store's collection is lives in ``STORE_DIR/index.milvus.json`` (backend, URI, collection,
index type, dim, metric, the store's fingerprint): :func:`open_milvus_index` reads it.
Every call to the server is retried with exponential backoff; an unreachable server, or a
collection of another dimension or metric, is a StoreError that says what to do.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from irkit.errors import ConfigError, StoreError
from irkit.search.index import KeyRows, as_queries, best_first, store_fingerprint, id_keys
from irkit.utils import atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    from irkit.store import FeatureStore

log = logging.getLogger(__name__)

SIDECAR_NAME = "index.milvus.json"
DEFAULT_LITE_NAME = "milvus.db"
KEY_FIELD, ID_FIELD, VECTOR_FIELD = "key", "image_id", "vector"
MAX_ID_LENGTH = 1024
INSERT_BATCH = 2000
RETRIES = 4
BACKOFF_S = 0.5
#: build parameters per Milvus index type (search parameters are given per search)
BUILD_PARAMS: dict[str, dict] = {"FLAT": {}, "HNSW": {"M": 32, "efConstruction": 200},
                                 "IVF_FLAT": {"nlist": 1024}, "IVF_SQ8": {"nlist": 1024},
                                 "IVF_PQ": {"nlist": 1024, "m": 64, "nbits": 8}, "HNSW_SQ": {"M": 32}}
DEFAULT_SEARCH = {"HNSW": {"ef": 128}, "HNSW_SQ": {"ef": 128}, "IVF_FLAT": {"nprobe": 32},
                  "IVF_SQ8": {"nprobe": 32}, "IVF_PQ": {"nprobe": 32}}


def _pymilvus():
    try:  # lazy: an optional extra, and importing it starts gRPC machinery
        import pymilvus
    except ImportError:
        raise ConfigError("the Milvus backend needs pymilvus (and milvus-lite for a local file): "
                          "pip install 'irkit[milvus]'") from None
    return pymilvus


def is_lite_uri(uri: str) -> bool:
    """A Milvus Lite file (``./irkit.db``) rather than a server (``http://host:19530``)."""
    return not re.match(r"^[a-z][a-z0-9+.-]*://", str(uri))


def default_collection_name(store: "FeatureStore") -> str:
    """``irkit_<model>_<store uid>``, with the characters Milvus refuses replaced."""
    name = f"irkit_{store.meta['model']}_{str(store.uid)[:12]}"
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _retry(what: str, fn: Callable[[], Any], uri: str, retries: int = RETRIES, backoff: float = BACKOFF_S) -> Any:
    """Call ``fn``, retrying transient failures with exponential backoff; StoreError after the last."""
    pm = _pymilvus()
    delay = backoff
    for attempt in range(retries):
        try:
            return fn()
        except (pm.exceptions.MilvusException, ConnectionError, TimeoutError, OSError) as exc:
            if isinstance(exc, pm.exceptions.MilvusException) and _is_permanent(exc):
                raise StoreError(f"Milvus at {uri}: {what} failed: {_msg(exc)}") from None
            if attempt == retries - 1:
                raise StoreError(f"Milvus at {uri}: {what} failed after {retries} attempts ({_msg(exc)}); "
                                 "is the server running and reachable?") from None
            log.warning("Milvus %s failed (%s); retrying in %.1fs", what, _msg(exc), delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


def _is_permanent(exc: Exception) -> bool:
    """Errors a retry cannot fix (bad parameters, schema, missing collection)."""
    text = str(exc).lower()
    return any(w in text for w in ("invalid", "not exist", "not found", "dimension", "mismatch", "illegal",
                                   "unsupported", "duplicate"))


def _msg(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def connect(uri: str, token: str | None = None, timeout: float = 10.0, retries: int = RETRIES) -> Any:
    """A MilvusClient for ``uri``; StoreError (with what to do) when it cannot be reached."""
    pm = _pymilvus()
    if is_lite_uri(uri):
        if importlib.util.find_spec("milvus_lite") is None:  # the embedded engine behind a file URI
            raise ConfigError(f"{uri} is a Milvus Lite file, which needs milvus-lite: "
                              "pip install 'irkit[milvus]' (or give a server URI http://host:19530)")
        Path(uri).expanduser().parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"uri": str(uri), "timeout": timeout}
    if token:
        kwargs["token"] = token
    last: Exception | None = None
    delay = BACKOFF_S
    tries = 1 if is_lite_uri(uri) else max(1, int(retries))
    for attempt in range(tries):
        try:
            return pm.MilvusClient(**kwargs)
        except Exception as exc:  # pymilvus raises MilvusException, grpc errors or plain ones here
            last = exc
            if attempt < tries - 1:
                time.sleep(delay)
                delay *= 2
    raise StoreError(f"cannot reach Milvus at {uri} ({_msg(last) if last else 'unknown error'}); start the "
                     "server (or check the URI, port and --token), or use a Milvus Lite file such as ./irkit.db")


class MilvusIndex:
    """A store's vectors in a Milvus collection (inner product), searched in store rows."""

    backend = "milvus"

    def __init__(self, client: Any, uri: str, collection: str, dim: int, *, index_type: str = "FLAT",
                 search_params: dict | None = None, meta: dict | None = None) -> None:
        self.client, self.uri, self.collection, self._dim = client, str(uri), collection, int(dim)
        self.index_type = index_type.upper()
        self.search_params = dict(DEFAULT_SEARCH.get(self.index_type, {}) if search_params is None else search_params)
        self.meta: dict = dict(meta or {})
        self._vectors: Any = None
        self._key_rows = KeyRows()
        self.counters = {"adds": 0, "removes": 0}

    # ------------------------------------------------------------------ collection
    @classmethod
    def open(cls, uri: str, collection: str, dim: int, *, index_type: str = "FLAT", create: bool = True,
             token: str | None = None, build_params: dict | None = None, search_params: dict | None = None,
             timeout: float = 10.0, retries: int = RETRIES) -> "MilvusIndex":
        """Open ``collection`` at ``uri`` (created with an IP index of ``index_type`` when absent and
        ``create``); StoreError when it exists with another dimension, metric or schema."""
        index_type = index_type.upper()
        if index_type not in BUILD_PARAMS:
            raise ConfigError(f"unknown Milvus index type {index_type!r}; use one of {', '.join(BUILD_PARAMS)}")
        if int(dim) <= 0:
            raise ConfigError(f"dim must be positive, got {dim}")
        client = connect(uri, token, timeout=timeout, retries=retries)
        self = cls(client, uri, collection, dim, index_type=index_type, search_params=search_params)
        exists = _retry("has_collection", lambda: client.has_collection(collection), uri)
        if exists:
            self._check_schema()
        elif not create:
            raise StoreError(f"Milvus at {uri} has no collection {collection!r}; build it with "
                             f"`irkit index STORE --backend milvus --uri {uri} --collection {collection}`")
        else:
            self._create(build_params)
        _retry("load_collection", lambda: client.load_collection(collection), uri)
        return self

    def _create(self, build_params: dict | None) -> None:
        pm = _pymilvus()
        schema = pm.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(KEY_FIELD, pm.DataType.INT64, is_primary=True)
        schema.add_field(ID_FIELD, pm.DataType.VARCHAR, max_length=MAX_ID_LENGTH)
        schema.add_field(VECTOR_FIELD, pm.DataType.FLOAT_VECTOR, dim=self._dim)
        params = self.client.prepare_index_params()
        params.add_index(field_name=VECTOR_FIELD, index_type=self.index_type, metric_type="IP",
                         params=dict(BUILD_PARAMS[self.index_type], **(build_params or {})))
        _retry("create_collection", lambda: self.client.create_collection(
            self.collection, schema=schema, index_params=params, consistency_level="Strong"), self.uri)
        log.info("created Milvus collection %s at %s (dim %d, %s, IP)", self.collection, self.uri, self._dim,
                 self.index_type)

    def _check_schema(self) -> None:
        desc = _retry("describe_collection", lambda: self.client.describe_collection(self.collection), self.uri)
        fields = {f["name"]: f for f in desc.get("fields", [])}
        vec = fields.get(VECTOR_FIELD)
        if vec is None or KEY_FIELD not in fields:
            raise StoreError(f"Milvus collection {self.collection!r} at {self.uri} was not made by irkit (fields "
                             f"{sorted(fields)}); give another --collection")
        dim = int(vec.get("params", {}).get("dim", -1))
        if dim != self._dim:
            raise StoreError(f"Milvus collection {self.collection!r} at {self.uri} holds {dim}-D vectors, the store "
                             f"has {self._dim}-D; give another --collection or drop that one")
        try:
            idx = self.client.describe_index(self.collection, VECTOR_FIELD) or {}
        except Exception:  # no index yet: nothing to compare
            idx = {}
        metric = str(idx.get("metric_type", "IP")).upper()
        if metric != "IP":
            raise StoreError(f"Milvus collection {self.collection!r} at {self.uri} uses metric {metric}; irkit's "
                             "descriptors are compared by inner product (IP): give another --collection")
        if idx.get("index_type"):
            self.index_type = str(idx["index_type"]).upper()
            if not self.search_params:
                self.search_params = dict(DEFAULT_SEARCH.get(self.index_type, {}))

    def flush(self) -> None:
        """Seal what was inserted (a server then indexes it; Milvus Lite writes it to its file)."""
        _retry("flush", lambda: self.client.flush(self.collection), self.uri)

    def drop(self) -> None:
        """Delete the collection on the server."""
        _retry("drop_collection", lambda: self.client.drop_collection(self.collection), self.uri)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a dead connection is not worth an error
            pass

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        stats = _retry("get_collection_stats", lambda: self.client.get_collection_stats(self.collection), self.uri)
        return int(stats.get("row_count", 0))

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return f"MilvusIndex({self.collection!r} at {self.uri!r}, dim={self.dim}, {self.index_type})"

    def describe(self) -> dict[str, Any]:
        return {"backend": "milvus", "uri": self.uri, "collection": self.collection, "dim": self.dim,
                "ntotal": self.ntotal, "index_type": self.index_type, "metric": "IP",
                "search_params": dict(self.search_params), "counters": dict(self.counters)}

    # ------------------------------------------------------------------ rows of a store
    def attach(self, vectors: Any, ids: Sequence[str] | None = None) -> None:
        """The store (or ids of array rows) whose row numbers searches answer in."""
        if ids is None and not (hasattr(vectors, "ids") and hasattr(vectors, "uid")):
            raise ConfigError("attach a FeatureStore, or give the ids of the array rows")
        self._vectors = vectors
        self._refresh_rows(ids)

    def _refresh_rows(self, ids: Sequence[str] | None = None) -> None:
        v = self._vectors
        if ids is not None:
            self._key_rows.update(ids, ("static", len(ids)))
        elif v is not None and hasattr(v, "uid"):
            self._key_rows.update(v.ids, (v.uid, v.generation, len(v)))

    # ------------------------------------------------------------------ add / remove / search
    def add(self, vectors: np.ndarray, ids: Sequence[str], batch_size: int = INSERT_BATCH,
            progress: bool = False) -> None:
        """Insert (or overwrite: upsert) vectors under their image ids, in batches."""
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ConfigError(f"vectors must have shape [n, {self.dim}], got {tuple(x.shape)}")
        if len(ids) != len(x):
            raise ConfigError(f"{len(ids)} ids for {len(x)} vectors; give one id per vector")
        too_long = [i for i in ids if len(str(i).encode("utf-8")) > MAX_ID_LENGTH]
        if too_long:
            raise ConfigError(f"image id longer than {MAX_ID_LENGTH} bytes: {too_long[0][:80]!r}...")
        keys = id_keys(ids)
        for s in tqdm(range(0, len(x), batch_size), desc=f"milvus {self.collection}", unit="batch",
                      disable=not progress or len(x) <= batch_size):
            rows = [{KEY_FIELD: int(k), ID_FIELD: str(i), VECTOR_FIELD: v.tolist()}
                    for k, i, v in zip(keys[s:s + batch_size], ids[s:s + batch_size], x[s:s + batch_size])]
            _retry("upsert", lambda rows=rows: self.client.upsert(self.collection, rows), self.uri)
        self.counters["adds"] += 1

    def remove(self, ids: Sequence[str], batch_size: int = INSERT_BATCH) -> int:
        """Delete by image id; returns how many were in the collection."""
        keys = np.unique(id_keys(list(ids)))
        removed = 0
        for s in range(0, len(keys), batch_size):
            part = [int(k) for k in keys[s:s + batch_size]]
            have = _retry("query", lambda part=part: self.client.query(
                self.collection, filter=f"{KEY_FIELD} in {part}", output_fields=[KEY_FIELD]), self.uri)
            if have:
                _retry("delete", lambda h=have: self.client.delete(self.collection, ids=[int(r[KEY_FIELD]) for r in h]),
                       self.uri)
                removed += len(have)
        self.counters["removes"] += 1
        return removed

    def stored_keys(self, batch_size: int = 16384) -> np.ndarray:
        """Every primary key in the collection (paged through a query iterator)."""
        out: list[int] = []
        it = _retry("query_iterator", lambda: self.client.query_iterator(
            self.collection, batch_size=batch_size, filter="", output_fields=[KEY_FIELD]), self.uri)
        try:
            while True:
                page = _retry("query_iterator.next", it.next, self.uri)
                if not page:
                    break
                out.extend(int(r[KEY_FIELD]) for r in page)
        finally:
            it.close()
        return np.asarray(out, dtype=np.int64)

    def search(self, q: np.ndarray, k: int, *, rescore: bool = False, rescore_k: int = 1000,
               batch_size: int = 256, search_params: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores [nq, k] float32, store rows [nq, k] int64), best first;
        -inf / -1 where missing (fewer vectors, ids no longer in the store). ``rescore`` re-scores
        ``max(k, rescore_k)`` candidates exactly with the attached store's vectors."""
        q = as_queries(q, self.dim)
        k = int(k)
        if k <= 0:
            raise ConfigError(f"k must be positive, got {k}")
        if self._vectors is None and not len(self._key_rows.keys):
            raise ConfigError("a Milvus index answers in store rows: attach its store first (index.attach(store))")
        if rescore and not hasattr(self._vectors, "take"):
            raise ConfigError("rescore=True needs the attached store's vectors")
        self._refresh_rows()
        kk = max(k, int(rescore_k)) if rescore else k
        if kk > 16384:
            raise ConfigError(f"Milvus returns at most 16384 results per query, {kk} asked")
        params = {"metric_type": "IP", "params": dict(self.search_params, **(search_params or {}))}
        if "ef" in params["params"]:
            params["params"]["ef"] = max(int(params["params"]["ef"]), kk)
        scores = np.full((q.shape[0], kk), -np.inf, dtype=np.float32)
        keys = np.full((q.shape[0], kk), -1, dtype=np.int64)
        for s in range(0, q.shape[0], batch_size):
            block = q[s:s + batch_size]
            res = _retry("search", lambda b=block: self.client.search(
                self.collection, data=b.tolist(), limit=kk, anns_field=VECTOR_FIELD, search_params=params,
                output_fields=[KEY_FIELD]), self.uri)
            for i, hits in enumerate(res):
                for j, h in enumerate(hits[:kk]):
                    keys[s + i, j] = int(h.get("id", h.get(KEY_FIELD)))
                    scores[s + i, j] = float(h["distance"])
        rows = self._key_rows.rows(keys)
        scores, rows = best_first(scores, rows, kk)
        if rescore:
            exact = np.full(rows.shape, -np.inf, dtype=np.float32)
            for i in range(rows.shape[0]):
                valid = np.flatnonzero(rows[i] >= 0)
                if len(valid):
                    exact[i, valid] = self._vectors.take(rows[i, valid]) @ q[i]
            scores, rows = best_first(exact, rows, kk)
        return scores[:, :k], rows[:, :k]

    def sync(self, store: "FeatureStore", batch_size: int = INSERT_BATCH) -> tuple[int, int]:
        """Add the store's images the collection lacks, delete those that left the store."""
        self.attach(store)
        have = self.stored_keys()
        want = self._key_rows.keys
        extra = have[~np.isin(have, want)]
        if len(extra):
            for s in range(0, len(extra), batch_size):
                part = [int(k) for k in extra[s:s + batch_size]]
                _retry("delete", lambda part=part: self.client.delete(self.collection, ids=part), self.uri)
            self.counters["removes"] += 1
        missing = np.flatnonzero(~np.isin(want, have))
        ids = store.ids
        for s in tqdm(range(0, len(missing), 65536), desc="milvus sync", unit="block", disable=len(missing) <= 65536):
            rows = missing[s:s + 65536]
            self.add(store.take(rows), [ids[r] for r in rows], batch_size=batch_size)
        if len(missing) or len(extra):
            log.info("Milvus collection %s synced with %s: %d added, %d removed", self.collection, store.root,
                     len(missing), len(extra))
        return int(len(missing)), int(len(extra))


# ---------------------------------------------------------------------- a store's collection
def sidecar_path(store: "FeatureStore") -> Path:
    return Path(store.root) / SIDECAR_NAME


def build_milvus_index(store: "FeatureStore", *, uri: str | None = None, collection: str | None = None,
                       index_type: str = "FLAT", token: str | None = None, build_params: dict | None = None,
                       search_params: dict | None = None, progress: bool = True) -> MilvusIndex:
    """Put a store's vectors into a Milvus collection (created if absent, brought up to date if it
    exists) and record it in ``STORE_DIR/index.milvus.json``. ``uri`` defaults to the Milvus Lite
    file ``STORE_DIR/milvus.db``; the token is not written to the sidecar."""
    if len(store) == 0:
        raise StoreError(f"store {store.root} is empty; extract features into it before indexing")
    uri = str(uri or Path(store.root) / DEFAULT_LITE_NAME)
    collection = collection or default_collection_name(store)
    index = MilvusIndex.open(uri, collection, store.dim, index_type=index_type, token=token,
                             build_params=build_params, search_params=search_params)
    index.attach(store)
    have = index.stored_keys()
    if len(have):
        index.sync(store)
    else:
        ids = store.ids
        for start, block in tqdm(store.iter_descriptors(65536), total=-(-len(store) // 65536),
                                 desc=f"milvus {collection}", unit="block", disable=not progress or len(store) <= 65536):
            index.add(block, ids[start:start + len(block)])
    index.flush()
    atomic_write_json(sidecar_path(store), {
        "format": "irkit-index", "backend": "milvus", "version": 1, "uri": uri, "collection": collection,
        "index_type": index.index_type, "dim": store.dim, "metric": "IP", "search_params": index.search_params,
        "ntotal": len(store), "store": store_fingerprint(store), "saved": time.time()})
    return index


def open_milvus_index(store: "FeatureStore", *, token: str | None = None, sync: bool = True) -> MilvusIndex:
    """The Milvus index recorded for ``store`` (``STORE_DIR/index.milvus.json``), attached to the store
    and, with ``sync``, brought up to date with it (the stale-store check of a faiss index)."""
    path = sidecar_path(store)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"store {store.root} has no Milvus index; build it with "
                         f"`irkit index {store.root} --backend milvus --uri URI`") from None
    except ValueError as exc:
        raise StoreError(f"cannot read {path}: {exc}; rebuild the Milvus index") from None
    fp = meta.get("store", {})
    if fp.get("uid") != store.uid or fp.get("config_hash") != store.meta["config_hash"]:
        raise StoreError(f"the Milvus index recorded in {path} was built from another store; rebuild it with "
                         f"`irkit index {store.root} --backend milvus`")
    index = MilvusIndex.open(meta["uri"], meta["collection"], int(meta["dim"]), index_type=meta["index_type"],
                             create=False, token=token, search_params=meta.get("search_params"))
    index.meta = meta
    if sync:
        index.sync(store)
    else:
        index.attach(store)
    return index


def has_milvus_index(store: "FeatureStore") -> bool:
    return sidecar_path(store).exists()


__all__ = ["MilvusIndex", "build_milvus_index", "open_milvus_index", "has_milvus_index", "connect",
           "is_lite_uri", "default_collection_name", "BUILD_PARAMS"]
