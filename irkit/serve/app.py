"""The HTTP service: FastAPI routes over :class:`irkit.serve.engine.Engine`.

Thin by design (DESIGN.md: the HTTP service is a layer over library functions): routes parse and
check the request, run model work in the bounded inference pool, and turn every user mistake into
a 4xx ``{"error": "..."}``. The bearer token guards every write. See ``docs`` at ``/docs``.

Under load, model work waits in one FIFO queue with a deadline (503 + ``Retry-After`` only past
it); request bodies are read by pure ASGI middleware with a size limit and a deadline, so slow or
vanishing clients cost no traceback and no inference slot. A store directory the server cannot
write is served read-only (searches work; adds/removals get 403), and a full disk during an add
is a 507 that changes nothing.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from irkit.errors import IrkitError
from irkit.models.base import GlobalModel
from irkit.models.registry import build_model
from irkit.serve.concurrency import ClientGone, InferencePool
from irkit.search.engine import QE_METHODS, RERANK_METHODS, SearchOptions
from irkit.serve.engine import QE_TRUE, RERANK_TRUE, Engine, Limits, Query, thumbnail_url
from irkit.serve.errors import BadRequest, Busy, Forbidden, PayloadTooLarge, status_of, storage_error
from irkit.serve.requests import as_box, as_int, as_method, as_str
from irkit.store import FeatureStore
from irkit.serve.safety import (BodyLimitMiddleware, SecurityHeadersMiddleware, check_id, check_token,
                                decode_upload)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
FILE_FIELDS = ("image", "images", "file", "files")
MAX_FORM_FIELDS = 200

_ERROR = {"content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}}}}
_ERRORS = {400: {"description": "bad request", **_ERROR}, 408: {"description": "body too slow", **_ERROR},
           413: {"description": "too large", **_ERROR}, 415: {"description": "not an image", **_ERROR},
           503: {"description": "busy: queue full or queue deadline passed; see Retry-After", **_ERROR}}
_WRITE_ERRORS = {**_ERRORS, 401: {"description": "token", **_ERROR},
                 403: {"description": "store is read-only", **_ERROR},
                 507: {"description": "disk full; nothing changed", **_ERROR}}
_SEARCH_BODY = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "string", "format": "binary", "description": "query image (or give id)"},
        "id": {"type": "string", "description": "id of an indexed image to use as the query"},
        "k": {"type": "integer", "default": 10}, "rerank": {"type": "boolean", "default": False},
        "qe": {"type": "boolean", "default": False},
        "box": {"type": "string", "description": "crop x1,y1,x2,y2 in query pixels"}}}},
    "application/json": {"schema": {"type": "object", "properties": {
        "id": {"type": "string"}, "k": {"type": "integer", "default": 10},
        "rerank": {"type": "boolean"}, "qe": {"type": "boolean"},
        "box": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4}},
        "required": ["id"]}}}, "required": True}}
_ADD_BODY = {"requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object", "properties": {
    "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
    "ids": {"type": "string", "description": "optional ids, one per image, comma-separated or repeated"}},
    "required": ["images"]}}}, "required": True}}
_EXPLAIN_BODY = {"requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object", "properties": {
    "image": {"type": "string", "format": "binary"}, "query": {"type": "string"},
    "box": {"type": "string"}}}}}}}


def create_app(store_dir: str | Path, model: GlobalModel | str | None = None, token: str | None = None, *,
               weights: str | Path | None = None, device: str = "cpu", limits: Limits | None = None,
               workers: int = 2, queue: int = 128, queue_timeout: float = 5.0, body_timeout: float = 30.0,
               index_factory: str | None = None, options: SearchOptions | None = None) -> FastAPI:
    """The service over the feature store at ``store_dir``.

    ``model``: a loaded GlobalModel, a preset name, or None for the preset the store records
    (``weights`` then loads that preset's checkpoint). ``token``: bearer token required by writes
    (None = read-only server). ``workers``/``queue``/``queue_timeout``: inference threads, how many
    more requests may wait for one (FIFO) and for how long before 503. ``body_timeout``: seconds a
    client has to deliver its request body (else 408)."""
    limits = limits or Limits()
    if not isinstance(model, GlobalModel):
        name = model or FeatureStore.open(store_dir).meta.get("model")
        model = build_model(name, weights=weights, device=device)
    read_only = _unwritable(Path(store_dir))
    if read_only:
        log.warning("store %s is read-only (%s): serving searches only; adds and removals are refused",
                    store_dir, read_only)
    engine = Engine(store_dir, model, limits, index_factory=index_factory, options=options)
    pool = InferencePool(workers, queue, queue_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        pool.shutdown()
        engine.close()

    app = FastAPI(title="irkit", version="0.1.0", lifespan=lifespan,
                  description="Instance-level image retrieval: search by image or id, add and remove images, "
                              "thumbnails and CVNet match explanations. Errors are JSON `{\"error\": ...}`.")
    app.state.engine = engine
    app.state.pool = pool
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes, timeout=body_timeout)
    app.add_middleware(SecurityHeadersMiddleware)   # outermost: 408/413 answers get it too
    _install_error_handlers(app)

    def check_writable(request: Request) -> None:
        check_token(token, request.headers.get("authorization"))
        if read_only:
            raise Forbidden(f"this server's store directory is read-only ({read_only}): adds and removals are "
                            "disabled; searches work")

    # -------------------------------------------------------------------- page + meta
    @app.get("/", include_in_schema=False)
    def index_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health", tags=["meta"])
    def health() -> dict[str, Any]:
        """Liveness: the index answers."""
        return {"status": "ok", "images": len(engine)}

    @app.get("/stats", tags=["meta"])
    def stats() -> dict[str, Any]:
        """Store, model, index and request counters."""
        return {**engine.stats(), "pool": pool.stats(), "limits": vars(limits),
                "body_timeout_s": body_timeout, "read_only": bool(read_only), "read_only_reason": read_only,
                "writes_enabled": token is not None and not read_only}

    # -------------------------------------------------------------------- search
    @app.post("/search", tags=["search"], responses=_ERRORS, openapi_extra=_SEARCH_BODY)
    async def search(request: Request) -> dict[str, Any]:
        """Rank the index for an uploaded image (multipart ``image``) or an indexed ``id``.

        Fields: ``k`` (1..max_k), ``rerank`` and ``qe`` (booleans), ``box`` (crop x1,y1,x2,y2)."""
        fields, files = await _read_body(request)
        upload = _one_file(files, "image")
        image_id = as_str(fields.get("id"), "id")
        if upload is None and image_id is None:
            raise BadRequest("give a query: upload an image file (field 'image') or the id of an indexed image "
                             "(field 'id')")
        if upload is not None and image_id is not None:
            raise BadRequest("give either an image or an id as the query, not both")
        if image_id is not None:
            check_id(image_id)
        query = Query(id=image_id, box=as_box(fields.get("box")), k=engine.check_k(as_int(fields.get("k"), "k", 10)),
                      rerank=as_method(fields.get("rerank"), "rerank", RERANK_METHODS, RERANK_TRUE),
                      qe=as_method(fields.get("qe"), "qe", QE_METHODS, QE_TRUE))
        data = upload[1] if upload else None

        def job():
            if data is not None:
                query.image = decode_upload(data, upload[0], limits.max_pixels)[0]
            return engine.search(query).as_dict()

        result = await pool.run(job, gone=_disconnected(request))
        result["query"] = {"id": image_id, "box": query.box, "k": query.k}
        return result

    # -------------------------------------------------------------------- writes
    @app.post("/images", tags=["images"], status_code=201, openapi_extra=_ADD_BODY,
              responses={**_WRITE_ERRORS, 409: {"description": "id taken", **_ERROR}})
    async def add_images(request: Request) -> dict[str, Any]:
        """Add images (multipart files ``images``, optional ``ids``); needs ``Authorization: Bearer``."""
        check_writable(request)
        fields, files = await _read_body(request, form_only=True)
        uploads = [f for name in FILE_FIELDS for f in files.get(name, [])]
        if not uploads:
            raise BadRequest("no image files in the request: send multipart/form-data with one or more "
                             "'images' file fields")
        if len(uploads) > limits.max_images_per_add:
            raise PayloadTooLarge(f"{len(uploads)} images in one request; the limit is {limits.max_images_per_add}")
        ids = _ids_from(fields, len(uploads))
        for i in ids:
            check_id(i)

        def job():
            decoded = []
            for image_id, (name, data) in zip(ids, uploads):
                pixels, fmt = decode_upload(data, name, limits.max_pixels)
                decoded.append((image_id, data, pixels, fmt))
            return engine.add(decoded)

        added = await pool.run(job, gone=_disconnected(request))
        return {"added": [{"id": i, "thumbnail": thumbnail_url(i)} for i in added], "images": len(engine)}

    @app.delete("/images/{image_id:path}", tags=["images"],
                responses={**_WRITE_ERRORS, 404: {"description": "unknown", **_ERROR}})
    def delete_image(image_id: str, request: Request) -> dict[str, Any]:
        """Remove an image from the index (and its uploaded file, if this server stored it)."""
        check_writable(request)
        check_id(image_id)
        engine.remove(image_id)
        return {"removed": image_id, "images": len(engine)}

    # -------------------------------------------------------------------- pictures
    @app.get("/images/{image_id:path}/thumbnail", tags=["images"], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "unknown", **_ERROR}})
    def thumbnail(image_id: str) -> Response:
        """JPEG thumbnail of an indexed image."""
        check_id(image_id)
        return Response(engine.thumbnail(image_id), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=300"})

    @app.get("/images/{image_id:path}/explain", tags=["images"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}, 501: {"description": "no re-ranker", **_ERROR}})
    async def explain_get(image_id: str, request: Request, query: str | None = None,
                          box: str | None = None) -> Response:
        """Picture of the CVNet correspondences between the indexed image ``query`` and ``image_id``."""
        check_id(image_id)
        if query is None:
            raise BadRequest("give the query image id as ?query=<id> (or POST an image to this URL)")
        check_id(query, "query")
        qbox = as_box(box)
        png = await pool.run(engine.explain, image_id, query, None, qbox, gone=_disconnected(request))
        return Response(png, media_type="image/png")

    @app.post("/images/{image_id:path}/explain", tags=["images"], response_class=Response,
              openapi_extra=_EXPLAIN_BODY,
              responses={200: {"content": {"image/png": {}}}, 501: {"description": "no re-ranker", **_ERROR}})
    async def explain_post(image_id: str, request: Request) -> Response:
        """Like the GET variant, with an uploaded query image (multipart ``image``, optional ``box``)."""
        check_id(image_id)
        fields, files = await _read_body(request)
        upload = _one_file(files, "image")
        qid = as_str(fields.get("query"), "query")
        if qid is not None:
            check_id(qid, "query")
        if upload is None and qid is None:
            raise BadRequest("give the query: upload an image (field 'image') or an indexed id (field 'query')")
        qbox = as_box(fields.get("box"))

        def job():
            pixels = decode_upload(upload[1], upload[0], limits.max_pixels)[0] if upload else None
            return engine.explain(image_id, qid if pixels is None else None, pixels, qbox)

        return Response(await pool.run(job, gone=_disconnected(request)), media_type="image/png")

    return app


# ------------------------------------------------------------------------------------ helpers

def _unwritable(store_dir: Path) -> str | None:
    """Why the server cannot write ``store_dir`` (None if it can): probed by creating a file.

    A probe, not ``os.access``: root passes permission checks but not a read-only mount."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".irkit-write-probe-", dir=store_dir)
    except OSError as exc:
        return f"cannot create files in {store_dir}: {exc.strerror or exc}"
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return None


def _disconnected(request: Request):
    """Awaitable factory that completes when the client of ``request`` disconnects (body already read)."""

    async def gone() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return
            await asyncio.sleep(0.05)   # a stray body message: keep watching without spinning

    return gone


async def _read_body(request: Request, form_only: bool = False) -> tuple[dict[str, Any], dict[str, list]]:
    """(text fields, {field: [(filename, bytes)]}) of a multipart/urlencoded form or a JSON object."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json" and not form_only:
        raw = await request.body()
        if not raw:
            raise BadRequest("empty JSON body")
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise BadRequest(f"JSON body must be an object, got {type(obj).__name__}")
        return obj, {}
    if ctype not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        want = "multipart/form-data" if form_only else "multipart/form-data, application/x-www-form-urlencoded or JSON"
        raise BadRequest(f"unsupported Content-Type {ctype or '(none)'!r}; send {want}")
    try:
        form: FormData = await request.form(max_files=MAX_FORM_FIELDS, max_fields=MAX_FORM_FIELDS)
    except StarletteHTTPException as exc:
        raise BadRequest(f"malformed form body: {exc.detail}") from None
    except Exception as exc:  # the multipart parser raises several types on hostile input
        raise BadRequest(f"malformed form body: {exc}") from None
    fields: dict[str, Any] = {}
    files: dict[str, list] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            data = await value.read()
            files.setdefault(key, []).append((_safe_name(value.filename), data))
        elif key in ("id", "ids") and key in fields:
            fields[key] = f"{fields[key]},{value}"
        else:
            fields[key] = value
    return fields, files


def _one_file(files: dict[str, list], name: str):
    uploads = [f for key in FILE_FIELDS for f in files.get(key, [])]
    if len(uploads) > 1:
        raise BadRequest(f"expected one query image (field {name!r}), got {len(uploads)} files")
    return uploads[0] if uploads else None


def _ids_from(fields: dict[str, Any], n: int) -> list[str]:
    raw = fields.get("ids", fields.get("id"))
    if raw is None:
        return [f"upload-{uuid.uuid4().hex[:16]}" for _ in range(n)]
    if not isinstance(raw, str):
        raise BadRequest("ids must be text: comma-separated or repeated 'ids' fields")
    ids = [s.strip() for s in raw.split(",")]
    if len(ids) != n:
        raise BadRequest(f"{len(ids)} ids for {n} images; give one id per image (or none)")
    return ids


def _safe_name(name: str | None) -> str:
    """The client's file name, only for messages (never used as a path): printable, short."""
    text = "".join(c for c in (name or "upload") if c.isprintable())[:80]
    return text or "upload"


def _install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON ``{"error": "..."}``; user mistakes are 4xx, only bugs are 500."""

    @app.exception_handler(IrkitError)
    async def irkit_error(request: Request, exc: IrkitError) -> JSONResponse:
        translated = storage_error(exc)
        if translated is not None:
            return storage_response(request, exc, translated)
        status = status_of(exc)
        if status >= 500 and status not in (501, 503, 507):
            log.error("server-side error: %s", exc)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Busy) else None
        return JSONResponse({"error": str(exc)}, status_code=status, headers=headers)

    def storage_response(request: Request, exc: BaseException, translated: IrkitError) -> JSONResponse:
        status = status_of(translated)
        log.error("%s %s failed: %s (%s)", request.method, request.url.path, translated, exc)
        return JSONResponse({"error": str(translated)}, status_code=status)

    @app.exception_handler(OSError)
    async def os_error(request: Request, exc: OSError) -> JSONResponse:
        translated = storage_error(exc)
        if translated is not None:
            return storage_response(request, exc, translated)
        log.error("%s %s failed with an I/O error", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal I/O error ({exc.strerror or type(exc).__name__}); see the server "
                                      "log"}, status_code=500)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, _exc: ClientGone) -> Response:
        log.info("%s %s: client disconnected while queued; dropped", request.method, request.url.path)
        return Response(status_code=499)   # nobody reads it; the status marks it in any proxy log

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse({"error": "invalid request: " + "; ".join(parts)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such endpoint; see /docs for the API"
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"error": f"internal server error ({type(exc).__name__}); see the server log"},
                            status_code=500)


__all__ = ["create_app", "Limits"]
