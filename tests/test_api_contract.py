"""The API of `ghindex serve` keeps the contract of its /openapi.json: schemathesis with all checks.

Schemathesis (a property-based API fuzzer) reads the schema the running server serves, generates
requests from it (explicit examples, boundary values, random and schema-violating data, sequences
that follow the schema's links) and checks every answer: no 5xx; a schema-valid request is not
refused with 4xx other than 401/404; a schema-invalid one is not accepted; status, content type,
headers and body as documented; 405 for other methods; auth not ignored. Any finding fails the
test, and so does any schemathesis warning (e.g. an operation it could not reach with valid data).

Two servers, each a real uvicorn server over TCP as `ghindex serve` runs it, over a small index of
random 32-bit codes: one with a model (image uploads) and a token, one with neither (its schema has
no upload form and no security). Bounded: MAX_EXAMPLES cases per operation and phase and a fixed
seed (set GHINDEX_API_SEED to explore others, GHINDEX_API_EXAMPLES for more cases).

What schemathesis cannot cover, and why:
- Image bytes: the schema says a part of `image` is an image file, not that its bytes decode, so
  tests/schemathesis_hooks.py makes the binary strings of valid requests real PNG/JPEG files (one to
  many per upload); undecodable, empty, truncated and oversized images are test_serve.py's
  (test_bad_input_is_one_json_error_never_a_500).
- The body limit (--max-upload, 413): a JSON schema bounds items, not the bytes of a request; the
  limit is in the operation's description and tested in test_serve.py.
- k and radius in the query string: the schema documents them in the body only (see
  `ghindex.serve.openapi.search_request`); test_serve.py tests the query-string form.
- Auth: the token server's schema declares bearer auth; schemathesis sends the token and its
  `ignored_auth` check resends without it / with a wrong one and wants 401. A wrong scheme
  ("Basic") is test_serve.py's.
- /metrics, the page and /static are not in the schema (not JSON API operations).
"""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install '.[serve]'")
pytest.importorskip("schemathesis", reason="the dev extra is not installed: pip install '.[dev]'")

from ghindex.index import build  # noqa: E402
from ghindex.io import file_fingerprint  # noqa: E402
from ghindex.serve.server import make_server  # noqa: E402
from ghindex.store import CodeStore  # noqa: E402

HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
TOKEN = "contract-token"
MAX_EXAMPLES = int(os.environ.get("GHINDEX_API_EXAMPLES", "25"))
SEED = int(os.environ.get("GHINDEX_API_SEED", "23"))
RUN_TIMEOUT_S = 240  # a hung run fails instead of blocking the suite; a normal one takes seconds
N_ITEMS = 64


@pytest.fixture(scope="module")
def served_index(tmp_path_factory) -> dict:
    """A random smallcnn model (32 bits), 64 random codes with labels, class names and image paths
    (eight small PNGs, and one path that does not exist), and a flat index."""
    import torch
    from PIL import Image

    from ghindex.encoder import Encoder

    folder = tmp_path_factory.mktemp("contract")
    torch.manual_seed(0)
    model_path = folder / "model.ghm"
    Encoder("smallcnn", 32, image_size=32).save(model_path)
    rng = np.random.default_rng(5)
    pictures = []
    for n in range(8):
        pictures.append(str(folder / f"img{n}.png"))
        Image.fromarray(rng.integers(0, 256, (20 + n, 30, 3), dtype=np.uint8)).save(pictures[-1])
    paths = [pictures[n % 8] for n in range(N_ITEMS - 1)] + [str(folder / "gone.png")]
    with CodeStore.create(folder / "db.h5", 32, encoder_fingerprint=file_fingerprint(model_path), label_shape=(),
                          with_paths=True, attrs={"class_names": ["cat", "dog", "ship"]}) as store:
        store.append(rng.integers(0, 256, (N_ITEMS, 4), dtype=np.uint8), np.arange(N_ITEMS) * 3 + 1,
                     labels=rng.integers(0, 3, N_ITEMS), paths=paths)
        store.mark_complete()
    build(folder / "db.h5", folder / "index", index_key="BFlat", gpu="off")
    return {"index": folder / "index", "model": model_path, "folder": folder}


def running_server(index, **options):
    """(URL, its metrics, stop()) of `ghindex serve`'s uvicorn server on a free port, served from a thread."""
    server, sock, url, _ = make_server(index, port=0, **options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(30)
        sock.close()

    return url, server.config.app.state.service.metrics, stop


def schemathesis_run(url: str, folder: Path, headers=()) -> subprocess.CompletedProcess:
    """`st run URL/openapi.json --checks all` with every phase, bounded, in a fresh process."""
    config = folder / "schemathesis.toml"
    config.write_text(f'hooks = "{HOOKS.as_posix()}"\n'
                      "[warnings]\nfail-on = true\n"
                      "[cache]\nenabled = false\n")
    args = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{url}openapi.json",
            "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", str(MAX_EXAMPLES),
            "--seed", str(SEED), "--workers", "1", "--request-timeout", "30", "--continue-on-failure"]
    for header in headers:
        args += ["--header", header]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120"}
    return subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


@pytest.mark.parametrize("kind", ["images-and-token", "codes-only"])
def test_served_api_keeps_its_openapi_contract(served_index, kind, tmp_path):
    if kind == "images-and-token":
        options, headers = {"model": served_index["model"], "token": TOKEN}, [f"Authorization: Bearer {TOKEN}"]
    else:
        options, headers = {}, []
    url, metrics, stop = running_server(served_index["index"], **options)
    try:
        result = schemathesis_run(url, tmp_path, headers)
    finally:
        stop()
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    # it reached every operation with valid data, uploads and auth included
    answered = {(endpoint, status) for (endpoint, _, status) in metrics.requests}
    for endpoint in ("/api/health", "/api/info", "/api/search", "/api/sample", "/api/items/{item_id}",
                     "/api/items/{item_id}/image"):
        assert (endpoint, "200") in answered, (endpoint, sorted(metrics.requests.items()))
    assert (metrics.images > 0) == ("model" in options)
    assert (("/api/search", "401") in answered) == ("token" in options)


def test_schema_follows_the_served_index_and_json_numbers_follow_json_schema(served_index):
    """What the fuzzer relies on, said once plainly: the schema is built for the index and options
    served; a JSON number is an integer when its value is whole ("3.0", "1e1"), as in JSON Schema,
    while text in a JSON integer field is refused."""
    import warnings

    from ghindex.serve import create_app

    with warnings.catch_warnings():  # starlette suggests httpx2; httpx is what fastapi documents
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    with TestClient(create_app(served_index["index"])) as c:
        spec = c.get("/openapi.json").json()
        search = spec["paths"]["/api/search"]["post"]
        assert set(search["requestBody"]["content"]) == {"application/json"}  # no model: no uploads
        codes = search["requestBody"]["content"]["application/json"]["schema"]["properties"]["codes"]["items"]
        assert codes["minLength"] == codes["maxLength"] == 8  # 32 bits
        assert "securitySchemes" not in spec.get("components", {})
        assert not [op for ops in spec["paths"].values() for op in ops.values() if "422" in op["responses"]]
        sample = spec["paths"]["/api/sample"]["get"]["parameters"][0]["schema"]
        assert (sample["minimum"], sample["maximum"]) == (1, 100)

        def search_json(body: str):
            return c.post("/api/search", content=body, headers={"content-type": "application/json"})

        want = search_json('{"ids": [4], "k": 3, "radius": 20}').json()["results"]
        assert search_json('{"ids": [4.0], "k": 3.0, "radius": 2e1}').json()["results"] == want
        for body, word in (('{"ids": [4], "k": "3"}', "k must be an integer"), ('{"ids": [4], "k": 3.5}', "k must be"),
                           ('{"ids": [4], "radius": ""}', "radius must be an integer"), ('{"ids": [4.5]}', "integers")):
            r = search_json(body)
            assert r.status_code == 400 and word in r.json()["error"], (body, r.text)
    with TestClient(create_app(served_index["index"], served_index["model"], token=TOKEN)) as c:
        spec = c.get("/openapi.json").json()
        assert "multipart/form-data" in spec["paths"]["/api/search"]["post"]["requestBody"]["content"]
        assert spec["components"]["securitySchemes"]["bearerToken"]["scheme"] == "bearer"
        assert all(op["security"] == [{"bearerToken": []}] for ops in spec["paths"].values() for op in ops.values())
