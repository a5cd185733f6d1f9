"""`ghindex serve`: an HTTP search service and a web page over any index (needs the `serve` extra).

- `app`: `create_app(index, model=None, ...)` returns the ASGI app (FastAPI): the JSON API under
  /api, Prometheus text at /metrics, the page at /.
- `parsing`: reading and checking a search request (k, radius, ids, hex codes, uploaded images).
- `service`: `Service`, the state of one app: the `Searcher`, its micro-batchers and worker threads.
- `middleware`: `RequestGuard`, in front of every route: token, body-size limit, headers, metrics.
- `responses`: JSON answers and `ApiError` ({"error": ...}); `openapi`: the schemas /openapi.json shows.
- `batching`: `MicroBatcher`, one per kind of work (index search, image encoding): requests arriving
  within a few milliseconds go to FAISS / the encoder as one call, in a worker thread.
- `metrics`: the Prometheus counters and histograms.
- `server`: `serve(...)` binds (127.0.0.1 by default), prints the URL and runs uvicorn; `make_server`
  does all but the running (tests, embedding).
- `static/`: the page (plain HTML, CSS and JavaScript; nothing is loaded from outside the server).
"""
from .app import create_app
from .server import make_server, serve

__all__ = ["create_app", "make_server", "serve"]
