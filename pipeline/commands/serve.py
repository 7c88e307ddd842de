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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cli import add_setting, add_store_args, positive_int
from pipeline.commands.search import OneLineArgumentParser
from pipeline.search.results import TABLES_REFRESH_S
from pipeline.search.service import DEFAULT_MAX_UPLOAD_BYTES
from pipeline.search.web import DEFAULT_UPLOAD_TIMEOUT_S

APP_NAME = "default"  # serve run's name for an app too


@dataclass(frozen=True)
class ServeSettings:
    """The serve job's settings (the flags of ``serve_search`` and the keys of ``serve run``):
    each default here is the knob's one default."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_BYTES / 2**20
    num_cpus: float = 1.0  # CPUs reserved for each replica
    replicas: tuple[int, int] = (1, 1)  # (min, max): Serve autoscales between them
    max_ongoing: int = 64  # requests a replica runs at once (Serve max_ongoing_requests)
    max_queued: int = 64  # requests waiting in the proxy beyond that (Serve max_queued_requests)
    upload_timeout_s: float = DEFAULT_UPLOAD_TIMEOUT_S
    grace_s: float = 20.0  # seconds a SIGTERM leaves the requests in flight to finish
    refresh_s: float = TABLES_REFRESH_S  # reopen the store's tables at most this often

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "upload_timeout_s", "grace_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")


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
        "upload_timeout_s": float(args.get("upload_timeout_s") or ServeSettings.upload_timeout_s),
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
    max_mb = float(args.get("max_upload_mb") or ServeSettings.max_upload_mb)
    return {
        "store": store,
        "storage_options": so or None,
        "checkpoint": args.get("checkpoint") or None,
        "stats": args.get("stats") or None,
        "model_config": args.get("model_config") or None,
        "device": args.get("device") or None,
        "max_upload_bytes": int(max_mb * 2**20),
        "refresh_s": float(args.get("refresh_s") or ServeSettings.refresh_s),
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

    replicas = replicas_arg(str(args["replicas"])) if args.get("replicas") else ServeSettings.replicas
    opts = deployment_options(
        replicas,
        int(args.get("max_ongoing") or ServeSettings.max_ongoing),
        int(args.get("max_queued") or ServeSettings.max_queued),
    )
    num_cpus = float(args.get("num_cpus") or ServeSettings.num_cpus)
    return serve_app(service_config(args), num_cpus=num_cpus, options=opts, web=web_config(args))


def serve_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="serve_search",
        description="Serve similarity search over HTTP (Ray Serve).",
        settings=(ServeSettings,),
    )
    add_store_args(p)
    add_setting(p, "--host", settings=ServeSettings, help="address to listen on")
    add_setting(p, "--port", settings=ServeSettings, type=positive_int, help="port")
    p.add_argument(
        "--checkpoint", default=None, help="model for audio queries (default: from the store's runs)"
    )
    p.add_argument("--stats", default=None, help="stats JSON of the --checkpoint")
    p.add_argument("--model-config", default=None, help="model config JSON of the --checkpoint")
    p.add_argument("--device", default=None, help="device for the audio model")
    add_setting(p, "--max-upload-mb", settings=ServeSettings, type=float, stated=False,
                help="largest accepted upload in MiB (413 above)")  # fmt: skip
    add_setting(p, "--num-cpus", settings=ServeSettings, type=float, stated=False,
                help="CPUs reserved for each replica")  # fmt: skip
    add_setting(p, "--replicas", settings=ServeSettings, type=replicas_arg, stated=False,
                help="replicas: N, or MIN-MAX to let Serve autoscale between them (one by default)")  # fmt: skip
    add_setting(p, "--max-ongoing", settings=ServeSettings, type=positive_int,
                help="requests a replica runs at once (Serve max_ongoing_requests)")  # fmt: skip
    add_setting(p, "--max-queued", settings=ServeSettings, type=positive_int,
                help="requests waiting in the proxy beyond that; more get a fast 503 with Retry-After "
                "(Serve max_queued_requests)")  # fmt: skip
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
    add_setting(p, "--upload-timeout-s", settings=ServeSettings, type=float, stated=False,
                help="longest time to receive an upload from the page (408 past it)")  # fmt: skip
    add_setting(p, "--grace-s", settings=ServeSettings, type=float,
                help="on SIGTERM: stop taking requests, finish the ones in flight for up to this long, "
                "exit 0, inside Kubernetes' default 30 s termination grace period")  # fmt: skip
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local one)")
    return p


def serve_main(argv: list[str] | None = None) -> int:
    args = serve_parser().parse_args(argv)
    try:  # the settings' own checks, as one line and exit 2
        ServeSettings(**{k: v for k, v in vars(args).items() if k in ServeSettings.__dataclass_fields__})
    except ValueError as e:
        print(f"serve_search: error: {e}", file=sys.stderr)
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
