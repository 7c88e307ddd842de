"""Benchmark: the Serve search app under concurrent load, Serve's defaults vs the app's flags.

Usage (from the repo root)::

    python bench/serve_load.py                       # store built from shared/audio (12 clips)
    python bench/serve_load.py --store demo_store --duration 5 --json out.json
    python bench/serve_load.py --quick               # small size
    python bench/serve_load.py --smoke               # CI: every code path, no figure

Everything is on loopback (127.0.0.1, a free port); each measurement is bounded in time
(``--duration``) and in count (``--max-requests``), each request by ``--timeout``.

Configurations, deployed one after the other on the same Ray Serve instance and store:

``serve-defaults``
    ``serve.deployment`` without options: ``max_ongoing_requests`` 5 per replica, no queue limit.
    Requests beyond 5 wait in the proxy's router, which retries with exponential back-off
    (25 ms doubling to 0.5 s) instead of being woken when a slot frees: throughput collapses
    and latencies reach seconds once the connections outnumber the slots several times.
``flags``
    :func:`pipeline.search.web.deployment_options` with the defaults of ``jobs/serve_search.py``
    (``--max-ongoing 64 --max-queued 64``): the replica takes up to 64 requests at once (its
    event loop and thread pool interleave them), 64 more wait in the proxy, the rest get a
    fast 503 with ``Retry-After``.
``overload``
    the same with ``--max-ongoing 4 --max-queued 8``, loaded with 64 connections: what past
    capacity looks like (fast 503s with ``Retry-After``, no multi-second queue).

Measured per configuration: ``GET /healthz`` and ``GET /similar/{id}`` at each concurrency of
``--concurrency`` (req/s, p50 / p99 latency, non-2xx, timeouts), then for ``flags`` the page's own
paths: ``GET /`` and ``/static/app.js``, ``GET /audio/{id}`` with random single ``Range``
requests (all must be 206), and audio uploads to ``POST /api/upload`` (embedding on the replica).

Goal: at 64 connections >= 80 % of the best throughput at any concurrency, no timeouts.

GET sweeps use ``wrk`` when it is installed (``apt-get install -y wrk``; ``--client python``
forces the built-in asyncio client), ranges and uploads always the asyncio client.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@dataclass
class Load:
    """One measurement: ``conns`` connections hammering ``path`` for ``seconds``."""

    config: str
    path: str
    conns: int
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    non_2xx: int = 0
    timeouts: int = 0
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    retry_after: str | None = None
    p50_503_ms: float | None = None


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]


# --------------------------------------------------------------------------- asyncio HTTP/1.1 client


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], int]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        n = int(headers["content-length"])
        await reader.readexactly(n)
        return status, headers, n
    if headers.get("transfer-encoding", "").lower() == "chunked":
        total = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            await reader.readexactly(size + 2)
            total += size
            if size == 0:
                return status, headers, total
    return status, headers, 0


async def _load(
    port: int,
    make_request: callable,
    conns: int,
    seconds: float,
    max_requests: int,
    timeout: float,
    check: callable | None = None,
) -> dict:
    deadline = time.perf_counter() + seconds
    budget = [max_requests]
    lat: list[float] = []
    lat503: list[float] = []
    statuses: Counter = Counter()
    counters = Counter()
    retry_after: list[str] = []

    async def worker(wid: int) -> None:
        reader = writer = None
        rng = random.Random(wid)
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", port), timeout
                    )
                req = make_request(rng)
                t0 = time.perf_counter()
                writer.write(req)
                status, headers, _ = await asyncio.wait_for(_read_response(reader), timeout)
                dt = time.perf_counter() - t0
            except asyncio.TimeoutError:
                counters["timeouts"] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            except (OSError, asyncio.IncompleteReadError, ValueError):
                counters["errors"] += 1
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.01)
                continue
            statuses[str(status)] += 1
            if status == 503:
                lat503.append(dt)
                if "retry-after" in headers:
                    retry_after.append(headers["retry-after"])
            else:
                lat.append(dt)
            if check is not None and not check(status, headers):
                counters["check_failed"] += 1
            if headers.get("connection", "").lower() == "close":
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(conns)))
    wall = time.perf_counter() - t0
    n = sum(statuses.values())
    return {
        "requests": n,
        "seconds": wall,
        "rps": n / wall if wall else 0.0,
        "p50_ms": 1e3 * _pct(lat, 0.5),
        "p99_ms": 1e3 * _pct(lat, 0.99),
        "non_2xx": sum(v for k, v in statuses.items() if not k.startswith("2")),
        "timeouts": counters["timeouts"],
        "errors": counters["errors"] + counters["check_failed"],
        "statuses": dict(statuses),
        "retry_after": retry_after[0] if retry_after else None,
        "p50_503_ms": 1e3 * _pct(lat503, 0.5) if lat503 else None,
    }


def _get(path: str) -> callable:
    req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    return lambda rng: req


# --------------------------------------------------------------------------- wrk

_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _wrk_ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text.strip())
    return float(m.group(1)) * _WRK_UNITS[m.group(2)] if m else 0.0


def _wrk(port: int, path: str, conns: int, seconds: float, timeout: float) -> dict:
    threads = max(1, min(2, conns))
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={max(1, round(timeout))}s",
        "--latency",
        f"http://127.0.0.1:{port}{path}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + timeout + 30).stdout
    res = {"requests": 0, "rps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "non_2xx": 0, "timeouts": 0, "errors": 0}
    if m := re.search(r"(\d+) requests in ([\d.]+)(\w+)", out):
        res["requests"] = int(m.group(1))
        res["seconds"] = _wrk_ms(m.group(2) + m.group(3)) / 1e3
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        res["rps"] = float(m.group(1))
    if m := re.search(r"\s50%\s+(\S+)", out):
        res["p50_ms"] = _wrk_ms(m.group(1))
    if m := re.search(r"\s99%\s+(\S+)", out):
        res["p99_ms"] = _wrk_ms(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        res["non_2xx"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        res["errors"] = int(m.group(1)) + int(m.group(2)) + int(m.group(3))
        res["timeouts"] = int(m.group(4))
    return res


# --------------------------------------------------------------------------- store and app


def build_store(out: str) -> str:
    """Embed the 12 clips of shared/audio with the small golden model (10 s windows)."""
    from pipeline.runs.embed import run_embed
    from pipeline.runs.settings import EmbedJob
    from tools.testkit.paths import require_shared

    AUDIO, GOLDEN = require_shared() / "audio", require_shared() / "golden"
    os.makedirs(out, exist_ok=True)
    catalog = os.path.join(out, "catalog.csv")
    with open(AUDIO / "catalog.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(catalog, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["track_id", "uri", "title", "artist"])
        for r in rows:
            w.writerow([r["track_id"], str(AUDIO / r["uri"]), r["title"], r["artist"]])
    job = EmbedJob(
        catalog=catalog,
        output=os.path.join(out, "store"),
        checkpoint=str(GOLDEN / "checkpoint.pt"),
        stats=str(GOLDEN / "stats.json"),
        layers=(1, 3),
        precision="fp32",
        window_s=10.0,
        hop_s=10.0,
        batch_size=4,
        decode_cpus=1,
        allowed_prefixes=(str(AUDIO),),
    )
    report = run_embed(job, progress=False)
    if report.status != "ok":
        raise SystemExit(f"serve_load: error: building the store failed: {report.status}")
    return os.path.join(out, "store")


def deploy(port: int, store: str, name: str, options: dict) -> str:
    import requests
    from ray import serve

    from pipeline.search.service import serve_app

    cfg = {"store": store, "refresh_s": 30.0}
    serve.run(serve_app(cfg, num_cpus=0, name=name, options=options, web={}), name=name, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=5).status_code == 200:
                return url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit(f"serve_load: error: app {name} did not come up")


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from pipeline.cli import OneLineParser

    p = OneLineParser(prog="serve_load", description=__doc__.split("\n", 1)[0])
    p.add_argument("--store", default=None, help="store to serve (default: build one from shared/audio)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per measurement (default 4)")
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64", help="connection counts to sweep")
    p.add_argument("--timeout", type=float, default=5.0, help="per-request timeout in seconds")
    p.add_argument("--max-requests", type=int, default=50000, help="cap on requests per measurement")
    p.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--configs", default="serve-defaults,flags,overload")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke size: 2 s per point, concurrency 1,8,64 (too short to judge the goal at 64)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CI smoke: 0.5 s per point, concurrency 1,4, the flags config, uploads for 1 s (no figure)",
    )
    p.add_argument("--json", default=None, help="write all figures to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.concurrency = 2.0, "1,8,64"
    if args.smoke:
        args.duration, args.concurrency, args.configs = 0.5, "1,4", "flags"
    try:
        levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        p.error(f"--concurrency: expected comma-separated integers, got {args.concurrency!r}")
    if not levels or min(levels) < 1 or max(levels) > 1024:
        p.error("--concurrency: values must be in 1..1024")
    use_wrk = args.client == "wrk" or (args.client == "auto" and shutil.which("wrk"))
    if args.client == "wrk" and not shutil.which("wrk"):
        p.error("--client wrk: wrk is not installed (apt-get install -y wrk)")

    import ray
    from ray import serve

    from pipeline.search.reader import open_store
    from pipeline.search.web import deployment_options

    tmp = tempfile.mkdtemp(prefix="serve-load-")
    ray.init(
        address="local",  # our own cluster, never one left running by `ray start`
        num_cpus=os.cpu_count() or 2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": ROOT}},
    )
    store_path = args.store or build_store(tmp)
    store = open_store(store_path)
    meta = store.describe()
    layer = max(meta["layers"])
    ids = [
        h.track_id
        for h in store.search(store.vector(_first_id(store), layer), layer=layer, k=min(50, store.num_tracks))
    ]
    from tools.testkit.net import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    configs = {
        "serve-defaults": {},
        "flags": deployment_options((1, 1), 64, 64),
        "overload": deployment_options((1, 1), 4, 8),
    }
    chosen = [c.strip() for c in args.configs.split(",") if c.strip()]
    results: list[Load] = []
    print(
        f"store {store_path}: {store.num_tracks} tracks, layer {layer}; client {'wrk' if use_wrk else 'python'}"
    )
    print(
        f"{'config':15} {'path':26} {'conns':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'non2xx':>7} {'timeouts':>8}"
    )
    try:
        for name in chosen:
            if name not in configs:
                p.error(f"--configs: unknown configuration {name!r}")
            deploy(port, store_path, name.replace("-", "_"), configs[name])
            sweep = levels if name != "overload" else [max(levels)]
            for path in ("/healthz", f"/similar/{ids[0]}?k=10&layer={layer}"):
                for c in sweep:
                    # past capacity the python client is used: it reports Retry-After and 503 latency
                    if use_wrk and name != "overload":
                        r = _wrk(port, path, c, args.duration, args.timeout)
                    else:
                        r = asyncio.run(
                            _load(port, _get(path), c, args.duration, args.max_requests, args.timeout)
                        )
                    fields = {k: v for k, v in r.items() if k in Load.__dataclass_fields__}
                    load = Load(name, path.split("?")[0], c, **fields)
                    results.append(load)
                    _print(load)
            if name == "flags":
                results.extend(_page_paths(port, ids, args))
            serve.delete(name.replace("-", "_"))
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    _summary(results)
    if args.duration < 4:
        print(
            f"(--duration {args.duration:g} s: at 64 connections a request takes ~1 s, too short to judge the goal)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0


def _first_id(store) -> str:
    import lance

    return lance.dataset(store.uri("tracks")).to_table(columns=["track_id"], limit=1).column(0)[0].as_py()


def _print(r: Load) -> None:
    extra = ""
    if r.statuses.get("503"):
        extra = f"  503: {r.statuses['503']} (p50 {r.p50_503_ms:.1f} ms, Retry-After {r.retry_after})"
    print(
        f"{r.config:15} {r.path[:26]:26} {r.conns:5d} {r.rps:8.1f} {r.p50_ms:8.1f} {r.p99_ms:8.1f} "
        f"{r.non_2xx:7d} {r.timeouts:8d}{extra}",
        flush=True,
    )


def _page_paths(port: int, ids: list[str], args: argparse.Namespace) -> list[Load]:
    """The page, its script, /audio range requests and uploads, on the ``flags`` config."""
    from pipeline.search.reader import open_store  # noqa: F401 - keeps the import order of main

    out: list[Load] = []
    sizes = {}
    import requests

    base = f"http://127.0.0.1:{port}"
    for tid in ids[:8]:
        h = requests.head(f"{base}/audio/{tid}", timeout=10)
        if h.status_code == 200:
            sizes[tid] = int(h.headers["content-length"])
    audio_ids = sorted(sizes)

    def range_req(rng: random.Random) -> bytes:
        tid = rng.choice(audio_ids)
        start = rng.randrange(0, max(1, sizes[tid] - 1))
        end = min(sizes[tid] - 1, start + 64 * 1024 - 1)
        return f"GET /audio/{tid} HTTP/1.1\r\nHost: 127.0.0.1\r\nRange: bytes={start}-{end}\r\n\r\n".encode()

    clip = _clip_bytes(base, audio_ids)

    def upload_req(rng: random.Random) -> bytes:
        head = (
            f"POST /api/upload?k=10&filename=clip.ogg HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: audio/ogg\r\nContent-Length: {len(clip)}\r\n\r\n"
        ).encode()
        return head + clip

    jobs = [
        ("/", _get("/"), 8, None),
        ("/static/app.js", _get("/static/app.js"), 8, None),
        (
            "/audio (Range)",
            range_req,
            8,
            lambda s, h: s == 206 and h.get("content-range", "").startswith("bytes "),
        ),
        ("/api/upload", upload_req, 2, lambda s, h: s == 200),
    ]
    for label, make, conns, check in jobs:
        if label.startswith("/audio") and not audio_ids:
            continue
        # one request first (the upload loads the model), then the measurement
        asyncio.run(_load(port, make, 1, 0.001, 1, 120.0))
        seconds = max(args.duration, 1.0 if args.smoke else 10.0) if label == "/api/upload" else args.duration
        r = asyncio.run(_load(port, make, conns, seconds, args.max_requests, max(args.timeout, 60.0), check))
        load = Load("flags", label, conns, **r)
        out.append(load)
        _print(load)
    return out


def _clip_bytes(base: str, audio_ids: list[str]) -> bytes:
    """A transformed clip from shared/audio/variants (or the first served track's bytes)."""
    from tools.testkit.paths import require_shared

    variant = require_shared() / "audio" / "variants" / "hw_city_crop3s.ogg"
    if variant.is_file():
        return variant.read_bytes()
    import requests

    return requests.get(f"{base}/audio/{audio_ids[0]}", timeout=30).content


def _summary(results: list[Load]) -> None:
    print()
    for config in dict.fromkeys(r.config for r in results):
        for path in dict.fromkeys(r.path for r in results if r.config == config):
            rows = [r for r in results if r.config == config and r.path == path]
            if len(rows) < 2:
                continue
            best = max(rows, key=lambda r: r.rps)
            top = max(rows, key=lambda r: r.conns)
            ratio = top.rps / best.rps if best.rps else 0.0
            timeouts = sum(r.timeouts for r in rows)
            ok = ratio >= 0.8 and timeouts == 0
            print(
                f"{config:15} {path[:26]:26} at {top.conns} conns: {top.rps:.0f} req/s = {ratio:.0%} of the best "
                f"({best.rps:.0f} at {best.conns}); timeouts {timeouts}; goal (>= 80 %, no timeouts) "
                f"{'met' if ok else 'NOT met'}"
            )


if __name__ == "__main__":
    sys.exit(main())
