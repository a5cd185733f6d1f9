"""The HTTP API and the page over one index: a thin layer over `ghindex.query.Searcher`.

Handlers parse and check the request, hand the search to the micro-batchers (FAISS and torch run in
worker threads, never on the event loop) and turn the `Searcher`'s records into JSON: the same
neighbours, distances and order as `ghindex query --format json`. Images are served by database id
only, from the paths the code store records; a path is never taken from a request.
"""
from __future__ import annotations

import contextlib
import functools
import hmac
import io
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any, Optional, Union

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match

from ..errors import ConfigError, GhindexError, ImageError, SearchError
from ..query import Searcher, query_record, to_json
from .batching import MicroBatcher
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics

log = logging.getLogger(__name__)

MAX_K = 1000  #: neighbours per query
MAX_QUERIES = 1000  #: ids or codes in one request
MAX_IMAGES = 64  #: files in one request
MAX_ENCODE_BATCH = 64  #: images per encoder call
THUMBNAIL_PX = 256  #: longest side of the images served for the page
DEFAULT_MAX_UPLOAD = 20 * 2**20

STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": ("default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_rng = np.random.default_rng()


# ------------------------------------------------------------------------------- request parsing
class ApiError(HTTPException):
    """An answer {"error": detail} with this status."""


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def _int_value(name: str, value, low: int, high: int) -> int:
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"[+-]?[0-9]{1,20}", text):
            raise _bad(f"{name} must be an integer, got {value[:40]!r}")
        value = int(text)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer, got {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise _bad(f"{name} must be between {low} and {high}, got {value}")
    return value


def _options(sources: list[dict[str, Any]]) -> tuple[int, int | None]:
    """k and radius from the query string, form fields or JSON fields (each given at most once)."""
    found: dict[str, Any] = {}
    for source in sources:
        for name, value in source.items():
            if name in found:
                raise _bad(f"{name} is given more than once")
            found[name] = value
    k = _int_value("k", found["k"], 1, MAX_K) if found.get("k") is not None else 10
    radius = found.get("radius")
    return k, (None if radius is None or radius == "" else _int_value("radius", radius, 0, 1 << 16))


def _query_params(request: Request) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in ("k", "radius"):
            raise _bad(f"unknown query parameter {name[:40]!r} (expected k, radius)")
        if name in params:
            raise _bad(f"{name} is given more than once")
        params[name] = value
    return params


def _display_name(name: str | None, fallback: str) -> str:
    name = _CONTROL.sub("", os.path.basename(name or "").strip())[:200]
    return name or fallback


@dataclass
class SearchJob:
    codes: np.ndarray  # (n, code_bytes) uint8
    meta: list[dict]  # the query records
    k: int
    radius: int | None


# -------------------------------------------------------------------------------------- service
class Service:
    """The searcher, its micro-batchers and the metrics of one running app."""

    def __init__(self, searcher: Searcher, *, batch_window_ms: float = 2.0, max_batch: int = 256,
                 max_upload: int = DEFAULT_MAX_UPLOAD, token: str | None = None):
        self.searcher = searcher
        self.index = searcher.index
        self.max_upload = int(max_upload)
        self.token = token or None
        self.metrics = Metrics(self.index.ntotal, self.index.bits)
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ghindex-serve")
        window = max(0.0, float(batch_window_ms)) / 1000.0
        self.search_batcher = MicroBatcher(
            self._search_batch, window_s=window, max_size=max_batch, size=lambda job: len(job.codes),
            key=lambda job: job.k, executor=self.executor, name="search",
            on_batch=self.metrics.observe_search_batch)
        self.encode_batcher = MicroBatcher(
            self._encode_batch, window_s=window, max_size=min(max_batch, MAX_ENCODE_BATCH), size=len,
            executor=self.executor, name="encode", on_batch=self.metrics.observe_encode_batch)
        self.searcher.cache_paths()
        self._thumbnail = functools.lru_cache(maxsize=512)(_thumbnail)

    # ---- work done in the executor, one call per micro-batch
    def _search_batch(self, jobs: list[SearchJob]) -> list:
        codes = jobs[0].codes if len(jobs) == 1 else np.concatenate([job.codes for job in jobs])
        dist, found = self.searcher.search(codes, jobs[0].k)
        out, start = [], 0
        for job in jobs:
            stop = start + len(job.codes)
            try:
                out.append(self.searcher.records(job.meta, dist[start:stop], found[start:stop], job.radius))
            except Exception as exc:  # noqa: BLE001 - this request's error only
                out.append(exc)
            start = stop
        return out

    def _encode_batch(self, image_lists: list[list]) -> list[np.ndarray]:
        images = [img for images in image_lists for img in images]
        codes = self.searcher.encode(images, batch_size=MAX_ENCODE_BATCH)
        out, start = [], 0
        for images in image_lists:
            out.append(codes[start:start + len(images)])
            start += len(images)
        return out

    # ---- what handlers call
    async def search(self, codes: np.ndarray, meta: list[dict], k: int, radius: int | None,
                     ticket=None) -> list[dict]:
        return await self.search_batcher.submit(SearchJob(codes, meta, k, radius), ticket)

    async def encode(self, images: list, ticket=None) -> np.ndarray:
        return await self.encode_batcher.submit(images, ticket)

    def thumbnail(self, path: str) -> tuple[bytes, str]:
        return self._thumbnail(path)

    async def close(self) -> None:
        await self.search_batcher.stop()
        await self.encode_batcher.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.searcher.close()


def _thumbnail(path: str) -> tuple[bytes, str]:
    """A database image at most THUMBNAIL_PX on its longest side: PNG when small, else JPEG."""
    from PIL import Image

    from ..images import load_image

    img = load_image(path)
    img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if img.width * img.height <= 128 * 128:
        img.save(buf, format="PNG", optimize=True)
        return buf.getvalue(), "image/png"
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue(), "image/jpeg"


def _decode_upload(data: bytes, name: str):
    from ..images import load_image

    stream = io.BytesIO(data)
    stream.name = f"upload {name!r}"
    return load_image(stream)


# ------------------------------------------------------------------------------------- responses
class JSONResponse(Response):
    """JSON that stays valid UTF-8 for paths with undecodable bytes (`ghindex.query.to_json`)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return to_json(content).encode("utf-8")


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


# Response schemas, for /openapi.json only (handlers build plain dicts).
class Neighbor(BaseModel):
    rank: int
    id: int
    distance: int
    label: Union[int, list[int], None] = None
    label_name: Union[str, list[str], None] = None
    path: Optional[str] = None
    relevant: Optional[bool] = None


class Result(BaseModel):
    query: str
    query_id: Optional[int] = None
    query_path: Optional[str] = None
    query_label: Union[int, list[int], None] = None
    query_label_name: Union[str, list[str], None] = None
    neighbors: list[Neighbor]


class SearchResponse(BaseModel):
    results: list[Result]
    took_ms: float


class Health(BaseModel):
    status: str
    ntotal: int
    bits: int
    index_key: str


class Item(BaseModel):
    id: int
    label: Union[int, list[int], None] = None
    label_name: Union[str, list[str], None] = None
    path: Optional[str] = None


class Error(BaseModel):
    error: str


_ERRORS = {400: {"model": Error, "description": "bad input"},
           401: {"model": Error, "description": "missing or wrong token"}}

_SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {
                "type": "object", "additionalProperties": False,
                "description": "exactly one of ids or codes",
                "properties": {
                    "ids": {"type": "array", "items": {"type": "integer"}, "maxItems": MAX_QUERIES,
                            "description": "ids of the index's code store"},
                    "codes": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_QUERIES,
                              "description": "codes as hex: packed bytes, bit i = (byte[i >> 3] >> (i & 7)) & 1"},
                    "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
                    "radius": {"type": ["integer", "null"], "minimum": 0},
                }}},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image"],
                "properties": {
                    "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                              "maxItems": MAX_IMAGES, "description": "image files (the server needs --model)"},
                    "k": {"type": "integer"}, "radius": {"type": "integer"},
                }}},
        },
    },
    "parameters": [
        {"name": "k", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
         "description": "neighbours per query"},
        {"name": "radius", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0},
         "description": "keep only neighbours within this Hamming distance (still at most k)"},
    ],
}


# ------------------------------------------------------------------------------------ middleware
class _Guard:
    """Token check, body-size limit, security headers and request metrics, in front of every route."""

    def __init__(self, app, service: Service, router):
        self.app, self.service, self.router = app, service, router

    def _endpoint(self, scope) -> str:
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route.path
        return "other"

    def _authorized(self, scope) -> bool:
        token = self.service.token
        if token is None:
            return True
        path = scope["path"]
        if not (path == "/metrics" or path == "/api" or path.startswith("/api/")):
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, given = value.decode("latin-1").strip().partition(" ")
                if scheme.lower() == "bearer":
                    return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8"))
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        endpoint = self._endpoint(scope)
        status = [500]
        limit = self.service.max_upload

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                headers.setdefault("cache-control", "no-store")
            await send(message)

        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise ApiError(413, _too_large(limit))
            return message

        try:
            if not self._authorized(scope):
                await _error(401, "missing or wrong token: send the header Authorization: Bearer TOKEN",
                             {"www-authenticate": "Bearer"})(scope, receive, send_with_headers)
                return
            length = next((v for n, v in scope.get("headers", ()) if n == b"content-length"), None)
            if length is not None and (not length.isdigit() or int(length) > limit):
                await _error(413 if length.isdigit() else 400,
                             _too_large(limit) if length.isdigit() else "invalid Content-Length")(
                    scope, receive, send_with_headers)
                return
            await self.app(scope, limited_receive, send_with_headers)
        finally:
            self.service.metrics.observe_request(endpoint, scope.get("method", ""), status[0],
                                                 time.perf_counter() - start)


def _too_large(limit: int) -> str:
    return f"request body over the server's limit of {limit:,} bytes (--max-upload)"


# ------------------------------------------------------------------------------------------- app
def create_app(index, model=None, *, token: str | None = None, max_upload: int = DEFAULT_MAX_UPLOAD,
               batch_window_ms: float = 2.0, max_batch: int = 256, cors_origins=(), force: bool = False,
               gpu: str = "auto", gpu_shard: bool = False, device=None) -> FastAPI:
    """The ASGI app serving `index` (a directory, a loaded `Index`, or a `Searcher`).

    `model`: the index's encoder, needed to search by uploaded images. `token`: every /api and /metrics
    request must send `Authorization: Bearer TOKEN`. `max_upload`: largest request body in bytes.
    `batch_window_ms`, `max_batch`: micro-batching (0 and 1: one request at a time). `cors_origins`:
    origins allowed to call the API from their pages (none: CORS off). `force`, `gpu`, `gpu_shard`,
    `device`: as for `ghindex.query.query`.
    """
    if isinstance(max_upload, bool) or not isinstance(max_upload, int) or max_upload < 1:
        raise ConfigError(f"max_upload must be a positive number of bytes, got {max_upload!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}")
    if not 0 <= float(batch_window_ms) <= 1000:
        raise ConfigError(f"batch_window_ms must be between 0 and 1000, got {batch_window_ms!r}")
    searcher = index if isinstance(index, Searcher) else Searcher(
        index, model, force=force, gpu=gpu, gpu_shard=gpu_shard, device=device)
    service = Service(searcher, batch_window_ms=batch_window_ms, max_batch=max_batch, max_upload=max_upload,
                      token=token)
    static = _load_static()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await service.close()

    app = FastAPI(
        title="ghindex", version=_version(), lifespan=lifespan,
        description="Search an index of binary image codes by image, stored id or code.",
        docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None,  # their pages load from a CDN
    )
    app.state.service = service
    app.router.redirect_slashes = False  # /api/health/ is not found rather than redirected (to a Host header)

    # ---- errors: always {"error": "..."}
    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return _error(exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        where = str(first.get("loc", ["input"])[-1])
        return _error(400, f"{where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(GhindexError)
    async def ghindex_error(request, exc: GhindexError):
        user = isinstance(exc, (ConfigError, SearchError, ImageError))
        return _error(400 if user else 500, str(exc))

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal error (see the server's log)")

    # ---- API
    @app.get("/api/health", response_model=None, responses={200: {"model": Health}, **_ERRORS})
    async def health():
        """Liveness and what is served."""
        idx = service.index
        return JSONResponse({"status": "ok", "ntotal": idx.ntotal, "bits": idx.bits, "index_key": idx.index_key})

    @app.get("/api/info", response_model=None, responses=_ERRORS)
    async def info():
        """The index's metadata, its code store, the model summary (null without --model) and the limits."""
        return JSONResponse(_info(service))

    @app.post("/api/search", response_model=None, openapi_extra=_SEARCH_BODY,
              responses={200: {"model": SearchResponse}, **_ERRORS,
                         404: {"model": Error, "description": "unknown id"},
                         413: {"model": Error, "description": "body over --max-upload"}})
    async def search(request: Request):
        """Nearest neighbours of uploaded images (multipart field `image`), stored ids or hex codes.

        Neighbours are ranked by Hamming distance, ties by database position: the same rows as
        `ghindex query --format json`.
        """
        start = time.perf_counter()
        # announced at once, so that a micro-batch forming now waits for this request (see batching)
        with service.search_batcher.expecting() as ticket:
            params = _query_params(request)
            if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
                with service.encode_batcher.expecting() as encode_ticket:
                    codes, meta, k, radius = await _from_form(request, params, service, encode_ticket)
            else:
                codes, meta, k, radius = await _from_json(request, params, service)
            results = await service.search(codes, meta, k, radius, ticket)
        return JSONResponse({"results": results, "took_ms": round((time.perf_counter() - start) * 1000, 3)})

    @app.get("/api/items/{item_id}", response_model=None,
             responses={200: {"model": Item}, **_ERRORS, 404: {"model": Error, "description": "unknown id"}})
    async def item(item_id: int):
        """Id, label, label name and path of a stored id."""
        found = await anyio.to_thread.run_sync(service.searcher.item, item_id)
        if found is None:
            raise ApiError(404, _unknown_id(item_id))
        return JSONResponse(found)

    @app.get("/api/items/{item_id}/image", response_model=None,
             responses={200: {"content": {"image/png": {}, "image/jpeg": {}},
                              "description": f"the image, at most {THUMBNAIL_PX} px on its longest side"},
                        **_ERRORS, 404: {"model": Error, "description": "unknown id or no image"}})
    async def item_image(item_id: int):
        """The database image of a stored id, as a thumbnail."""
        found = await anyio.to_thread.run_sync(service.searcher.item, item_id)
        if found is None:
            raise ApiError(404, _unknown_id(item_id))
        if not found["path"]:
            raise ApiError(404, f"id {item_id} has no image path in the code store")
        try:
            data, media_type = await anyio.to_thread.run_sync(service.thumbnail, found["path"])
        except ImageError as exc:
            log.warning("image of id %s: %s", item_id, exc)
            raise ApiError(404, f"the image of id {item_id} cannot be read on the server") from None
        return Response(data, media_type=media_type, headers={"cache-control": "private, max-age=3600"})

    @app.get("/api/sample", response_model=None, responses=_ERRORS)
    async def sample(n: int = 1):
        """n ids of the code store drawn at random (the page's "Random image"): {"ids": [...]}."""
        if not 1 <= n <= 100:
            raise _bad(f"n must be between 1 and 100, got {n}")
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

    app.add_middleware(_Guard, service=service, router=app.router)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    return app


def _version() -> str:
    from .. import __version__

    return __version__


def _unknown_id(item_id) -> str:
    return f"unknown id {item_id}: not in the index's code store"


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


# --------------------------------------------------------------------------------- search inputs
async def _from_json(request: Request, params: dict, service: Service):
    body = await request.body()
    if not body.strip():
        raise _bad('send a JSON body such as {"ids": [3, 17]} or {"codes": ["0f1e..."]}, '
                   "or a multipart form with image files in the field 'image'")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _bad(f"malformed JSON: {exc}" if isinstance(exc, ValueError) else "malformed JSON") from None
    if not isinstance(data, dict):
        raise _bad('the JSON body must be an object such as {"ids": [3, 17], "k": 10}')
    unknown = sorted(set(data) - {"ids", "codes", "k", "radius"})
    if unknown:
        raise _bad(f"unknown field {unknown[0][:40]!r} (expected ids or codes, and k, radius)")
    k, radius = _options([params, {n: data[n] for n in ("k", "radius") if n in data}])
    given = [name for name in ("ids", "codes") if name in data]
    if len(given) != 1:
        raise _bad("give exactly one of ids and codes" + (", not both" if given else ""))
    values = data[given[0]]
    if not isinstance(values, list) or not values:
        raise _bad(f"{given[0]} must be a non-empty list")
    if len(values) > MAX_QUERIES:
        raise _bad(f"at most {MAX_QUERIES} {given[0]} per request, got {len(values)}")
    if given[0] == "ids":
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                raise _bad(f"ids must be integers, got {json.dumps(v)[:40]}")
        ids = values
        for i in ids:
            if service.searcher.row(i) < 0:
                raise ApiError(404, _unknown_id(i))
        codes, meta = await anyio.to_thread.run_sync(service.searcher.codes_for_ids, ids)
        return codes, meta, k, radius
    return _hex_codes(values, service.index.code_bytes), [query_record(v) for v in values], k, radius


def _hex_codes(values: list, code_bytes: int) -> np.ndarray:
    out = np.empty((len(values), code_bytes), np.uint8)
    for n, value in enumerate(values):
        if not isinstance(value, str):
            raise _bad(f"codes must be hex strings, got {json.dumps(value)[:40]}")
        if len(value) != 2 * code_bytes:
            raise _bad(f"code {n} has {len(value)} hex digits; this index needs {2 * code_bytes} "
                       f"({code_bytes * 8} bits)")
        try:
            out[n] = np.frombuffer(bytes.fromhex(value), np.uint8)
        except ValueError:
            raise _bad(f"code {n} is not hex: {value[:40]!r}") from None
    return out


async def _from_form(request: Request, params: dict, service: Service, ticket=None):
    form = await request.form(max_files=MAX_IMAGES, max_fields=8)
    try:
        fields: dict[str, str] = {}
        uploads: list[UploadFile] = []
        for name, value in form.multi_items():
            if name == "image":
                if not isinstance(value, UploadFile):
                    raise _bad("the field 'image' must hold files, not text")
                uploads.append(value)
            elif name in ("k", "radius"):
                if isinstance(value, UploadFile) or name in fields:
                    raise _bad(f"{name} must be given once, as text")
                fields[name] = value
            else:
                raise _bad(f"unknown field {name[:40]!r} (expected image, k, radius)")
        k, radius = _options([params, fields])
        if not uploads:
            raise _bad("no file in the field 'image'")
        if service.searcher.encoder is None:
            raise _bad("this server has no model to encode images (start it with --model); "
                       "search by ids or codes instead")
        names = [_display_name(u.filename, f"image-{n + 1}") for n, u in enumerate(uploads)]
        images = []
        for upload, name in zip(uploads, names):
            data = await upload.read()
            if not data:
                raise _bad(f"upload {name!r} is empty (0 bytes), not an image")
            images.append(await anyio.to_thread.run_sync(_decode_upload, data, name))
    finally:
        await form.close()
    codes = await service.encode(images, ticket)
    return codes, [query_record(name) for name in names], k, radius
