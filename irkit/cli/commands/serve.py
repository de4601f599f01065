"""`irkit serve --store DIR`: the HTTP search service and its web page (FastAPI + uvicorn)."""
from __future__ import annotations

import argparse
import logging
import os

from irkit.errors import ConfigError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a feature store over HTTP (search API + web page)",
                       description="Search a feature store over HTTP: POST /search, POST/DELETE /images "
                       "(bearer token), thumbnails, match explanations, a web page at / and API docs at /docs.")
    p.add_argument("--store", required=True, help="feature store directory (from `irkit extract`)")
    p.add_argument("--model", help="model preset (default: the one the store was extracted with)")
    p.add_argument("--weights", help="checkpoint of that preset (default: the preset's own weights)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--token", default=os.environ.get("IRKIT_TOKEN"),
                   help="bearer token required to add/remove images (default $IRKIT_TOKEN; none = read-only)")
    p.add_argument("--workers", type=int, default=2, help="inference threads (default 2)")
    p.add_argument("--max-queue", "--queue", dest="queue", type=int, default=128,
                   help="requests that may wait (FIFO) for a free worker; one more gets 503 at once (default 128)")
    p.add_argument("--queue-timeout", type=float, default=5.0,
                   help="seconds a request may wait for a worker before 503 with Retry-After (default 5)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send its whole request body, else 408 (default 30; 0 = none)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="request body limit in MB (default 20)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="decoded image pixel limit (default 40M)")
    p.add_argument("--max-k", type=int, default=200, help="largest k a search may ask for (default 200)")
    p.add_argument("--index", default=None,
                   help="faiss index factory (default: the index `irkit index` saved with the store, "
                        "else Flat = exact)")
    p.add_argument("--index-save-every", type=int, default=100,
                   help="save a saved index again after this many adds/removals (default 100; it is also "
                        "saved at shutdown, and brought up to date from the store after a crash)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from irkit.serve.app import create_app
    from irkit.serve.engine import Limits

    if args.workers < 1 or args.queue < 0 or args.max_upload_mb <= 0 or args.max_pixels < 1 or args.max_k < 1:
        raise ConfigError("--workers, --max-upload-mb, --max-pixels and --max-k must be positive; --max-queue >= 0")
    if args.index_save_every < 1:
        raise ConfigError(f"--index-save-every must be >= 1, got {args.index_save_every}")
    if not (args.queue_timeout >= 0 and args.body_timeout >= 0):
        raise ConfigError("--queue-timeout and --body-timeout must be >= 0 seconds")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be 1..65535, got {args.port}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.token:
        log.warning("listening on %s without a token: the server is read-only", args.host)
    limits = Limits(max_body_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
                    max_k=args.max_k, index_save_every=args.index_save_every)
    app = create_app(args.store, args.model, args.token, weights=args.weights, device=args.device,
                     limits=limits, workers=args.workers, queue=args.queue,
                     queue_timeout=args.queue_timeout, body_timeout=args.body_timeout, index_factory=args.index)
    log.info("serving %s on http://%s:%d (docs at /docs)", args.store, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)
    return 0
