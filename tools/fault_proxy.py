#!/usr/bin/env python
"""A fault-injecting HTTP reverse proxy for S3-compatible endpoints (moto, MinIO, ...).

    python tools/fault_proxy.py --upstream http://127.0.0.1:5000 --port 5001 \
        --get 0.2 --list 0.2 --put 0.2 --kinds 500,503,reset,slow --seed 0

Point clients at the proxy (``endpoint_url`` / ``aws_endpoint``) instead of the store. Every
request is classified as

* ``list``: ``GET``/``HEAD`` on a bucket with a listing query (``list-type``, ``prefix``,
  ``delimiter``, ``continuation-token``) or on the bucket root;
* ``get``: any other ``GET``/``HEAD`` (object reads and metadata);
* ``put``: ``PUT``/``POST``/``DELETE`` (uploads, multipart parts, deletes, copies),

and with the probability configured for its class it gets one fault, chosen among ``kinds``:

* ``500``: ``500 InternalError`` (S3 XML body);
* ``503``: ``503 SlowDown`` (S3 XML body, ``Retry-After: 0``);
* ``reset``: the connection is closed with a TCP RST before any response byte;
* ``cut``: the real response head and half of its body, then a TCP RST (``get`` only; others
  fall back to ``reset``);
* ``lost``: the request *is* forwarded (the store acts on it), then the client's connection is
  reset before any response byte: the ambiguous failure of a write that did happen;
* ``slow``: the request is forwarded after ``slow_s`` seconds.

Decisions are deterministic whatever the thread interleaving: the n-th request with the same
(method, path, query) gets the fault that ``sha256(seed, class, method, path, query, n)`` picks.
``max_consecutive`` (optional) caps the faults in a row on one such key.

Permanent modes: ``deny`` (a regex on ``/bucket/key``) answers ``403 AccessDenied`` to every
matching request, for ever; ``deny_classes`` restricts it to some classes (e.g. only reads).

Counters (``stats``): requests and faults per class and kind; ``snapshot()`` returns a copy.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import re
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CLASSES = ("get", "list", "put")
KINDS = ("500", "503", "reset", "cut", "lost", "slow")
_LIST_KEYS = ("list-type", "prefix", "delimiter", "continuation-token", "max-keys", "uploads", "versions")
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class FaultConfig:
    """What to inject. Rates are probabilities in [0, 1] per request of that class."""

    rates: dict[str, float] = field(default_factory=lambda: {c: 0.0 for c in CLASSES})
    kinds: tuple[str, ...] = ("500", "503", "reset", "slow")
    slow_s: float = 1.0
    seed: int = 0
    max_consecutive: int | None = None
    deny: str | None = None  # regex on "/bucket/key": permanent 403
    deny_classes: tuple[str, ...] = CLASSES

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown fault kinds {bad}; choose from {', '.join(KINDS)}")
        for c, r in self.rates.items():
            if c not in CLASSES or not 0.0 <= float(r) <= 1.0:
                raise ValueError(f"bad rate {c}={r}")


def classify(method: str, path: str, query: str) -> str:
    """``get`` | ``list`` | ``put`` for an S3 request (path-style addressing)."""
    m = method.upper()
    if m in ("PUT", "POST", "DELETE", "PATCH"):
        return "put"
    q = urllib.parse.parse_qs(query, keep_blank_values=True)
    parts = [p for p in path.split("/") if p]
    if len(parts) <= 1 or any(k in q for k in _LIST_KEYS):
        return "list"
    return "get"


def _s3_error(code: str, message: str, status: int) -> tuple[int, bytes]:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>fault-proxy</RequestId></Error>"
    ).encode()
    return status, body


class FaultProxy:
    """A threaded reverse proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``)."""

    def __init__(self, upstream: str, config: FaultConfig | None = None, port: int = 0) -> None:
        u = urllib.parse.urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream_host, self.upstream_port = u.hostname, u.port or 80
        self.config = config or FaultConfig()
        self.stats: Counter[str] = Counter()
        self._seen: Counter[tuple] = Counter()
        self._streak: Counter[tuple] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- configuration at run time

    def set_rates(self, **rates: float) -> None:
        for c, r in rates.items():
            if c not in CLASSES:
                raise ValueError(f"unknown class {c!r}")
            self.config.rates[c] = float(r)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.stats)

    # ---- decisions

    def decide(self, method: str, path: str, query: str) -> tuple[str, str | None]:
        """(class, fault kind or None) for this request; counts it."""
        cls = classify(method, path, query)
        cfg = self.config
        key = (cls, method, path, query)
        with self._lock:
            n = self._seen[key]
            self._seen[key] += 1
            self.stats[f"{cls}.requests"] += 1
            if cfg.deny and cls in cfg.deny_classes and re.search(cfg.deny, path):
                self.stats[f"{cls}.denied"] += 1
                return cls, "403"
            rate = cfg.rates.get(cls, 0.0)
            if rate <= 0 or not cfg.kinds:
                self._streak[key] = 0
                return cls, None
            h = hashlib.sha256(f"{cfg.seed}|{cls}|{method}|{path}|{query}|{n}".encode()).digest()
            u = int.from_bytes(h[:8], "big") / 2.0**64
            if u >= rate or (cfg.max_consecutive is not None and self._streak[key] >= cfg.max_consecutive):
                self._streak[key] = 0
                return cls, None
            kind = cfg.kinds[h[8] % len(cfg.kinds)]
            if kind == "cut" and cls != "get":
                kind = "reset"
            self._streak[key] += 1
            self.stats[f"{cls}.fault.{kind}"] += 1
            self.stats["faults"] += 1
            return cls, kind


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _reset(self) -> None:
        """Close with RST (SO_LINGER 0) so the client sees 'connection reset by peer'."""
        with contextlib.suppress(OSError):
            self.wfile.flush()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()

    def _send(self, status: int, headers: Iterable[tuple[str, str]], body: bytes, head: bool) -> None:
        self.send_response_only(status)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _handle(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        body = self._body()
        cls, fault = self.owner.decide(self.command, split.path, split.query)
        head = self.command == "HEAD"
        if fault == "403":
            status, xml = _s3_error("AccessDenied", "Access Denied (fault proxy)", 403)
            hdrs = [("Content-Type", "application/xml"), ("Content-Length", str(len(xml)))]
            return self._send(status, hdrs, xml, head)
        if fault in ("500", "503"):
            code, msg = (
                ("InternalError", "We encountered an internal error.")
                if fault == "500"
                else (
                    "SlowDown",
                    "Please reduce your request rate.",
                )
            )
            status, xml = _s3_error(code, msg, int(fault))
            hdrs = [("Content-Type", "application/xml"), ("Content-Length", str(len(xml)))]
            if fault == "503":
                hdrs.append(("Retry-After", "0"))
            return self._send(status, hdrs, xml, head)
        if fault == "reset":
            return self._reset()
        if fault == "slow":
            time.sleep(self.owner.config.slow_s)
        conn = http.client.HTTPConnection(self.owner.upstream_host, self.owner.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP | {"content-length"}]
            length = resp.getheader("Content-Length") if head else str(len(data))
            if length is not None:
                out_headers.append(("Content-Length", length))
            if fault == "lost":
                return self._reset()
            if fault == "cut" and not head and len(data) > 1:
                self.send_response_only(resp.status)
                for k, v in out_headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                return self._reset()
            self._send(resp.status, out_headers, data, head)
        finally:
            conn.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = _handle


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fault_proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="http://host:port of the real endpoint")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--get", type=float, default=0.0, help="fault rate of object reads")
    p.add_argument("--list", type=float, default=0.0, help="fault rate of listings")
    p.add_argument("--put", type=float, default=0.0, help="fault rate of writes")
    p.add_argument("--kinds", default="500,503,reset,slow")
    p.add_argument("--slow-s", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-consecutive", type=int)
    p.add_argument("--deny", help="regex on /bucket/key: permanent 403")
    args = p.parse_args(argv)
    cfg = FaultConfig(
        rates={"get": args.get, "list": args.list, "put": args.put},
        kinds=tuple(k for k in args.kinds.split(",") if k),
        slow_s=args.slow_s,
        seed=args.seed,
        max_consecutive=args.max_consecutive,
        deny=args.deny,
    )
    proxy = FaultProxy(args.upstream, cfg, port=args.port).start()
    print(f"fault proxy on {proxy.url} -> {args.upstream}", flush=True)
    try:
        while True:
            time.sleep(10)
            print(proxy.snapshot(), flush=True)
    except KeyboardInterrupt:
        proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
