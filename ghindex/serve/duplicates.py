"""`ghindex serve --duplicates FILE`: the groups of a `ghindex dedup --format jsonl` file, for review.

`add_duplicates(app, path)` reads the file once (`ghindex.dedup_output.read_groups`: largest group
first) and adds to an app made by `create_app`:

- `GET /duplicates`: the review page (static/duplicates.html, duplicates.js, duplicates.css): the
  groups with their images (served by database id only, by /api/items/ID/image, as the search page
  shows them), which member is kept, each member's neighbours in the group with their distances
  (links to them), and a link from every image to the search page's query by its id.
- `GET /api/duplicates?offset=0&limit=20`: a page of groups, each with `missing`: its ids that the
  served index's code store does not hold (no image to show: e.g. the new uploads of `--against`).

The token guard (`middleware.RequestGuard`) covers /api/duplicates like every /api route.
"""
from __future__ import annotations

import os
from importlib import resources
from typing import Optional

import anyio
from pydantic import BaseModel
from starlette.responses import Response

from ..dedup_output import read_groups
from ..errors import ConfigError
from .openapi import ERROR_RESPONSES
from .parsing import bad_request
from .responses import JSONResponse

#: Groups per page of /api/duplicates: the default and the most one request may ask for.
PAGE = 20
MAX_PAGE = 200


class DuplicateGroup(BaseModel):
    group: Optional[int] = None
    size: int
    ids: list[int]
    kept: Optional[list[int]] = None
    other_ids: Optional[list[int]] = None
    num_pairs: Optional[int] = None
    max_distance: Optional[int] = None
    diameter: Optional[int] = None
    chained: Optional[bool] = None
    pairs: list[list[int]]
    missing: list[int]


class DuplicatesPage(BaseModel):
    file: str
    total: int
    items: int
    offset: int
    limit: int
    groups: list[DuplicateGroup]


def load_groups(path) -> list[dict]:
    """The groups of a dedup jsonl, largest first (ConfigError when the file is missing or not one)."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ConfigError(f"duplicates file not found: {name} (write one with `ghindex dedup --format jsonl --out FILE`)")
    return read_groups(name)


def add_duplicates(app, path) -> None:
    """Add the review page and its API over the groups of `path` to `app` (from `create_app`)."""
    groups = load_groups(path)
    name = os.path.basename(os.fspath(path))
    items = sum(len(g["ids"]) + len(g.get("other_ids") or []) for g in groups)
    searcher = app.state.service.searcher
    page_html = (resources.files(__package__) / "static" / "duplicates.html").read_bytes()
    app.state.duplicates = groups

    def with_missing(group: dict) -> dict:
        ids = group["ids"] + list(group.get("other_ids") or [])
        out = {key: group.get(key) for key in DuplicateGroup.model_fields if key not in ("missing", "size")}
        out.update(size=len(ids), pairs=group.get("pairs") or [], missing=[i for i in ids if searcher.row(i) < 0])
        return out

    @app.get("/api/duplicates", response_model=None,
             responses={200: {"model": DuplicatesPage}, **ERROR_RESPONSES})
    async def duplicates(offset: int = 0, limit: int = PAGE):
        """Groups of near-copies from `ghindex dedup` (the --duplicates file), largest first."""
        if offset < 0:
            raise bad_request(f"offset must be at least 0, got {offset}")
        if not 1 <= limit <= MAX_PAGE:
            raise bad_request(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        page = await anyio.to_thread.run_sync(lambda: [with_missing(g) for g in groups[offset:offset + limit]])
        return JSONResponse({"file": name, "total": len(groups), "items": items, "offset": offset, "limit": limit,
                             "groups": page})

    @app.get("/duplicates", include_in_schema=False)
    async def page():  # its script and style come from /static/, like the search page's
        return Response(page_html, media_type="text/html; charset=utf-8", headers={"cache-control": "no-cache"})
