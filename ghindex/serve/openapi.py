"""What /openapi.json says the API answers and takes, stating every limit the handlers enforce.

Handlers build plain dicts and never use these models; they check requests themselves (`parsing`).
The schema is built per app: the hex length of a code depends on the index, the upload form exists
only with a model, bearer auth only with a token. tests/test_api_contract.py runs schemathesis
against it with all checks: a change to what a handler accepts must change this module too.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from ..images import MAX_PIXELS
from .parsing import MAX_IMAGES, MAX_K, MAX_QUERIES, MAX_RADIUS


class Neighbor(BaseModel):
    rank: int
    id: int
    distance: int
    weighted_distance: Optional[float] = None  # image queries, re-ranked by it (`ghindex.query.query`'s rerank)
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


class Sample(BaseModel):
    ids: list[int]


class StoreInfo(BaseModel):
    path: str
    count: int
    has_labels: bool
    has_paths: bool
    class_names: Optional[list[str]] = None


class ModelInfo(BaseModel):
    file: str
    backbone: str
    bits: int
    image_size: int
    num_classes: Optional[int] = None
    class_names: Optional[list[str]] = None
    training: Optional[dict[str, Any]] = None


class Limits(BaseModel):
    max_k: int
    max_queries: int
    max_images: int
    max_upload_bytes: int
    thumbnail_px: int


class Info(BaseModel):
    index: dict[str, Any]
    on_gpu: bool
    store: Optional[StoreInfo] = None
    model: Optional[ModelInfo] = None
    auth: bool
    limits: Limits


class Error(BaseModel):
    error: str


ERROR_RESPONSES = {400: {"model": Error, "description": "bad input"},
                   401: {"model": Error, "description": "missing or wrong token"}}

_K = {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10, "description": "neighbours per query"}
_RADIUS = {"type": "integer", "minimum": 0, "maximum": MAX_RADIUS,
           "description": "keep only neighbours within this Hamming distance (still at most k)"}


def search_request(code_bytes: int, images: bool, max_upload: int) -> dict:
    """The `openapi_extra` of POST /api/search (it reads its body itself, so FastAPI cannot infer it):
    codes of `code_bytes` bytes, the upload form only when the server can encode `images`.

    k and radius are documented in the body, the one place a schema can say that each is given once;
    the server also takes them from the query string (see `parsing.query_params`), not in both places.
    """
    hex_digits = 2 * code_bytes
    content = {
        "application/json": {"schema": {
            "type": "object", "additionalProperties": False,
            "description": "exactly one of ids or codes",
            "oneOf": [{"required": ["ids"]}, {"required": ["codes"]}],
            "properties": {
                "ids": {"type": "array", "minItems": 1, "maxItems": MAX_QUERIES,
                        "items": {"type": "integer", "format": "int64", "minimum": -2**63, "maximum": 2**63 - 1},
                        "description": "ids of the index's code store (404 for one it lacks)"},
                "codes": {"type": "array", "minItems": 1, "maxItems": MAX_QUERIES,
                          "items": {"type": "string", "minLength": hex_digits, "maxLength": hex_digits,
                                    "pattern": "^[0-9A-Fa-f]*$"},
                          "description": f"codes of {code_bytes * 8} bits as {hex_digits} hex digits: packed "
                                         "bytes, bit i = (byte[i >> 3] >> (i & 7)) & 1"},
                "k": {**_K, "type": ["integer", "null"], "description": "neighbours per query (null: 10)"},
                "radius": {**_RADIUS, "type": ["integer", "null"]},
                "exclude_self": {"type": "boolean", "default": False,
                                 "description": "leave each queried id's own item out of its neighbours "
                                                "(by default it comes first among its ties); ids only, "
                                                "ignored for codes"},
            }}},
    }
    if images:
        content["multipart/form-data"] = {
            "schema": {
                "type": "object", "required": ["image"], "additionalProperties": False,
                "properties": {
                    "image": {"type": "array", "minItems": 1, "maxItems": MAX_IMAGES,
                              "items": {"type": "string", "format": "binary", "minLength": 1},
                              "description": "image files in any format Pillow decodes, at most "
                                             f"{MAX_PIXELS:,} pixels each"},
                    "k": _K,
                    "radius": {"anyOf": [_RADIUS, {"const": ""}], "description": _RADIUS["description"]
                               + ' ("": none)'},
                }},
            # each part a file: a part without a filename is a text field to the form parser
            "encoding": {"image": {"contentType": "image/*", "headers": {"Content-Disposition": {
                "schema": {"type": "string"}, "example": 'form-data; name="image"; filename="query.jpg"',
                "description": "each image is a file part: it needs a filename"}}}},
        }
    return {
        "description": "Nearest neighbours of uploaded images (multipart field `image`), stored ids or hex codes."
                       "\n\nNeighbours are ranked by Hamming distance, ties by database position: the same rows "
                       "as `ghindex query --format json`. Uploaded images re-rank their nearest codes by the "
                       "weighted Hamming distance, given as `weighted_distance`. `k` and `radius` may instead be sent in the query "
                       "string (then not in the body too). The whole request body is at most "
                       f"{max_upload:,} bytes (--max-upload; 413 above).",
        "requestBody": {"required": True, "content": content},
    }


def contract_schema(app, *, token: bool) -> dict:
    """The app's OpenAPI schema (built once): FastAPI's, less the 422 answers it adds for parameters
    (this server answers validation errors with 400 and {"error"}), plus bearer auth on every
    operation when the server has a token, and links from sampled ids to the item operations."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         openapi_version=app.openapi_version, routes=app.routes)
    for operations in schema["paths"].values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
            if token:
                operation["security"] = [{"bearerToken": []}]
    components = schema.setdefault("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    if token:
        components["securitySchemes"] = {"bearerToken": {
            "type": "http", "scheme": "bearer", "description": "the server's --token (or GHINDEX_TOKEN)"}}
    _link_sample_to_items(schema["paths"])
    app.openapi_schema = schema
    return schema


def _link_sample_to_items(paths: dict) -> None:
    """A sampled id is a stored id: say so (OpenAPI links), so that clients and fuzzers can follow it."""
    sample = paths.get("/api/sample", {}).get("get")
    if sample is None:
        return
    links = {}
    for name, path in (("item", "/api/items/{item_id}"), ("itemImage", "/api/items/{item_id}/image")):
        target = paths.get(path, {}).get("get")
        if target is not None:
            links[name] = {"operationId": target["operationId"], "parameters": {"item_id": "$response.body#/ids/0"}}
    sample["responses"]["200"]["links"] = links
