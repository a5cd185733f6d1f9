"""The ASGI layer in front of every route: token check, body-size limit, security headers, request metrics.

It works on the raw ASGI scope so that a refused request (no token, body too large) is answered
before FastAPI reads the body, and so that the body limit holds for chunked uploads too.
"""
from __future__ import annotations

import hmac
import time

from starlette.routing import Match

from .responses import ApiError, error_response
from .service import Service

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": ("default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
}


#: Added to every answer that does not set them itself, as raw ASGI header pairs.
_DEFAULT_HEADERS = tuple((name.encode("latin-1"), value.encode("latin-1"))
                         for name, value in {**SECURITY_HEADERS, "cache-control": "no-store"}.items())


class RequestGuard:
    """Token check, body-size limit, security headers and request metrics, in front of every route.

    `fast`: {(method, route path): handler(scope, receive, send) -> bool} answering a route directly
    (behind the same checks, headers and metrics); a handler that returns False has sent nothing and
    the request goes to the app as usual.
    """

    def __init__(self, app, service: Service, router, fast: dict | None = None):
        self.app, self.service, self.router = app, service, router
        self.fast = dict(fast or {})
        self._static: dict[tuple[str, str], str] | None = None

    def _static_endpoints(self) -> dict[tuple[str, str], str]:
        """(method, path) -> endpoint for the paths of routes without parameters: what the route loop
        of `_endpoint` answers for them, found once."""
        found = {}
        for route in self.router.routes:
            path = getattr(route, "path", None)
            if not path or "{" in path:
                continue
            for method in getattr(route, "methods", None) or ():
                key = (method, path)
                if key not in found:
                    found[key] = self._match(
                        {"type": "http", "method": method, "path": path, "root_path": "", "headers": []})
        return found

    def _match(self, scope) -> str:
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route.path
        return "other"

    def _endpoint(self, scope) -> str:
        if not scope.get("root_path"):
            if self._static is None:
                self._static = self._static_endpoints()
            found = self._static.get((scope.get("method"), scope["path"]))
            if found is not None:
                return found
        return self._match(scope)

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
                headers = list(message.get("headers") or ())
                present = {name for name, _ in headers}
                headers += [pair for pair in _DEFAULT_HEADERS if pair[0] not in present]
                message["headers"] = headers
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
                await error_response(401, "missing or wrong token: send the header Authorization: Bearer TOKEN",
                                     {"www-authenticate": "Bearer"})(scope, receive, send_with_headers)
                return
            length = next((v for n, v in scope.get("headers", ()) if n == b"content-length"), None)
            if length is not None and (not length.isdigit() or int(length) > limit):
                await error_response(413 if length.isdigit() else 400,
                                     _too_large(limit) if length.isdigit() else "invalid Content-Length")(
                    scope, receive, send_with_headers)
                return
            fast = self.fast.get((scope.get("method"), endpoint))
            if fast is None or not await fast(scope, limited_receive, send_with_headers):
                await self.app(scope, limited_receive, send_with_headers)
        finally:
            self.service.metrics.observe_request(endpoint, scope.get("method", ""), status[0],
                                                 time.perf_counter() - start)


def _too_large(limit: int) -> str:
    return f"request body over the server's limit of {limit:,} bytes (--max-upload)"
