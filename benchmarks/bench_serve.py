"""`ghindex serve` under load: micro-batched serving side by side with one-at-a-time serving.

    .venv/bin/python benchmarks/bench_serve.py [--n 1000000] [--requests 2000] [--memory-requests 20000]
        [--concurrency 1,8,32] [--demo demo-out] [--phases codes,images,wrk] [--json results.json]

Every request goes to 127.0.0.1 only, from loops bounded in count (--requests, --memory-requests) and
in time (--max-seconds per phase, --timeout per request, --wrk-seconds per wrk run).

1. Index: --n random 64-bit codes (seeded) in a code store and a flat index (BFlat), in --work
   (reused when it already holds the same N).
2. Each mode runs the real command in its own process, `python -m ghindex_cli serve --index ...
   --port 0`, so its resident memory is the server's alone:
   - batched: the defaults (--batch-window-ms 2, --max-batch 256);
   - one-at-a-time: --batch-window-ms 0 --max-batch 1 (one FAISS call per request, in turn).
3. Code queries: for each concurrency C, C keep-alive HTTP/1.1 connections send --requests POST
   /api/search {"codes": [one random code], "k": 10} between them; queries/s, p50 and p99 latency,
   failed requests (status != 200 or no answer).
4. Memory (batched mode): the server's RSS (VmRSS) after a warm-up, then after --memory-requests more
   code queries at the highest concurrency.
5. Image queries with the demo model (--demo: the folder `make demo` writes, with index/ and model.ghm):
   uploads of the shipped query images (multipart, field `image`, k=10) at concurrency 1 and 8, in
   both modes.
6. wrk (a C load generator, `apt-get install wrk`; the phase is skipped without it), batched mode:
   code queries and id queries (one random code / one random stored id per request, k=10) at each
   of --wrk-connections (1 and 32) for --wrk-seconds each; queries/s, p50/p99, and the ratios 32 / 1
   connections. Issue 23's bar: id searches at 32 connections >= 2x one connection.

Phases 3-5's client is asyncio (on uvloop when installed) with hand-written HTTP/1.1 (much cheaper
than an HTTP library) in this process: on a 2-core machine it competes with the server for the CPU,
like any local load generator (wrk too).
Print a table; --json also writes every number with the machine, date and load average.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {
    "batched": [],  # the defaults
    "one-at-a-time": ["--batch-window-ms", "0", "--max-batch", "1"],
}


# ------------------------------------------------------------------------------------------ data
def make_index(work: Path, n: int, seed: int = 0) -> Path:
    """A code store of n random 64-bit codes and its flat index, reused when already there."""
    from ghindex.index import build
    from ghindex.store import CodeStore

    index = work / f"random-{n}" / "index"
    if (index / "meta.json").is_file():
        return index
    index.parent.mkdir(parents=True, exist_ok=True)
    store = index.parent / "db.h5"
    store.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    with CodeStore.create(store, 64) as s:
        for start in range(0, n, 1_000_000):
            rows = min(1_000_000, n - start)
            s.append(rng.integers(0, 256, (rows, 8), dtype=np.uint8), np.arange(start, start + rows))
        s.mark_complete()
    build(store, index, index_key="BFlat", gpu="off")
    return index


# ---------------------------------------------------------------------------------------- server
class Server:
    """`ghindex serve` in a subprocess on 127.0.0.1 and a free port."""

    def __init__(self, index: Path, extra: list[str], model: Path | None = None, gpu: str = "off"):
        cmd = [sys.executable, "-m", "ghindex_cli", "-q", "serve", "--index", str(index), "--host", "127.0.0.1",
               "--port", "0", "--gpu", gpu, *extra]
        if model is not None:
            cmd += ["--model", str(model)]
        env = dict(os.environ)
        env.pop("GHINDEX_TOKEN", None)
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                                     cwd=ROOT)
        self.log: list[str] = []
        deadline = time.monotonic() + 300
        line = ""
        while not line.startswith("ghindex serve:"):
            line = self.proc.stderr.readline()
            if not line or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start:\n" + "".join(self.log))
            self.log.append(line)
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        self.port = int(match.group(1))
        # keep draining stderr so the server never blocks on a full pipe
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

    def rss_mb(self) -> float:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------- client
class Connection:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1."""

    def __init__(self, port: int):
        self.port = port
        self.reader = self.writer = None

    async def request(self, body: bytes, content_type: str, path: str = "/api/search") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()
        # the status line and headers in one read (a readline per header costs the client as much again)
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        data = await self.reader.readexactly(length)
        if close:
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def load(port: int, bodies: list[tuple[bytes, str]], total: int, concurrency: int, max_seconds: float,
               timeout: float) -> dict:
    """`total` requests from `concurrency` connections, cycling through `bodies`."""
    latencies: list[float] = []
    failed = 0
    issued = 0
    deadline = time.monotonic() + max_seconds

    async def worker(w: int):
        nonlocal issued, failed
        conn = Connection(port)
        rng = random.Random(w)
        try:
            while issued < total and time.monotonic() < deadline:
                issued += 1
                body, content_type = bodies[rng.randrange(len(bodies))]
                start = time.perf_counter()
                try:
                    status, _ = await asyncio.wait_for(conn.request(body, content_type), timeout)
                except (asyncio.TimeoutError, OSError, ValueError, IndexError, asyncio.IncompleteReadError,
                        asyncio.LimitOverrunError):
                    failed += 1
                    conn.close()
                    continue
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    failed += 1
        finally:
            conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"concurrency": concurrency, "requests": issued, "answered": len(latencies), "failed": failed,
            "seconds": round(elapsed, 3), "per_second": round(len(latencies) / elapsed, 1) if elapsed else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2)}


def run_client(coro):
    """Run a load coroutine on a fresh event loop: uvloop's when it is installed (it is with the serve
    extra), which halves the client's share of the CPU it competes for with the server."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def code_bodies(n: int, seed: int = 1) -> list[tuple[bytes, str]]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    return [(json.dumps({"codes": [c.tobytes().hex()], "k": 10}).encode(), "application/json") for c in codes]


def image_bodies(folder: Path, limit: int = 64) -> list[tuple[bytes, str]]:
    files = sorted(folder.rglob("*.jpg"))
    files = files[:: max(1, len(files) // limit)][:limit]
    out = []
    for f in files:
        boundary = "ghindexbench7f3a"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{f.name}\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode() + f.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        out.append((body, f"multipart/form-data; boundary={boundary}"))
    return out


# ------------------------------------------------------------------------------------------- wrk
#: wrk script: POSTs the bodies of BODIES.lua in turn (each thread from its own offset, requests made
#: once in `init`), and writes its summary as one JSON line at the end.
WRK_SCRIPT = r"""
local bodies = dofile(os.getenv("GHINDEX_WRK_BODIES"))
local requests, next_one = {}, 1
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("offset", thread_count * 7919)
end

function init(args)
  for i, body in ipairs(bodies) do
    requests[i] = wrk.format("POST", "/api/search", {["Content-Type"] = "application/json"}, body)
  end
  next_one = (offset or 0) % #requests + 1
end

function request()
  local r = requests[next_one]
  next_one = next_one % #requests + 1
  return r
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'GHINDEX_WRK {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def lua_bodies(path: Path, bodies: list[str]) -> Path:
    """A Lua file returning the request bodies (JSON text) as a table of strings."""
    path.write_text("return {\n" + "".join(f"  {json.dumps(b)},\n" for b in bodies) + "}\n")
    return path


def run_wrk(port: int, bodies_file: Path, script: Path, connections: int, seconds: float, threads: int) -> dict:
    """One wrk run against POST /api/search on 127.0.0.1; bounded by `seconds` (and a kill after)."""
    threads = max(1, min(threads, connections))
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
           "--timeout", "10s", "-s", str(script), f"http://127.0.0.1:{port}/api/search"]
    env = dict(os.environ, GHINDEX_WRK_BODIES=str(bodies_file))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("GHINDEX_WRK ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    r = json.loads(line.split(" ", 1)[1])
    elapsed = r["duration_us"] / 1e6
    failed = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    answered = r["requests"] - r["status"]  # wrk counts a non-2xx answer in requests too
    return {"connections": connections, "threads": threads, "requests": r["requests"], "failed": failed,
            "seconds": round(elapsed, 3), "per_second": round(answered / elapsed, 1) if elapsed else 0.0,
            "p50_ms": round(r["p50_us"] / 1000, 2), "p99_ms": round(r["p99_us"] / 1000, 2)}


def wrk_phase(index: Path, n: int, args) -> dict:
    """Code and id queries with wrk at each of --wrk-connections, on one batched server."""
    rng = np.random.default_rng(2)
    pool = args.wrk_pool
    kinds = {
        "codes": [json.dumps({"codes": [c.tobytes().hex()], "k": 10})
                  for c in rng.integers(0, 256, (pool, 8), dtype=np.uint8)],
        "ids": [json.dumps({"ids": [int(i)], "k": 10}) for i in rng.integers(0, n, pool)],  # ids 0..n-1
    }
    connections = [int(c) for c in args.wrk_connections.split(",")]
    out: dict = {"connections": connections, "seconds": args.wrk_seconds, "rows": {}}
    with tempfile.TemporaryDirectory(prefix="ghindex-wrk-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(WRK_SCRIPT)
        server = Server(index, MODES["batched"], gpu=args.gpu)
        try:
            print(f"{'queries':<8} {'conn':>4} {'requests':>9} {'queries/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
                  f"{'failed':>6}")
            for kind, bodies in kinds.items():
                bodies_file = lua_bodies(Path(tmp) / f"{kind}.lua", bodies)
                run_wrk(server.port, bodies_file, script, max(connections), 1, args.wrk_threads)  # warm-up
                out["rows"][kind] = []
                for c in connections:
                    r = run_wrk(server.port, bodies_file, script, c, args.wrk_seconds, args.wrk_threads)
                    out["rows"][kind].append(r)
                    print(f"{kind:<8} {c:>4} {r['requests']:>9,} {r['per_second']:>10,.1f} {r['p50_ms']:>8.2f} "
                          f"{r['p99_ms']:>8.2f} {r['failed']:>6}", flush=True)
        finally:
            server.stop()
    low, high = min(connections), max(connections)
    ratios = {}
    for kind, rows in out["rows"].items():
        by = {r["connections"]: r["per_second"] for r in rows}
        if low != high:
            ratios[f"{kind}_{high}_over_{low}"] = round(by[high] / max(by[low], 1e-9), 2)
            print(f"{kind}: {high} / {low} connections: {ratios[f'{kind}_{high}_over_{low}']:.2f}x queries/s")
    for c in connections:
        codes = next(r["per_second"] for r in out["rows"]["codes"] if r["connections"] == c)
        ids = next(r["per_second"] for r in out["rows"]["ids"] if r["connections"] == c)
        ratios[f"ids_over_codes_at_{c}"] = round(ids / max(codes, 1e-9), 2)
        print(f"ids / codes at {c} connection(s): {ratios[f'ids_over_codes_at_{c}']:.2f}x")
    out["ratios"] = ratios
    if low != high:
        met = ratios[f"ids_{high}_over_{low}"] >= 2
        out["bar_ids_scale_2x"] = met
        print(f"bar (issue 23): id searches at {high} connections >= 2x {low}: {'met' if met else 'NOT met'}")
    return out


# ------------------------------------------------------------------------------------------ main
def row(mode: str, r: dict) -> str:
    return (f"{mode:<14} {r['concurrency']:>4} {r['answered']:>8,} {r['per_second']:>10,.1f} {r['p50_ms']:>8.2f} "
            f"{r['p99_ms']:>8.2f} {r['failed']:>6}")


HEADER = f"{'mode':<14} {'conc':>4} {'answered':>8} {'queries/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6}"


def run_modes(index: Path, model: Path | None, bodies, concurrency: list[int], requests: int, args,
              memory_requests: int = 0) -> tuple[dict, dict | None]:
    """Each mode's server in turn: a warm-up, then `requests` at each concurrency (and, for the batched
    mode, `memory_requests` more between two RSS readings). Prints a row per measurement."""
    rows, memory = {}, None
    for mode, extra in MODES.items():
        server = Server(index, extra, model=model, gpu=args.gpu)
        try:
            run_client(load(server.port, bodies, 20, 2, args.max_seconds, args.timeout))  # warm-up
            rows[mode] = []
            for c in concurrency:
                r = run_client(load(server.port, bodies, requests, c, args.max_seconds, args.timeout))
                rows[mode].append(r)
                print(row(mode, r), flush=True)
            if mode == "batched" and memory_requests:
                before = server.rss_mb()
                r = run_client(load(server.port, bodies, memory_requests, max(concurrency), args.max_seconds,
                                     args.timeout))
                after = server.rss_mb()
                memory = {"rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
                          "growth_mb": round(after - before, 1), **r}
        finally:
            server.stop()
    return rows, memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="random 64-bit database codes")
    p.add_argument("--requests", type=int, default=2000, help="code queries per (mode, concurrency)")
    p.add_argument("--memory-requests", type=int, default=20_000, help="code queries between the two RSS readings")
    p.add_argument("--concurrency", default="1,8,32", help="client connections, comma-separated")
    p.add_argument("--image-requests", type=int, default=200, help="image queries per (mode, concurrency)")
    p.add_argument("--image-concurrency", default="1,8")
    p.add_argument("--demo", type=Path, default=ROOT / "demo-out", help="folder of `make demo` (index/, model.ghm)")
    p.add_argument("--images", type=Path, default=ROOT / "data" / "cifar10-demo" / "query")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ghindex-bench-serve")
    p.add_argument("--gpu", choices=["auto", "on", "off"], default="off", help="the server's --gpu")
    p.add_argument("--max-seconds", type=float, default=300, help="time limit of each load phase")
    p.add_argument("--timeout", type=float, default=30, help="time limit of one request")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--phases", default="codes,images,wrk",
                   help="comma-separated: codes (Python client, both modes, memory), images, wrk")
    p.add_argument("--wrk-connections", default="1,32", help="wrk connections, comma-separated")
    p.add_argument("--wrk-seconds", type=float, default=10, help="length of each wrk run")
    p.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (at most the connections)")
    p.add_argument("--wrk-pool", type=int, default=4096, help="distinct request bodies wrk cycles through")
    args = p.parse_args()
    phases = set(args.phases.split(","))
    if phases - {"codes", "images", "wrk"}:
        p.error(f"unknown phase(s): {', '.join(sorted(phases - {'codes', 'images', 'wrk'}))}")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    image_concurrency = [int(c) for c in args.image_concurrency.split(",")]

    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": platform.platform(), "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(), "n": args.n, "requests": args.requests, "gpu": args.gpu,
        "codes": {}, "memory": None, "images": {}, "wrk": None,
    }
    print(f"{results['date']}  {platform.node()}  {os.cpu_count()} CPUs  load {os.getloadavg()[0]:.2f}")
    t = time.perf_counter()
    index = make_index(args.work, args.n)
    print(f"index: {args.n:,} random 64-bit codes, BFlat ({index}; {time.perf_counter() - t:.1f} s)\n")
    if "codes" in phases:
        bodies = code_bodies(4096)
        print(f"code queries, k=10, {args.requests:,} requests per row")
        print(HEADER)
        results["codes"], results["memory"] = run_modes(index, None, bodies, concurrency, args.requests, args,
                                                        memory_requests=args.memory_requests)
        top = max(concurrency)
        by = {m: {r["concurrency"]: r for r in rows} for m, rows in results["codes"].items()}
        if top in by.get("batched", {}) and top in by.get("one-at-a-time", {}):
            ratio = by["batched"][top]["per_second"] / max(by["one-at-a-time"][top]["per_second"], 1e-9)
            results["speedup_at_top_concurrency"] = round(ratio, 2)
            print(f"batched / one-at-a-time at {top} connections: {ratio:.2f}x queries/s")
        if results["memory"]:
            m = results["memory"]
            print(f"memory (batched): RSS {m['rss_before_mb']:.1f} MB -> {m['rss_after_mb']:.1f} MB after "
                  f"{m['answered']:,} more requests ({m['growth_mb']:+.1f} MB), {m['failed']} failed")

    if "images" in phases:
        model, demo_index = args.demo / "model.ghm", args.demo / "index"
        if model.is_file() and (demo_index / "meta.json").is_file():
            images = image_bodies(args.images)
            print(f"\nimage queries with the demo model ({demo_index}), k=10, {args.image_requests:,} uploads per row")
            print(HEADER.replace("queries/s", " images/s"))
            results["images"], _ = run_modes(demo_index, model, images, image_concurrency, args.image_requests, args)
        else:
            print(f"\nimage queries skipped: no {model} and {demo_index} (run `make demo`, or pass --demo DIR)")

    if "wrk" in phases:
        if shutil.which("wrk"):
            print(f"\nwrk: code and id queries, k=10, batched server, {args.wrk_seconds:g} s per row")
            results["wrk"] = wrk_phase(index, args.n, args)
        else:
            print("\nwrk phase skipped: wrk is not installed (apt-get install wrk)")
    results["load_average_after"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
