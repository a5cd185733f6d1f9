"""`ghindex serve`: every endpoint and error through an in-process client, equality with `query` and
`ghindex query --format json`, micro-batching, token, body limit, thumbnails, metrics, the CLI."""
import asyncio
import contextlib
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install '.[serve]'")
import httpx  # noqa: E402

with warnings.catch_warnings():  # starlette suggests httpx2; httpx is what fastapi documents
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from ghindex.encoder import Encoder  # noqa: E402
from ghindex.index import build  # noqa: E402
from ghindex.io import file_fingerprint  # noqa: E402
from ghindex.query import query  # noqa: E402
from ghindex.serve import create_app  # noqa: E402
from ghindex.serve.server import bind, host_warning, parse_upload_size  # noqa: E402
from ghindex.store import CodeStore  # noqa: E402
from ghindex_cli.main import cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "cifar10-demo"
PER_CLASS = 4
BIG_ID = 9001  # a 600 x 400 image: its thumbnail is scaled down
GONE_ID = 9002  # a stored path that does not exist on disk


def write_store(path, codes, ids, labels=None, paths=None, encoder_fingerprint=None, attrs=None):
    with CodeStore.create(path, codes.shape[1] * 8, encoder_fingerprint=encoder_fingerprint,
                          label_shape=None if labels is None else (), with_paths=paths is not None,
                          attrs=attrs) as store:
        store.append(codes, ids, labels=labels, paths=paths)
        store.mark_complete()
    return path


def make_image_index(folder: Path) -> dict:
    """A random smallcnn model (32 bits, 32 px), PER_CLASS shipped demo images per class plus two extra
    items, their code store (ids 7, 17, 27, ...; labels; class names; paths) and a flat index."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = Encoder("smallcnn", 32, image_size=32)
    model_path = folder / "model.ghm"
    model.save(model_path)
    classes = sorted(p.name for p in (DEMO / "database").iterdir())
    paths, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((DEMO / "database" / name).glob("*.jpg"))[:PER_CLASS]:
            paths.append(str(f))
            labels.append(c)
    big = folder / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 600, 3), dtype=np.uint8)).save(big)
    codes = model.encode(paths + [str(big)])
    codes = np.concatenate([codes, codes[:1]])  # GONE_ID: any code
    ids = np.concatenate([np.arange(len(paths)) * 10 + 7, [BIG_ID, GONE_ID]])
    labels = np.array(labels + [0, 1])
    all_paths = paths + [str(big), str(folder / "gone.png")]
    store = write_store(folder / "db.h5", codes, ids, labels, all_paths, file_fingerprint(model_path),
                        {"class_names": classes})
    build(store, folder / "index", index_key="BFlat", gpu="off")
    return dict(model=model_path, index=folder / "index", store=store, paths=paths, ids=ids, labels=labels,
                classes=classes, big=big, folder=folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_index(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def codes_data(tmp_path_factory):
    """400 random 32-bit database codes (many ties) and 12 query codes, as stores, with a flat index."""
    folder = tmp_path_factory.mktemp("codes")
    rng = np.random.default_rng(3)
    db_codes = rng.integers(0, 256, (400, 4), dtype=np.uint8)
    db_codes[200:] = db_codes[:200] ^ (rng.random((200, 4)) < 0.05).astype(np.uint8)  # near-duplicates
    store = write_store(folder / "db.h5", db_codes, np.arange(400) + 1000, rng.integers(0, 3, 400),
                        encoder_fingerprint="e" * 64)
    q_codes = rng.integers(0, 256, (12, 4), dtype=np.uint8)
    q_store = write_store(folder / "q.h5", q_codes, np.arange(12), rng.integers(0, 3, 12), encoder_fingerprint="e" * 64)
    build(store, folder / "index", index_key="BFlat", gpu="off")
    return dict(index=folder / "index", q_store=q_store, q_codes=q_codes)


@pytest.fixture(scope="module")
def client(data):
    with TestClient(create_app(data["index"], data["model"])) as c:
        yield c


def roundtrip(value):
    return json.loads(json.dumps(value))


def neighbours(results):
    return [r["neighbors"] for r in results]


def strip_relevant(rows):
    return [[{k: v for k, v in n.items() if k != "relevant"} for n in row] for row in rows]


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (with a 1-pixel body): a decompression bomb."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    raw[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    raw[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr - 4:ihdr + 13])))
    return bytes(raw)


def assert_error(response, status, *words):
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert "Traceback" not in body["error"]
    for word in words:
        assert word in body["error"], (word, body["error"])


# ---- endpoints ---------------------------------------------------------------------------------
def test_health_info_openapi_and_page(client, data, codes_data):
    assert client.get("/api/health").json() == {"status": "ok", "ntotal": len(data["ids"]), "bits": 32,
                                                "index_key": "BFlat"}
    info = client.get("/api/info").json()
    assert info["index"]["ntotal"] == len(data["ids"]) and info["index"]["bits"] == 32
    assert info["store"]["class_names"] == data["classes"] and info["store"]["count"] == len(data["ids"])
    assert info["model"]["backbone"] == "smallcnn" and info["model"]["bits"] == 32
    assert info["model"]["image_size"] == 32 and info["auth"] is False
    with TestClient(create_app(codes_data["index"])) as bare:
        assert bare.get("/api/info").json()["model"] is None
    spec = client.get("/openapi.json").json()
    assert {"/api/health", "/api/info", "/api/search", "/api/items/{item_id}",
            "/api/items/{item_id}/image"} <= set(spec["paths"])
    body = spec["paths"]["/api/search"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    for text in (page.text, *(client.get(f"/static/{n}").text for n in ("app.js", "style.css", "favicon.svg"))):
        text = text.replace("http://www.w3.org/2000/svg", "")  # an XML namespace, not a download
        assert "http://" not in text and "https://" not in text and "@import" not in text  # nothing external
    # no directory listing, no way out of the static folder, no CDN-backed docs pages
    for path in ("/static/", "/static", "/static/..%2fapp.py", "/static/../app.py", "/static/index.html",
                 "/docs", "/redoc", "/favicon.ico"):
        assert_error(client.get(path), 404)
    ids = client.get("/api/sample", params={"n": 5}).json()["ids"]
    assert len(set(ids)) == 5 and set(ids) <= set(int(i) for i in data["ids"])
    assert_error(client.get("/api/sample", params={"n": 0}), 400, "n must be")


def test_search_by_ids_equals_query_and_cli(client, data, runner):
    ids = [int(data["ids"][3]), int(data["ids"][25])]
    r = client.post("/api/search", json={"ids": ids, "k": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["took_ms"] >= 0
    want = query(data["index"], ids=ids, k=6)
    assert body["results"] == roundtrip(want)  # every field, not only the neighbours
    cli_out = runner.invoke(cli, ["query", "--index", str(data["index"]), "--ids", f"{ids[0]},{ids[1]}", "-k", "6",
                                  "--format", "json"])
    assert cli_out.exit_code == 0, cli_out.output
    assert body["results"] == [json.loads(line) for line in cli_out.stdout.splitlines()]
    # k and radius as query parameters give the same as JSON fields and as query(radius=...)
    a = client.post("/api/search", params={"k": 9, "radius": 14}, json={"ids": ids}).json()["results"]
    b = client.post("/api/search", json={"ids": ids, "k": 9, "radius": 14}).json()["results"]
    assert a == b == roundtrip(query(data["index"], ids=ids, k=9, radius=14))
    assert client.post("/api/search", json={"ids": ids[:1]}).json()["results"][0]["neighbors"].__len__() == 10


def test_search_by_codes_equals_query(codes_data):
    with TestClient(create_app(codes_data["index"])) as c:
        hexes = [code.tobytes().hex() for code in codes_data["q_codes"]]
        for k, radius in ((5, None), (12, 11), (1000, None)):
            payload = {"codes": hexes, "k": k} | ({"radius": radius} if radius is not None else {})
            r = c.post("/api/search", json=payload)
            assert r.status_code == 200, r.text
            got = r.json()["results"]
            want = query(codes_data["index"], codes=codes_data["q_store"], k=k, radius=radius)
            # the same rows; only "relevant" differs: the query store has labels, bare codes have none
            assert strip_relevant(neighbours(got)) == strip_relevant(neighbours(roundtrip(want)))
            assert [g["query"] for g in got] == hexes and all(g["query_id"] is None for g in got)
        # the ids map back: searching by a stored code finds itself at distance 0
        assert c.post("/api/search", json={"codes": ["0" * 8], "k": 1}).json()["results"][0]["neighbors"][0]["id"] >= 1000


def test_search_by_images_equals_query_and_cli(client, data, runner):
    picks = [data["paths"][0], data["paths"][13]]
    files = [("image", (Path(p).name, Path(p).read_bytes(), "image/jpeg")) for p in picks]
    r = client.post("/api/search", params={"k": 7}, files=files)
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    want = roundtrip(query(data["index"], model=data["model"], images=picks, k=7))
    assert neighbours(got) == neighbours(want)
    assert [g["query"] for g in got] == [Path(p).name for p in picks]
    assert all(g["query_path"] is None for g in got)  # the server never sees the client's paths
    out = runner.invoke(cli, ["query", "--index", str(data["index"]), "--model", str(data["model"]), picks[1],
                              "-k", "7", "--format", "json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["neighbors"] == got[1]["neighbors"]
    # k and radius as form fields
    r = client.post("/api/search", data={"k": "3", "radius": "20"}, files=files[:1])
    assert neighbours(r.json()["results"]) == neighbours(
        roundtrip(query(data["index"], model=data["model"], images=picks[:1], k=3, radius=20)))


def test_items_and_thumbnails(client, data):
    i = int(data["ids"][5])
    item = client.get(f"/api/items/{i}").json()
    assert item == {"id": i, "label": int(data["labels"][5]), "label_name": data["classes"][data["labels"][5]],
                    "path": data["paths"][5]}
    small = client.get(f"/api/items/{i}/image")
    assert small.status_code == 200 and small.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(small.content)).size == (32, 32)  # never scaled up
    big = client.get(f"/api/items/{BIG_ID}/image")
    assert big.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(big.content)).size == (256, 171)
    assert_error(client.get(f"/api/items/{GONE_ID}/image"), 404, "cannot be read")
    for bad in (8, -1, 2 ** 70):
        assert_error(client.get(f"/api/items/{bad}"), 404, "unknown id")
        assert_error(client.get(f"/api/items/{bad}/image"), 404, "unknown id")
    assert_error(client.get("/api/items/abc"), 400)
    assert_error(client.get("/api/items/..%2F..%2Fetc%2Fpasswd/image"), 404)


# ---- errors ------------------------------------------------------------------------------------
def test_bad_input_is_one_json_error_never_a_500(client, data):
    jpg = Path(data["paths"][0]).read_bytes()
    cases = [
        (dict(files={"image": ("notes.txt", b"just text", "text/plain")}), 400, "notes.txt", "not an image"),
        (dict(files={"image": ("empty.jpg", b"", "image/jpeg")}), 400, "empty"),
        (dict(files={"image": ("cut.jpg", jpg[: len(jpg) // 2], "image/jpeg")}), 400, "cut.jpg"),
        (dict(files={"image": ("bomb.png", png_with_size(9000, 9000), "image/png")}), 400, "too large"),
        (dict(data={"image": "text"}, files={"other": ("a.jpg", jpg, "image/jpeg")}), 400, "image"),
        (dict(data={"colour": "red"}, files={"image": ("a.jpg", jpg, "image/jpeg")}), 400, "unknown field 'colour'"),
        (dict(data={"k": "0"}, files={"image": ("a.jpg", jpg, "image/jpeg")}), 400, "k must be"),
        (dict(files={"other": ("a.jpg", jpg, "image/jpeg")}), 400, "unknown field"),
        (dict(json={"ids": [7], "k": 0}), 400, "k must be between 1 and"),
        (dict(json={"ids": [7], "k": -3}), 400, "k must be"),
        (dict(json={"ids": [7], "k": 1001}), 400, "k must be"),
        (dict(json={"ids": [7], "k": "ten"}), 400, "k must be an integer"),
        (dict(json={"ids": [7], "k": 2.5}), 400, "k must be an integer"),
        (dict(json={"ids": [7], "k": True}), 400, "k must be an integer"),
        (dict(json={"ids": [7], "radius": -1}), 400, "radius"),
        (dict(params={"k": "abc"}, json={"ids": [7]}), 400, "k must be an integer"),
        (dict(params={"k": "5"}, json={"ids": [7], "k": 5}), 400, "more than once"),
        (dict(params={"q": "1"}, json={"ids": [7]}), 400, "unknown query parameter 'q'"),
        (dict(json={"codes": ["00ff"]}), 400, "8 (32 bits)"),
        (dict(json={"codes": ["zzzzzzzz"]}), 400, "not hex"),
        (dict(json={"codes": [12345678]}), 400, "hex strings"),
        (dict(json={"ids": ["7"]}), 400, "integers"),
        (dict(json={"ids": [True]}), 400, "integers"),
        (dict(json={"ids": []}), 400, "non-empty"),
        (dict(json={"ids": 7}), 400, "non-empty list"),
        (dict(json={"ids": [7], "codes": ["00000000"]}), 400, "exactly one"),
        (dict(json={"k": 3}), 400, "exactly one"),
        (dict(json={"ids": [7], "colour": "red"}), 400, "unknown field 'colour'"),
        (dict(json=[7]), 400, "object"),
        (dict(json={"ids": list(range(1001))}), 400, "at most"),
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "malformed JSON"),
        (dict(content=b"[" * 100000, headers={"content-type": "application/json"}), 400, "malformed JSON"),
        (dict(content=b"\xff\xfe", headers={"content-type": "application/json"}), 400, "malformed JSON"),
        (dict(content=b""), 400, "send a JSON body"),
        (dict(content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"}), 400, ""),
        (dict(content=b"ids=7", headers={"content-type": "application/x-www-form-urlencoded"}), 400, "malformed"),
        (dict(json={"ids": [8]}), 404, "unknown id 8"),
        (dict(json={"ids": [2 ** 70]}), 404, "unknown id"),
    ]
    for kwargs, status, *words in cases:
        assert_error(client.post("/api/search", **kwargs), status, *words)
    assert_error(client.get("/api/search"), 405)
    assert_error(client.get("/no/such/page"), 404)


def test_images_need_a_model(codes_data, data):
    with TestClient(create_app(codes_data["index"])) as c:
        r = c.post("/api/search", files={"image": ("a.jpg", Path(data["paths"][0]).read_bytes(), "image/jpeg")})
        assert_error(r, 400, "--model")


def test_token_guards_api_and_metrics_not_the_page(data):
    with TestClient(create_app(data["index"], token="s3cret token")) as c:
        for path in ("/api/health", "/api/info", f"/api/items/{int(data['ids'][0])}", "/metrics"):
            r = c.get(path)
            assert_error(r, 401, "Authorization: Bearer")
            assert r.headers["www-authenticate"] == "Bearer"
            assert_error(c.get(path, headers={"Authorization": "Bearer wrong"}), 401)
            assert_error(c.get(path, headers={"Authorization": "Basic s3cret token"}), 401)
            assert c.get(path, headers={"Authorization": "Bearer s3cret token"}).status_code == 200
        assert_error(c.post("/api/search", json={"ids": [7]}), 401)
        ok = c.post("/api/search", json={"ids": [7]}, headers={"authorization": "bearer s3cret token"})
        assert ok.status_code == 200
        for path in ("/", "/static/app.js", "/openapi.json"):
            assert c.get(path).status_code == 200
        assert c.get("/api/info", headers={"Authorization": "Bearer s3cret token"}).json()["auth"] is True


def test_body_over_max_upload_is_413_before_it_is_read(data):
    jpg = Path(data["paths"][0]).read_bytes()
    limit = len(jpg) + 400  # the multipart envelope of one small file fits
    app = create_app(data["index"], data["model"], max_upload=limit)
    with TestClient(app) as c:
        assert c.post("/api/search", files={"image": ("a.jpg", jpg, "image/jpeg")}).status_code == 200
        assert_error(c.post("/api/search", files={"image": ("a.jpg", jpg * 3, "image/jpeg")}), 413, f"{limit:,}")
        assert_error(c.post("/api/search", content=b"{" + b" " * limit + b"}",
                            headers={"content-type": "application/json"}), 413)

        def chunks():  # no Content-Length: counted while it streams in
            for _ in range(10):
                yield b" " * (limit // 4)
        assert_error(c.post("/api/search", content=chunks(), headers={"content-type": "application/json"}), 413)

    # with a Content-Length over the limit, the app answers without reading the body at all
    reads, sent = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/search", "raw_path": b"/api/search", "query_string": b"", "root_path": "",
             "headers": [(b"content-length", str(50 * 2**20).encode()), (b"content-type", b"multipart/form-data")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413 and not reads


def test_cors_is_off_unless_an_origin_is_named(data):
    origin = {"Origin": "http://app.example.test"}
    with TestClient(create_app(data["index"])) as c:
        assert "access-control-allow-origin" not in c.get("/api/health", headers=origin).headers
    with TestClient(create_app(data["index"], cors_origins=["http://app.example.test"], token="t")) as c:
        r = c.get("/api/health", headers=origin | {"Authorization": "Bearer t"})
        assert r.headers["access-control-allow-origin"] == "http://app.example.test"
        pre = c.options("/api/search", headers=origin | {"Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200 and "authorization" in pre.headers["access-control-allow-headers"].lower()
        other = c.get("/api/health", headers={"Origin": "http://evil.test", "Authorization": "Bearer t"})
        assert "access-control-allow-origin" not in other.headers


# ---- micro-batching ----------------------------------------------------------------------------
def counting(obj, name):
    calls = []
    original = getattr(obj, name)

    def wrapper(x, *args, **kwargs):
        calls.append(len(x))
        return original(x, *args, **kwargs)
    setattr(obj, name, wrapper)
    return calls


async def concurrent_posts(app, requests):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        return await asyncio.gather(*(c.post("/api/search", **kw) for kw in requests))


@pytest.mark.parametrize("window_ms, max_batch, batched", [(60, 256, True), (0, 1, False)])
def test_concurrent_searches_share_one_index_search(data, window_ms, max_batch, batched):
    app = create_app(data["index"], batch_window_ms=window_ms, max_batch=max_batch)
    calls = counting(app.state.service.searcher.index, "search")
    ids = [int(i) for i in data["ids"][:24]]
    requests = [dict(json={"ids": [i], "k": 5}) for i in ids[:16]] + [dict(json={"ids": ids[16:24:2], "k": 5})]
    responses = asyncio.run(concurrent_posts(app, requests))
    assert all(r.status_code == 200 for r in responses)
    got = [res for r in responses for res in r.json()["results"]]
    want = roundtrip(query(data["index"], ids=ids[:16] + ids[16:24:2], k=5))
    assert got == want  # each request gets its own rows, in order
    assert sum(calls) == 20
    if batched:
        assert len(calls) < 17 / 2, calls  # 17 requests, a few FAISS calls
    else:
        assert len(calls) == 17
    # different k never share a call, and each still gets its own answer
    calls.clear()
    mixed = asyncio.run(concurrent_posts(app, [dict(json={"ids": ids[:2], "k": k}) for k in (3, 4, 3)]))
    assert [len(r.json()["results"][0]["neighbors"]) for r in mixed] == [3, 4, 3]
    assert len(calls) == (2 if batched else 3)
    metrics = TestClient(app).get("/metrics").text
    assert "ghindex_queries_searched_total 26" in metrics


def test_search_by_id_puts_the_item_first_or_leaves_it_out_like_query(client, data):
    first_id = int(data["ids"][0])  # GONE_ID copies its code and is stored after it
    for exclude_self in (False, True):
        r = client.post("/api/search", json={"ids": [GONE_ID, first_id], "k": 4, "exclude_self": exclude_self})
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert got == roundtrip(query(data["index"], ids=[GONE_ID, first_id], k=4, exclude_self=exclude_self))
        lists = [[n["id"] for n in res["neighbors"]] for res in got]
        if exclude_self:
            assert lists[0][0] == first_id and lists[1][0] == GONE_ID
            assert GONE_ID not in lists[0] and first_id not in lists[1] and all(len(ids) == 4 for ids in lists)
        else:
            assert lists[0][:2] == [GONE_ID, first_id] and lists[1][:2] == [first_id, GONE_ID]
    # codes are no items of the index: exclude_self changes nothing for them
    hexed = client.post("/api/search", json={"codes": ["00000000"], "k": 3}).json()["results"]
    assert client.post("/api/search", json={"codes": ["00000000"], "k": 3, "exclude_self": True}).json()["results"] == hexed
    assert_error(client.post("/api/search", json={"ids": [7], "exclude_self": "yes"}), 400, "exclude_self must be")
    assert "exclude_self" in client.get("/openapi.json").text


def test_id_searches_look_up_codes_from_memory_once_per_batch(data):
    app = create_app(data["index"], batch_window_ms=60)
    searcher = app.state.service.searcher
    searches = counting(searcher.index, "search")
    lookups = counting(searcher, "codes_for_ids")
    reads = []
    original_read = searcher.store.read
    searcher.store.read = lambda *args, **kwargs: reads.append(args) or original_read(*args, **kwargs)
    ids = [int(i) for i in data["ids"][:16]]
    requests = [dict(json={"ids": [i], "k": 5}) for i in ids[:12]] + \
        [dict(json={"ids": [i], "k": 5, "exclude_self": True}) for i in ids[12:]]
    responses = asyncio.run(concurrent_posts(app, requests))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    got = [r.json()["results"][0] for r in responses]
    assert got == roundtrip(query(data["index"], ids=ids[:12], k=5) + query(data["index"], ids=ids[12:], k=5,
                                                                              exclude_self=True))
    assert sum(lookups) == 16 and len(lookups) == len(searches) < 16 / 2, (lookups, searches)
    assert reads == []  # a flat index's codes, cached paths: no HDF5 read for any request


def test_a_failed_id_lookup_answers_only_its_own_request(data):
    from ghindex.errors import ConfigError
    from ghindex.serve.service import SearchJob

    app = create_app(data["index"])
    service = app.state.service
    good, bad = int(data["ids"][1]), 8  # 8: not stored (the parser answers 404 before a batch sees it)
    out = service._search_batch([SearchJob(3, None, ids=[good]), SearchJob(3, None, ids=[good, bad]),
                                 SearchJob(3, None, codes=np.zeros((1, 4), np.uint8), meta=[{"query": "zero",
                                                                                            "query_label": None}])])
    assert out[0] == query(data["index"], ids=[good], k=3)
    assert isinstance(out[1], ConfigError) and "id 8 is not in code store" in str(out[1])
    assert len(out[2][0]["neighbors"]) == 3


def test_concurrent_uploads_share_one_encoder_call(data):
    app = create_app(data["index"], data["model"], batch_window_ms=60)
    searcher = app.state.service.searcher
    calls = counting(searcher, "hash_outputs")
    picks = data["paths"][:6]
    responses = asyncio.run(concurrent_posts(app, [
        dict(params={"k": 4}, files={"image": (Path(p).name, Path(p).read_bytes(), "image/jpeg")}) for p in picks]))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert sum(calls) == 6 and len(calls) < 3, calls
    want = roundtrip(query(data["index"], model=data["model"], images=picks, k=4))
    assert [r.json()["results"][0]["neighbors"] for r in responses] == neighbours(want)


def test_batcher_errors_reach_only_their_caller():
    from ghindex.serve.batching import MicroBatcher

    def run(items):
        if "boom" in items:
            raise RuntimeError("whole batch failed")
        return [ValueError(f"bad {i}") if i < 0 else i * 2 for i in items]

    async def main():
        b = MicroBatcher(run, window_s=0.02, max_size=3)
        results = await asyncio.gather(*(b.submit(i) for i in (1, -1, 2, 3, 4)), return_exceptions=True)
        calls = b.calls
        failed = await asyncio.gather(b.submit("boom"), return_exceptions=True)
        await b.stop()
        return results, failed, calls

    results, failed, calls = asyncio.run(main())
    assert results[0] == 2 and isinstance(results[1], ValueError) and results[2:] == [4, 6, 8]
    assert calls == 2  # cap 3: (1, -1, 2) then (3, 4)
    assert isinstance(failed[0], RuntimeError)


def test_batcher_waits_only_for_announced_requests():
    from ghindex.serve.batching import MicroBatcher

    async def main():
        b = MicroBatcher(lambda items: [len(items)] * len(items), window_s=5.0, max_size=100)
        start = time.perf_counter()
        with b.expecting() as ticket:  # alone: answered without waiting out the 5 s window
            alone = await b.submit("a", ticket)
        lone_seconds = time.perf_counter() - start

        async def late(delay):  # announced now, submits after `delay`
            with b.expecting() as t:
                await asyncio.sleep(delay)
                return await b.submit("x", t)

        burst = await asyncio.gather(*(late(d) for d in (0, 0.05, 0.1, 0.15)))
        await b.stop()
        return alone, lone_seconds, burst, b.calls

    alone, lone_seconds, burst, calls = asyncio.run(main())
    assert alone == 1 and lone_seconds < 1.0
    assert burst == [4, 4, 4, 4] and calls == 2  # the burst waited for its late members: one call


def test_batcher_without_a_window_batches_what_queued_during_the_last_call():
    """window 0 ("natural" batching): a lone request runs at once, even with another one announced;
    requests that arrive while a call runs all go into the next call."""
    import threading

    from ghindex.serve.batching import MicroBatcher

    gate, seen = threading.Event(), []

    def run(items):
        seen.append(list(items))
        if items == ["a"]:
            gate.wait(10)
        return [f"{item}!" for item in items]

    async def main():
        b = MicroBatcher(run, window_s=0.0, max_size=100)
        with b.expecting():  # announced, never submits: nothing waits for it without a window
            start = time.perf_counter()
            first = asyncio.ensure_future(b.submit("a"))
            while not seen and time.perf_counter() - start < 5:
                await asyncio.sleep(0.001)
            started = time.perf_counter() - start
            rest = [asyncio.ensure_future(b.submit(x)) for x in "bcd"]
            await asyncio.sleep(0.05)  # they queue while "a" runs
            gate.set()
            results = await asyncio.gather(first, *rest)
        await b.stop()
        return started, results

    started, results = asyncio.run(main())
    assert started < 1.0
    assert results == ["a!", "b!", "c!", "d!"]
    assert seen == [["a"], ["b", "c", "d"]]


def test_batcher_stops_waiting_when_the_last_announced_request_gives_up():
    from ghindex.serve.batching import MicroBatcher

    async def main():
        b = MicroBatcher(lambda items: list(items), window_s=5.0, max_size=100)

        async def gives_up():
            with b.expecting():
                await asyncio.sleep(0.1)  # e.g. its input was refused: it never submits

        start = time.perf_counter()
        with b.expecting() as ticket:
            task = asyncio.ensure_future(gives_up())
            await asyncio.sleep(0)
            got = await b.submit("x", ticket)
        await task
        await b.stop()
        return got, time.perf_counter() - start, b.calls

    got, seconds, calls = asyncio.run(main())
    assert got == "x" and calls == 1
    assert 0.09 < seconds < 2.0  # waited for the announced one, not for the 5 s window


def test_announced_batcher_never_waits_for_unannounced_requests():
    from ghindex.serve.batching import MicroBatcher

    async def main():
        b = MicroBatcher(lambda items: list(items), window_s=5.0, max_size=100, announced=True)
        start = time.perf_counter()
        got = await b.submit("x")  # e.g. a search right after its images were encoded
        await b.stop()
        return got, time.perf_counter() - start

    got, seconds = asyncio.run(main())
    assert got == "x" and seconds < 1.0


def test_image_searches_answer_a_lone_upload_without_waiting_for_a_window(data):
    app = create_app(data["index"], data["model"], batch_window_ms=1000)
    upload = {"image": ("a.jpg", Path(data["paths"][0]).read_bytes(), "image/jpeg")}
    with TestClient(app) as c:
        c.post("/api/search", params={"k": 3}, files=upload)  # the model's first forward is slow
        start = time.perf_counter()
        r = c.post("/api/search", params={"k": 3}, files=upload)
        seconds = time.perf_counter() - start
    assert r.status_code == 200 and len(r.json()["results"][0]["neighbors"]) == 3
    assert seconds < 0.95  # neither the encoder nor the search waited out the 1 s window


def test_scan_threads_leave_a_core_to_the_event_loop():
    from ghindex.serve.service import scan_threads

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert scan_threads(1) == 1
    for n in (1, 8, 64, 10_000):
        assert 1 <= scan_threads(n) <= max(1, cores - 1)


def test_request_guard_endpoints_and_headers_on_the_json_fast_path(data):
    from ghindex.serve.middleware import RequestGuard

    app = create_app(data["index"])
    guard = RequestGuard(None, app.state.service, app.router)
    for method in ("GET", "POST", "HEAD", "PUT"):
        for path in ("/", "/api/health", "/api/info", "/api/search", "/api/search/", "/api/sample", "/metrics",
                     "/openapi.json", "/api/items/7", "/api/items/7/image", "/static/app.js", "/no/such"):
            scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}
            assert guard._endpoint(dict(scope)) == guard._match(dict(scope)), (method, path)
    with TestClient(app) as c:
        ok = c.post("/api/search", json={"ids": [7], "k": 2})
        bad = c.post("/api/search", json={"ids": [7], "k": 0})
        metrics = c.get("/metrics").text
    for r in (ok, bad):
        assert r.headers["content-type"] == "application/json"
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert ok.status_code == 200 and len(ok.json()["results"][0]["neighbors"]) == 2
    assert_error(bad, 400, "k must be")
    assert 'ghindex_requests_total{endpoint="/api/search",method="POST",status="400"} 1' in metrics


def test_serving_process_settles_before_the_first_request(data):
    import gc

    from ghindex.serve.server import settle

    app = create_app(data["index"])
    calls = counting(app.state.service.searcher.index, "search")
    try:
        settle(app)
        assert calls == [1]  # one warm-up search
        assert gc.get_freeze_count() > 0  # what was loaded is out of the collector's way
    finally:
        gc.unfreeze()


# ---- metrics -----------------------------------------------------------------------------------
def test_metrics_in_prometheus_text(data):
    with TestClient(create_app(data["index"])) as c:
        c.post("/api/search", json={"ids": [7, 17], "k": 3})
        c.post("/api/search", json={"ids": [8]})
        c.get("/api/health")
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert 'ghindex_requests_total{endpoint="/api/search",method="POST",status="200"} 1' in text
    assert 'ghindex_requests_total{endpoint="/api/search",method="POST",status="404"} 1' in text
    assert 'ghindex_request_duration_seconds_bucket{endpoint="/api/search",le="+Inf"} 2' in text
    assert 'ghindex_request_duration_seconds_count{endpoint="/api/health"} 1' in text
    assert "ghindex_queries_searched_total 2" in text
    assert f"ghindex_index_codes {len(data['ids'])}" in text
    assert "# TYPE ghindex_request_duration_seconds histogram" in text
    for line in text.splitlines():  # every sample line: name{labels} value
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


# ---- command line ------------------------------------------------------------------------------
def test_serve_cli_options_env_token_and_errors(runner, data, monkeypatch):
    import ghindex.serve

    seen = {}
    monkeypatch.setattr(ghindex.serve, "serve", lambda index, model, **kw: seen.update(kw, index=index))
    monkeypatch.setenv("GHINDEX_TOKEN", "from-env")
    result = runner.invoke(cli, ["serve", "--index", str(data["index"]), "--port", "0", "--max-upload", "1M",
                                 "--batch-window-ms", "0", "--max-batch", "1", "--cors-origin", "http://a.test"])
    assert result.exit_code == 0, result.output
    assert seen["token"] == "from-env" and seen["host"] == "127.0.0.1" and seen["max_batch"] == 1
    assert seen["cors_origins"] == ("http://a.test",) and seen["max_upload"] == "1M"
    monkeypatch.undo()
    monkeypatch.delenv("GHINDEX_TOKEN", raising=False)
    for args, words in ((["--index", str(data["folder"] / "missing")], ["missing"]),
                        (["--index", str(data["index"]), "--max-upload", "lots"], ["--max-upload"]),
                        (["--index", str(data["index"]), "--model", str(data["big"])], ["big.png"])):
        result = runner.invoke(cli, ["serve", *args, "--port", "0"])
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("Error: ") and all(w in lines[-1] for w in words), lines
        assert "Traceback" not in result.output
    busy = bind("127.0.0.1", 0)
    try:
        port = busy.getsockname()[1]
        result = runner.invoke(cli, ["serve", "--index", str(data["index"]), "--port", str(port)])
        assert result.exit_code == 1 and "cannot listen on 127.0.0.1" in result.stderr
    finally:
        busy.close()


def test_host_warning_and_sizes():
    assert host_warning("127.0.0.1", None) is None and host_warning("localhost", None) is None
    assert host_warning("::1", None) is None and host_warning("0.0.0.0", "t") is None
    assert "without a token" in host_warning("0.0.0.0", None)
    assert "without a token" in host_warning("192.0.2.7", "")
    assert parse_upload_size("20M") == 20 * 2**20 and parse_upload_size("512k") == 512 * 1024
    assert parse_upload_size("1000") == 1000 and parse_upload_size("1.5GB") == int(1.5 * 2**30)


@contextlib.contextmanager
def serve_process(args, cwd, env=None):
    """`ghindex serve ARGS` as a real process: yields (its URL line, a dict that gets "stderr", the rest of
    stderr, once the process has stopped on Ctrl-C). Fails if it exits non-zero or prints a traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "ghindex_cli", "serve", *map(str, args), "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=cwd)
    after = {}
    try:
        lines = [proc.stderr.readline()]
        while not lines[-1].startswith("ghindex serve:") and lines[-1] and len(lines) < 20:
            lines.append(proc.stderr.readline())  # e.g. "no GPU visible to FAISS" before it
        assert lines[-1].startswith("ghindex serve: http://127.0.0.1:"), lines
        yield lines[-1], after
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            after["stderr"] = proc.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0 and "Traceback" not in after["stderr"], after["stderr"]


def test_serve_runs_and_prints_its_url(data, tmp_path):
    """The real command: one URL line on stderr within seconds, answers over TCP, stops on Ctrl-C."""
    env = dict(os.environ, GHINDEX_TOKEN="tok")
    start = time.monotonic()
    with serve_process(["--index", data["index"], "--model", data["model"]], tmp_path, env) as (line, after):
        assert time.monotonic() - start < 60
        url = line.split()[2]
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("api/health").status_code == 401
            r = c.get("api/health", headers={"Authorization": "Bearer tok"})
            assert r.json()["ntotal"] == len(data["ids"])
            assert "<title>ghindex</title>" in c.get("").text
    assert "stopped" in after["stderr"], after["stderr"]


def test_readme_serve_block_uses_real_options():
    from test_readme import commands

    cmds = commands("serve")
    assert any(args[0] == "serve" for args in cmds)
    import click

    ctx = click.Context(cli)
    for args in cmds:
        command = cli.get_command(ctx, args[0])
        names = {o for p in command.params for o in p.opts + p.secondary_opts}
        for token in args[1:]:
            if token.startswith("--"):
                assert token.split("=")[0] in names, token



def test_a_non_editable_install_ships_the_package_and_its_page():
    import fnmatch
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = config["tool"]["setuptools"]
    assert {"ghindex.serve", "ghindex.serve.static"} <= set(setuptools["packages"])
    patterns = setuptools["package-data"]["ghindex.serve.static"]
    for f in (ROOT / "ghindex" / "serve" / "static").iterdir():
        assert any(fnmatch.fnmatch(f.name, p) for p in patterns), f"{f.name} would not be installed"
    extras = config["project"]["optional-dependencies"]
    names = {re.split(r"[<>=;\[ ]", d)[0] for d in extras["dev"]}
    assert {re.split(r"[<>=;\[ ]", d)[0] for d in extras["serve"]} <= names
    assert {"httpx", "playwright"} <= names
