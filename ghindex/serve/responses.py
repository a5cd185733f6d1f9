"""What every answer of the service is built from: JSON that survives odd paths, and {"error": ...}."""
from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import Response

from ..query import to_json

try:  # the serve extra installs it: several times faster than the json module on search results
    import orjson
except ImportError:  # pragma: no cover - then the json module does it
    orjson = None


class ApiError(HTTPException):
    """An answer {"error": detail} with this status."""


class JSONResponse(Response):
    """JSON that stays valid UTF-8 for paths with undecodable bytes (`ghindex.query.to_json`)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        if orjson is not None:
            try:
                return orjson.dumps(content)
            except (TypeError, ValueError):  # e.g. a path with undecodable bytes (a lone surrogate)
                pass
        return to_json(content).encode("utf-8")


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)
