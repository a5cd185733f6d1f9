"""The HTTP API and the page over one index: `create_app` and its routes, a thin layer over `ghindex.query.Searcher`.

Handlers parse and check the request (`parsing`), hand the search to the micro-batchers of the
`Service` (FAISS and torch run in worker threads, never on the event loop) and turn the `Searcher`'s
records into JSON: the same neighbours, distances and order as `ghindex query --format json`. Images
are served by database id only, from the paths the code store records; a path is never taken from a
request. `middleware.RequestGuard` sits in front of every route.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from importlib import resources

import anyio
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from ..errors import ConfigError, GhindexError, ImageError, SearchError
from ..query import Searcher
from ..version import __version__
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .duplicates import add_duplicates
from .middleware import RequestGuard
from .openapi import (
    ERROR_RESPONSES,
    Error,
    Health,
    Info,
    Item,
    Sample,
    SearchResponse,
    contract_schema,
    search_request,
)
from .parsing import (
    MAX_IMAGES,
    MAX_K,
    MAX_QUERIES,
    MAX_SAMPLE,
    bad_request,
    query_params,
    search_input_from_form,
    search_input_from_json,
    unknown_id,
)
from .responses import ApiError, JSONResponse, error_response
from .service import DEFAULT_MAX_UPLOAD, THUMBNAIL_PX, Service

log = logging.getLogger(__name__)

STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_rng = np.random.default_rng()


def create_app(index, model=None, *, token: str | None = None, max_upload: int = DEFAULT_MAX_UPLOAD,
               batch_window_ms: float = 2.0, max_batch: int = 256, cors_origins=(), force: bool = False,
               gpu: str = "auto", gpu_shard: bool = False, device=None, root=None,
               runtime: str = "auto", duplicates=None) -> FastAPI:
    """The ASGI app serving `index` (a directory, a loaded `Index`, or a `Searcher`).

    `model`: the index's encoder, needed to search by uploaded images. `token`: every /api and /metrics
    request must send `Authorization: Bearer TOKEN`. `max_upload`: largest request body in bytes.
    `batch_window_ms`, `max_batch`: micro-batching (0 and 1: one request at a time). `cors_origins`:
    origins allowed to call the API from their pages (none: CORS off). `force`, `gpu`, `gpu_shard`,
    `device`, `root`: as for `ghindex.query.query`. `runtime`: where uploads run the backbone
    (`ghindex.runtime`; auto: ONNX Runtime on the CPU when installed). `duplicates`: a `ghindex dedup`
    jsonl to review at /duplicates (`ghindex.serve.duplicates`).
    """
    if isinstance(max_upload, bool) or not isinstance(max_upload, int) or max_upload < 1:
        raise ConfigError(f"max_upload must be a positive number of bytes, got {max_upload!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
    if not 0 <= float(batch_window_ms) <= 1000:
        raise ConfigError(f"batch_window_ms must be between 0 and 1000, got {batch_window_ms!r}")
    searcher = index if isinstance(index, Searcher) else Searcher(
        index, model, force=force, gpu=gpu, gpu_shard=gpu_shard, device=device, root=root, runtime=runtime)
    service = Service(searcher, batch_window_ms=batch_window_ms, max_batch=max_batch, max_upload=max_upload,
                      token=token)
    static = _load_static()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await service.close()

    app = FastAPI(
        title="ghindex", version=__version__, lifespan=lifespan,
        description="Search an index of binary image codes by image, stored id or code.",
        docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None,  # their pages load from a CDN
    )
    app.state.service = service
    app.router.redirect_slashes = False  # /api/health/ is not found rather than redirected (to a Host header)
    app.openapi = lambda: contract_schema(app, token=service.token is not None)

    # ---- errors: always {"error": "..."}
    @app.exception_handler(HTTPException)
    async def httperror_response(request, exc: HTTPException):
        return http_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validationerror_response(request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        where = str(first.get("loc", ["input"])[-1])
        return error_response(400, f"{where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(GhindexError)
    async def ghindexerror_response(request, exc: GhindexError):
        return ghindex_error_response(exc)

    @app.exception_handler(Exception)
    async def internalerror_response(request, exc: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal error (see the server's log)")

    # ---- API
    @app.get("/api/health", response_model=None, responses={200: {"model": Health}, **ERROR_RESPONSES})
    async def health():
        """Liveness and what is served."""
        idx = service.index
        return JSONResponse({"status": "ok", "ntotal": idx.ntotal, "bits": idx.bits, "index_key": idx.index_key})

    @app.get("/api/info", response_model=None, responses={200: {"model": Info}, **ERROR_RESPONSES})
    async def info():
        """The index's metadata, its code store, the model summary (null without --model) and the limits."""
        return JSONResponse(_info(service))

    @app.post("/api/search", response_model=None,
              openapi_extra=search_request(service.index.code_bytes, service.searcher.encoder is not None, max_upload),
              responses={200: {"model": SearchResponse}, **ERROR_RESPONSES,
                         404: {"model": Error, "description": "unknown id"},
                         413: {"model": Error, "description": "body over --max-upload"}})
    async def search(request: Request):
        """Nearest neighbours of uploaded images (multipart field `image`), stored ids or hex codes.

        Neighbours are ranked by Hamming distance, ties by database position: the same rows as
        `ghindex query --format json`.
        """
        return await search_response(request, service)

    @app.get("/api/items/{item_id}", response_model=None,
             responses={200: {"model": Item}, **ERROR_RESPONSES, 404: {"model": Error, "description": "unknown id"}})
    async def item(item_id: int):
        """Id, label, label name and path of a stored id."""
        found = await anyio.to_thread.run_sync(service.searcher.item, item_id)
        if found is None:
            raise ApiError(404, unknown_id(item_id))
        return JSONResponse(found)

    @app.get("/api/items/{item_id}/image", response_model=None,
             responses={200: {"content": {"image/png": {}, "image/jpeg": {}},
                              "description": f"the image, at most {THUMBNAIL_PX} px on its longest side"},
                        **ERROR_RESPONSES, 404: {"model": Error, "description": "unknown id or no image"}})
    async def item_image(item_id: int):
        """The database image of a stored id, as a thumbnail."""
        found = await anyio.to_thread.run_sync(service.searcher.item, item_id)
        if found is None:
            raise ApiError(404, unknown_id(item_id))
        if not found["path"]:
            raise ApiError(404, f"id {item_id} has no image path in the code store")
        try:
            data, media_type = await anyio.to_thread.run_sync(service.thumbnail, found["path"])
        except ImageError as exc:
            log.warning("image of id %s: %s", item_id, exc)
            raise ApiError(404, f"the image of id {item_id} cannot be read on the server") from None
        return Response(data, media_type=media_type, headers={"cache-control": "private, max-age=3600"})

    @app.get("/api/sample", response_model=None, responses={200: {"model": Sample}, **ERROR_RESPONSES})
    async def sample(n: int = Query(1, json_schema_extra={"minimum": 1, "maximum": MAX_SAMPLE})):
        """n ids of the code store drawn at random (the page's "Random image"): {"ids": [...]}."""
        if not 1 <= n <= MAX_SAMPLE:  # checked here, not by FastAPI, for this server's message
            raise bad_request(f"n must be between 1 and {MAX_SAMPLE}, got {n}")
        ids = service.searcher.stored_ids()
        picked = _rng.choice(ids, size=min(n, len(ids)), replace=False) if len(ids) else ids
        return JSONResponse({"ids": [int(i) for i in picked]})

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(service.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    # ---- the page: fixed files shipped in the package, nothing else
    @app.get("/", include_in_schema=False)
    async def page():
        return _static_response(static, "index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        if name not in static or name == "index.html":
            raise ApiError(404, "Not Found")
        return _static_response(static, name)

    async def search_json(scope, receive, send) -> bool:
        """POST /api/search with a JSON body (ids or codes), answered without the router and FastAPI's
        request handling (the hot path of the service); multipart uploads are declined (False) and go
        the route's way. Errors are those of the route: the same exception handlers answer them."""
        request = Request(scope, receive)
        if _is_form(request):
            return False
        try:
            response = await search_response(request, service)
        except HTTPException as exc:
            response = http_error_response(exc)
        except GhindexError as exc:
            response = ghindex_error_response(exc)
        await response(scope, receive, send)
        return True

    app.add_middleware(RequestGuard, service=service, router=app.router, fast={("POST", "/api/search"): search_json})
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    if duplicates is not None:
        add_duplicates(app, duplicates)
    return app


def _is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def search_response(request: Request, service: Service) -> JSONResponse:
    """The answer of POST /api/search (JSON ids or codes, or a multipart form of images)."""
    start = time.perf_counter()
    params = query_params(request)
    if _is_form(request):
        # announced to the encoder at once, so that an encoder batch forming now can wait for these
        # images (see batching); not to the search batcher: reading, decoding and encoding take far
        # longer than a search batch could wait, and the search follows the encoding at once
        with service.encode_batcher.expecting() as encode_ticket:
            job = await search_input_from_form(request, params, service, encode_ticket)
        results = await service.search(job)
    else:
        with service.search_batcher.expecting() as ticket:
            job = await search_input_from_json(request, params, service)
            results = await service.search(job, ticket)
    return JSONResponse({"results": results, "took_ms": round((time.perf_counter() - start) * 1000, 3)})


def http_error_response(exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, exc.detail, getattr(exc, "headers", None))


def ghindex_error_response(exc: GhindexError) -> JSONResponse:
    user = isinstance(exc, (ConfigError, SearchError, ImageError))
    return error_response(400 if user else 500, str(exc))


def _load_static() -> dict[str, bytes]:
    folder = resources.files(__package__) / "static"
    return {entry.name: entry.read_bytes() for entry in folder.iterdir()
            if entry.is_file() and os.path.splitext(entry.name)[1] in STATIC_TYPES}


def _static_response(static: dict[str, bytes], name: str) -> Response:
    return Response(static[name], media_type=STATIC_TYPES[os.path.splitext(name)[1]],
                    headers={"cache-control": "no-cache"})


def _info(service: Service) -> dict:
    searcher, idx = service.searcher, service.index
    meta = dict(idx.meta, ntotal=idx.ntotal)
    store = None
    if searcher.store is not None:
        s = searcher.store
        store = {"path": s.path, "count": len(s),
                 "has_labels": s.has_labels, "has_paths": s.has_paths, "class_names": s.class_names}
    model = None
    if searcher.encoder is not None:
        c = searcher.encoder.config
        model = {"file": os.path.basename(searcher.model_path), "backbone": c.backbone, "bits": c.bits,
                 "image_size": c.image_size, "num_classes": c.num_classes,
                 "class_names": c.extra.get("class_names"), "training": c.extra.get("training")}
    return {"index": meta, "on_gpu": idx.on_gpu, "store": store, "model": model, "auth": service.token is not None,
            "limits": {"max_k": MAX_K, "max_queries": MAX_QUERIES, "max_images": MAX_IMAGES,
                       "max_upload_bytes": service.max_upload, "thumbnail_px": THUMBNAIL_PX}}
