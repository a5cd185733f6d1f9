"""`serve`: bind, say where, and run the app under uvicorn until Ctrl-C / SIGTERM."""
from __future__ import annotations

import gc
import ipaddress
import logging
import re
import socket
import sys

import numpy as np

from ..errors import ConfigError
from .app import DEFAULT_MAX_UPLOAD, create_app

log = logging.getLogger(__name__)

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?\s*", re.I)


def parse_upload_size(text: str | int) -> int:
    """'20M' / '512k' / '1G' / '1000000' (bytes; K, M, G are powers of 1024) -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.fullmatch(str(text))
        if not match:
            raise ConfigError(f"--max-upload must be a size such as 20M, 512K or 1000000, got {text!r}")
        value = int(float(match.group(1)) * 1024 ** " kmg".index(match.group(2).lower() or " "))
    if value < 1:
        raise ConfigError(f"--max-upload must be at least 1 byte, got {text!r}")
    return value


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_warning(host: str, token: str | None) -> str | None:
    """The warning for serving beyond this machine without a token (None when there is nothing to say)."""
    if token or is_loopback(host):
        return None
    return (f"serving on {host} without a token: anyone who can reach this machine can search the index "
            "and see its images; set --token or GHINDEX_TOKEN, or bind 127.0.0.1 behind a reverse proxy")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), or ConfigError saying why not."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def make_server(index, model=None, *, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
                max_upload: int | str = DEFAULT_MAX_UPLOAD, batch_window_ms: float = 2.0, max_batch: int = 256,
                cors_origins=(), force: bool = False, gpu: str = "auto", gpu_shard: bool = False, device=None,
                root=None, runtime: str = "auto", duplicates=None):
    """Load the index, build the app and bind: (uvicorn.Server, listening socket, URL, one-line summary).

    `server.run(sockets=[sock])` then serves until `server.should_exit` is set (or SIGINT / SIGTERM
    when run in the main thread).
    """
    import uvicorn

    token = token or None
    warning = host_warning(host, token)
    if warning:
        log.warning("warning: %s", warning)
    app = create_app(index, model, token=token, max_upload=parse_upload_size(max_upload),
                     batch_window_ms=batch_window_ms, max_batch=max_batch, cors_origins=cors_origins,
                     force=force, gpu=gpu, gpu_shard=gpu_shard, device=device, root=root, runtime=runtime,
                     duplicates=duplicates)
    sock = bind(host, port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False,
                            timeout_graceful_shutdown=5, lifespan="on")
    service = app.state.service
    idx = service.index
    what = f"{idx.ntotal:,} codes of {idx.bits} bits, {idx.index_key}"
    if service.searcher.encoder is not None:
        what += f", image search on ({service.searcher.encoder.runtime})"
    if duplicates is not None:
        what += f", {len(app.state.duplicates):,} duplicate groups at /duplicates"
    if token:
        what += ", token required"
    return uvicorn.Server(config), sock, url_of(sock), what


def settle(app) -> None:
    """Make a serving process ready for steady traffic: one search now (its compiled scan loaded before
    the first request), then everything loaded so far out of the garbage collector's way. A process
    with the index, numba and FastAPI loaded holds some 250,000 objects; every full collection would
    walk them all (0.1-0.3 s on a busy 2-core machine, the slowest requests of a load test), while
    `gc.freeze()` leaves only what requests create to walk."""
    service = app.state.service
    try:
        service.searcher.search(np.zeros((1, service.index.code_bytes), np.uint8), 1, threads=1)
    except Exception:  # noqa: BLE001 - only a warm-up: the first request will say what is wrong
        log.debug("warm-up search failed", exc_info=True)
    gc.collect()
    gc.freeze()


def serve(index, model=None, **options) -> None:
    """Serve the page and the API of `index` until interrupted; options as `make_server` / `create_app`.

    Binds 127.0.0.1 by default. Prints one line with the URL to stderr once it listens (after a
    warning when a non-loopback host is served without a token).
    """
    server, sock, url, what = make_server(index, model, **options)
    settle(server.config.app)
    print(f"ghindex serve: {url} ({what}); Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        print("ghindex serve: stopped", file=sys.stderr, flush=True)
    finally:
        sock.close()
