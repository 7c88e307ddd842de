"""``serve_search``: similarity search over HTTP on Ray Serve (the CLI and the ``serve run`` builder).

Run either way (from the repo root)::

    python jobs/serve_search.py --store demo_store [--host 127.0.0.1 --port 8000] [--checkpoint ...]
    musicfm-serve --store demo_store
    serve run jobs.serve_search:app store=demo_store [checkpoint=... storage_options='{...}']

(``serve run`` also reads ``MUSICFM_STORE`` / ``MUSICFM_STORAGE_OPTIONS`` when ``store=`` is not
given.) Routes: ``GET /similar/{track_id}?k=&layer=&where=&level=``, ``POST /search`` (JSON
``{"vector": [...]}`` or an audio upload), ``GET /healthz``, ``GET /info``; details in
:mod:`pipeline.search.service`. The catalog page is at ``/`` (:mod:`pipeline.search.web`,
docs/web.md).

Capacity: ``--max-ongoing`` requests run at once per replica; up to ``--max-queued`` more wait
in the proxy; past that the answer is a fast 503 with ``Retry-After``. ``--replicas N`` fixes
the count, ``--replicas MIN-MAX`` lets Serve autoscale between them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.cli import add_store_args, positive_int
from pipeline.search.cli import OneLineArgumentParser
from pipeline.search.service import DEFAULT_MAX_UPLOAD_BYTES

DEFAULT_MAX_ONGOING = 64
DEFAULT_MAX_QUEUED = 64
#: Seconds a SIGTERM leaves the requests in flight to finish (``--grace-s``).
DEFAULT_GRACE_S = 20.0
APP_NAME = "default"  # serve run's name for an app too


def replicas_arg(text: str) -> tuple[int, int]:
    """argparse type for ``--replicas``: ``N`` or ``MIN-MAX`` (autoscaling), all >= 1."""
    lo, sep, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None
    if a < 1 or b < a:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return a, b


def cors_origin_arg(text: str) -> str:
    """argparse type for ``--cors-origin``: one ``http(s)://host[:port]`` origin."""
    import re

    if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?", text):
        raise argparse.ArgumentTypeError(f"expected an origin like https://example.org, got {text!r}")
    return text


def read_token(path: str) -> str:
    """The bearer token in ``path`` (first line, stripped); ValueError with a one-line reason."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except OSError as e:
        raise ValueError(f"--auth-token-file: cannot read {path}: {e.strerror}") from None
    if len(token) < 16:
        raise ValueError(f"--auth-token-file: the token in {path} is shorter than 16 characters")
    return token


def web_config(args: Mapping[str, Any]) -> dict[str, Any]:
    """The page's config (``pipeline.search.web.install_web``): only the token's SHA-256 travels."""
    from pipeline.search.web import token_sha256

    token_file = args.get("auth_token_file")
    origins = args.get("cors_origin") or []
    return {
        "auth_token_sha256": token_sha256(read_token(token_file)) if token_file else None,
        "cors_origins": [origins] if isinstance(origins, str) else list(origins),
        "upload_timeout_s": float(args.get("upload_timeout_s") or 120.0),
    }


def service_config(args: Mapping[str, Any]) -> dict[str, Any]:
    """``SearchService`` keyword arguments from CLI / ``serve run`` arguments."""
    from pipeline.io.objects import parse_storage_options

    store = args.get("store") or os.environ.get("MUSICFM_STORE")
    if not store:
        raise ValueError("no store: pass store=URI (or set MUSICFM_STORE)")
    so = args.get("storage_options") or os.environ.get("MUSICFM_STORAGE_OPTIONS")
    if isinstance(so, str):
        so = parse_storage_options(so)
    max_mb = float(args.get("max_upload_mb") or DEFAULT_MAX_UPLOAD_BYTES / 2**20)
    return {
        "store": store,
        "storage_options": so or None,
        "checkpoint": args.get("checkpoint") or None,
        "stats": args.get("stats") or None,
        "model_config": args.get("model_config") or None,
        "device": args.get("device") or None,
        "max_upload_bytes": int(max_mb * 2**20),
        "refresh_s": float(args.get("refresh_s") or 30.0),
    }


def app(args: dict[str, str]) -> Any:
    """Application builder for ``serve run jobs.serve_search:app store=URI [key=value ...]``.

    Keys: ``store``, ``storage_options`` (JSON), ``checkpoint``, ``stats``, ``model_config``,
    ``device``, ``max_upload_mb``, ``refresh_s``, ``num_cpus``, ``auth_token_file``,
    ``cors_origin``, ``upload_timeout_s``, ``replicas`` (N or MIN-MAX), ``max_ongoing``,
    ``max_queued``.
    """
    from pipeline.search.service import serve_app
    from pipeline.search.web import deployment_options

    opts = deployment_options(
        replicas_arg(str(args.get("replicas") or 1)),
        int(args.get("max_ongoing") or DEFAULT_MAX_ONGOING),
        int(args.get("max_queued") or DEFAULT_MAX_QUEUED),
    )
    return serve_app(
        service_config(args), num_cpus=float(args.get("num_cpus") or 1.0), options=opts, web=web_config(args)
    )


def serve_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="serve_search", description="Serve similarity search over HTTP (Ray Serve)."
    )
    add_store_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=positive_int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--checkpoint", default=None, help="model for audio queries (default: from the store's runs)"
    )
    p.add_argument("--stats", default=None, help="stats JSON of the --checkpoint")
    p.add_argument("--model-config", default=None, help="model config JSON of the --checkpoint")
    p.add_argument("--device", default=None, help="device for the audio model")
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_BYTES / 2**20,
        help="largest accepted upload in MiB (413 above)",
    )
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved for each replica")
    p.add_argument(
        "--replicas",
        type=replicas_arg,
        default=(1, 1),
        help="replicas: N, or MIN-MAX to let Serve autoscale between them (one by default)",
    )
    p.add_argument(
        "--max-ongoing",
        type=positive_int,
        default=DEFAULT_MAX_ONGOING,
        help=f"requests a replica runs at once (Serve max_ongoing_requests, default {DEFAULT_MAX_ONGOING})",
    )
    p.add_argument(
        "--max-queued",
        type=positive_int,
        default=DEFAULT_MAX_QUEUED,
        help="requests waiting in the proxy beyond that; more get a fast 503 with Retry-After "
        f"(Serve max_queued_requests, default {DEFAULT_MAX_QUEUED})",
    )
    p.add_argument(
        "--auth-token-file",
        default=None,
        help="file holding a bearer token required on every route but the page shell (401 otherwise)",
    )
    p.add_argument(
        "--cors-origin",
        type=cors_origin_arg,
        action="append",
        default=None,
        help="allow cross-origin requests from this origin (repeatable; default: no CORS headers)",
    )
    p.add_argument(
        "--upload-timeout-s",
        type=float,
        default=120.0,
        help="longest time to receive an upload from the page (408 past it)",
    )
    p.add_argument(
        "--grace-s",
        type=float,
        default=DEFAULT_GRACE_S,
        help="on SIGTERM: stop taking requests, finish the ones in flight for up to this long, exit 0 "
        f"(default {DEFAULT_GRACE_S:g}, inside Kubernetes' default 30 s termination grace period)",
    )
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local one)")
    return p


def serve_main(argv: list[str] | None = None) -> int:
    args = serve_parser().parse_args(argv)
    if args.max_upload_mb <= 0:
        print("serve_search: error: --max-upload-mb must be > 0", file=sys.stderr)
        return 2
    if args.upload_timeout_s <= 0:
        print("serve_search: error: --upload-timeout-s must be > 0", file=sys.stderr)
        return 2
    if args.grace_s <= 0:
        print("serve_search: error: --grace-s must be > 0", file=sys.stderr)
        return 2
    try:
        cfg = service_config(vars(args))
        web = web_config(vars(args))
        from pipeline.search.reader import open_store

        open_store(cfg["store"], cfg["storage_options"])  # fail here, not inside a replica
    except Exception as e:  # noqa: BLE001 - one line, no traceback
        from pipeline.errors import one_line, redact

        print(f"serve_search: error: {one_line(redact(str(e)))}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    import pipeline
    from pipeline.search.service import serve_app
    from pipeline.search.web import deployment_options

    opts = deployment_options(args.replicas, args.max_ongoing, args.max_queued)
    # a replica being stopped finishes its requests in flight for up to --grace-s
    opts.update(graceful_shutdown_timeout_s=args.grace_s, graceful_shutdown_wait_loop_s=0.5)
    root = str(Path(pipeline.__file__).resolve().parent.parent)  # the replicas import pipeline from here
    ray.init(
        address=args.ray_address, runtime_env={"env_vars": {"PYTHONPATH": root}}, ignore_reinit_error=True
    )
    serve.start(http_options={"host": args.host, "port": args.port})
    print(f"serving {cfg['store']} on http://{args.host}:{args.port} (Ctrl-C or SIGTERM stops)", flush=True)
    app = serve_app(cfg, num_cpus=args.num_cpus, options=opts, web=web)
    return run_until_stopped(app, args.grace_s)


def run_until_stopped(app: Any, grace_s: float) -> int:
    """Run the Serve ``app`` until Ctrl-C or SIGTERM (:mod:`pipeline.signals`), then stop it
    gracefully: the app is deleted first (its routes go away, so new requests are refused, while
    each replica finishes its requests in flight for up to ``grace_s``), then Serve and the HTTP
    proxy shut down. Returns 0."""
    from ray import serve

    from pipeline.signals import Terminated, stop_on_sigterm

    with stop_on_sigterm():
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=True)
        except (KeyboardInterrupt, Terminated) as e:
            why = "SIGTERM" if isinstance(e, Terminated) else "interrupted"
            print(f"serve_search: {why}: finishing the requests in flight (up to {grace_s:g} s)", flush=True)
            serve.delete(APP_NAME)
        finally:
            serve.shutdown()
    print("serve_search: stopped", flush=True)
    return 0
