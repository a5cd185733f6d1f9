"""Reading a search request: k and radius, ids, hex codes or uploaded images, checked against the limits.

Every mistake in a request is an `ApiError` (400, or 404 for an unknown id) whose message says what
was wrong and what is expected; nothing here searches.
"""
from __future__ import annotations

import io
import json
import os
import re
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile

from ..images import load_image
from ..query import query_record
from .responses import ApiError
from .service import SearchJob

if TYPE_CHECKING:
    from .service import Service

MAX_K = 1000  #: neighbours per query
MAX_QUERIES = 1000  #: ids or codes in one request
MAX_IMAGES = 64  #: files in one request
MAX_RADIUS = 1 << 16  #: largest radius taken (far above any code length)
MAX_SAMPLE = 100  #: ids per GET /api/sample

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def unknown_id(item_id) -> str:
    return f"unknown id {item_id}: not in the index's code store"


def _int_value(name: str, value, low: int, high: int) -> int:
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"[+-]?[0-9]{1,20}", text):
            raise bad_request(f"{name} must be an integer, got {value[:40]!r}")
        value = int(text)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, got {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise bad_request(f"{name} must be between {low} and {high}, got {value}")
    return value


def _options(sources: list[dict[str, Any]]) -> tuple[int, int | None]:
    """k and radius from the query string, form fields or JSON fields (each given at most once)."""
    found: dict[str, Any] = {}
    for source in sources:
        for name, value in source.items():
            if name in found:
                raise bad_request(f"{name} is given more than once")
            found[name] = value
    k = _int_value("k", found["k"], 1, MAX_K) if found.get("k") is not None else 10
    radius = found.get("radius")
    return k, (None if radius is None or radius == "" else _int_value("radius", radius, 0, MAX_RADIUS))


def _json_number(text: str) -> int | float:
    """A JSON number written with a fraction or exponent ("10.0", "1e3"): an int when its value is whole
    (JSON Schema's "integer", as the schema's k, radius and ids are), else a float."""
    value = Decimal(text)
    if value.adjusted() < 40 and value == value.to_integral_value():  # < 10**40: past any int64 id
        return int(value)
    return float(text)


def query_params(request: Request) -> dict[str, str]:
    params: dict[str, str] = {}
    if not request.scope.get("query_string"):
        return params
    for name, value in request.query_params.multi_items():
        if name not in ("k", "radius"):
            raise bad_request(f"unknown query parameter {name[:40]!r} (expected k, radius)")
        if name in params:
            raise bad_request(f"{name} is given more than once")
        params[name] = value
    return params


def _display_name(name: str | None, fallback: str) -> str:
    name = _CONTROL.sub("", os.path.basename(name or "").strip())[:200]
    return name or fallback


def _decode_upload(data: bytes, name: str, size: int | None):
    stream = io.BytesIO(data)
    stream.name = f"upload {name!r}"
    return load_image(stream, size)


# --------------------------------------------------------------------------------- search inputs
# Each returns the `SearchJob` for `Service.search`.
async def search_input_from_json(request: Request, params: dict, service: Service):
    body = await request.body()
    if not body.strip():
        raise bad_request('send a JSON body such as {"ids": [3, 17]} or {"codes": ["0f1e..."]}, '
                          "or a multipart form with image files in the field 'image'")
    try:
        data = json.loads(body, parse_float=_json_number)
    except (ValueError, RecursionError) as exc:
        raise bad_request(f"malformed JSON: {exc}" if isinstance(exc, ValueError) else "malformed JSON") from None
    if not isinstance(data, dict):
        raise bad_request('the JSON body must be an object such as {"ids": [3, 17], "k": 10}')
    unknown = sorted(set(data) - {"ids", "codes", "k", "radius", "exclude_self"})
    if unknown:
        raise bad_request(f"unknown field {unknown[0][:40]!r} (expected ids or codes, and k, radius, exclude_self)")
    exclude_self = data.get("exclude_self", False)
    if not isinstance(exclude_self, bool):
        raise bad_request(f"exclude_self must be true or false, got {json.dumps(exclude_self)[:40]}")
    for name in ("k", "radius"):  # text ("5", "") only where text is all there is: query string, form
        if isinstance(data.get(name), str):
            raise bad_request(f"{name} must be an integer, got {json.dumps(data[name])[:40]}")
    k, radius = _options([params, {n: data[n] for n in ("k", "radius") if n in data}])
    given = [name for name in ("ids", "codes") if name in data]
    if len(given) != 1:
        raise bad_request("give exactly one of ids and codes" + (", not both" if given else ""))
    values = data[given[0]]
    if not isinstance(values, list) or not values:
        raise bad_request(f"{given[0]} must be a non-empty list")
    if len(values) > MAX_QUERIES:
        raise bad_request(f"at most {MAX_QUERIES} {given[0]} per request, got {len(values)}")
    if given[0] == "ids":
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad_request(f"ids must be integers, got {json.dumps(v)[:40]}")
        ids = values
        for i in ids:
            if service.searcher.row(i) < 0:
                raise ApiError(404, unknown_id(i))
        return SearchJob(k, radius, ids=ids, exclude_self=exclude_self)  # codes: looked up in the batch
    # exclude_self applies to stored ids only: a code is no item of the index
    return SearchJob(k, radius, codes=_hex_codes(values, service.index.code_bytes),
                     meta=[query_record(v) for v in values])


def _hex_codes(values: list, code_bytes: int) -> np.ndarray:
    out = np.empty((len(values), code_bytes), np.uint8)
    for n, value in enumerate(values):
        if not isinstance(value, str):
            raise bad_request(f"codes must be hex strings, got {json.dumps(value)[:40]}")
        if len(value) != 2 * code_bytes:
            raise bad_request(f"code {n} has {len(value)} hex digits; this index needs {2 * code_bytes} "
                              f"({code_bytes * 8} bits)")
        try:
            out[n] = np.frombuffer(bytes.fromhex(value), np.uint8)
        except ValueError:
            raise bad_request(f"code {n} is not hex: {value[:40]!r}") from None
    return out


async def search_input_from_form(request: Request, params: dict, service: Service, ticket=None):
    form = await request.form(max_files=MAX_IMAGES, max_fields=8)
    try:
        fields: dict[str, str] = {}
        uploads: list[UploadFile] = []
        for name, value in form.multi_items():
            if name == "image":
                if not isinstance(value, UploadFile):
                    raise bad_request("the field 'image' must hold files, not text")
                uploads.append(value)
            elif name in ("k", "radius"):
                if isinstance(value, UploadFile) or name in fields:
                    raise bad_request(f"{name} must be given once, as text")
                fields[name] = value
            else:
                raise bad_request(f"unknown field {name[:40]!r} (expected image, k, radius)")
        k, radius = _options([params, fields])
        if not uploads:
            raise bad_request("no file in the field 'image'")
        if service.searcher.encoder is None:
            raise bad_request("this server has no model to encode images (start it with --model); "
                              "search by ids or codes instead")
        names = [_display_name(u.filename, f"image-{n + 1}") for n, u in enumerate(uploads)]
        size = service.searcher.encoder.config.decode_size
        images = []
        for upload, name in zip(uploads, names):
            data = await upload.read()
            if not data:
                raise bad_request(f"upload {name!r} is empty (0 bytes), not an image")
            images.append(await anyio.to_thread.run_sync(_decode_upload, data, name, size))
    finally:
        await form.close()
    projections = await service.hash_outputs(images, ticket)
    return service.image_job(projections, k, radius, [query_record(name) for name in names])
