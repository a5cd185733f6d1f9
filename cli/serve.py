"""`ghindex serve`: a thin wrapper over `ghindex.serve.serve`."""
from __future__ import annotations

import click


@click.command("serve")
@click.option("--index", required=True, type=click.Path(), help="Index directory (from `ghindex build`).")
@click.option("--model", type=click.Path(dir_okay=False), default=None,
              help="The index's model file (.ghm): enables search by uploaded image. [default: ids and codes only]")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback without --token prints a warning.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port (0: any free port; the URL line says which).")
@click.option("--token", envvar="GHINDEX_TOKEN", default=None, show_envvar=True,
              help="Require `Authorization: Bearer TOKEN` on every /api and /metrics request "
                   "(the page asks for it). Prefer the environment variable: arguments show in `ps`.")
@click.option("--max-upload", default="20M", show_default=True,
              help="Largest request body (K, M, G = 1024-based); larger uploads get 413 before they are read.")
@click.option("--batch-window-ms", type=click.FloatRange(0, 1000), default=2.0, show_default=True,
              help="Micro-batching: a search (or image encoding) waits at most this long for requests "
                   "already arriving to join it in one call.")
@click.option("--max-batch", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most query codes per index search (images per encoder call: at most 64). "
                   "--batch-window-ms 0 --max-batch 1 serves one request at a time.")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="Let pages from ORIGIN (e.g. https://app.example.com) call the API; repeatable. [default: CORS off]")
@click.option("--force", is_flag=True,
              help="Accept a model from another encoder than the index's, or a code store changed since the build.")
@click.option("--gpu", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Search a flat index on all GPUs FAISS sees (auto: when there are any; on: fail without).")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Folder the database images now live in, when they moved apart from the code store. "
                   "[default: the folder the store records, relative to the store]")
@click.option("--device", default="cpu", show_default=True, help="Device of the model that encodes uploads.")
@click.option("--runtime", type=click.Choice(["auto", "torch", "onnx"]), default="auto", show_default=True,
              help="Where uploads run the backbone: auto is ONNX Runtime on the CPU when installed (the cpu extra), "
                   "else PyTorch (see `ghindex encode --runtime`).")
@click.option("--duplicates", type=click.Path(dir_okay=False), default=None,
              help="A `ghindex dedup --format jsonl` file: review its groups at /duplicates.")
def serve(index, model, host, port, token, max_upload, batch_window_ms, max_batch, cors_origins, force, gpu, root,
          device, runtime, duplicates):
    """Serve a web page and a JSON API to search INDEX by image, id or code, until Ctrl-C.

    API: GET /api/health, GET /api/info, POST /api/search, GET /api/items/ID, GET /api/items/ID/image
    (with --duplicates: GET /api/duplicates and the review page /duplicates);
    Prometheus metrics at /metrics; the OpenAPI schema at /openapi.json. Needs the `serve` extra
    (pip install 'ghindex[serve]').
    """
    from ghindex.errors import ConfigError

    try:
        from ghindex.serve import serve as serve_fn
    except ImportError as exc:
        raise ConfigError(f"ghindex serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'ghindex[serve]'") from None
    serve_fn(index, model, host=host, port=port, token=token, max_upload=max_upload,
             batch_window_ms=batch_window_ms, max_batch=max_batch, cors_origins=cors_origins, force=force,
             gpu=gpu, device=device, root=root, runtime=runtime, duplicates=duplicates)
