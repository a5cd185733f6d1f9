"""`ghindex serve`: an HTTP search service and a web page over any index (needs the `serve` extra).

- `app`: `create_app(index, model=None, ...)` returns the ASGI app (FastAPI): the JSON API under
  /api, Prometheus text at /metrics, the page at /.
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
