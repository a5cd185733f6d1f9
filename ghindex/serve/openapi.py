"""What /openapi.json says the API answers and takes; handlers build plain dicts and never use these."""
from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel

from .parsing import MAX_IMAGES, MAX_K, MAX_QUERIES


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


ERROR_RESPONSES = {400: {"model": Error, "description": "bad input"},
                   401: {"model": Error, "description": "missing or wrong token"}}

# /api/search reads its body itself (JSON or a multipart form), so FastAPI cannot infer this.
SEARCH_REQUEST = {
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
                    "exclude_self": {"type": "boolean", "default": False,
                                     "description": "leave each queried id's own item out of its neighbours "
                                                    "(by default it comes first among its ties); ids only, "
                                                    "ignored for codes"},
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
