"""pipeline.commands.serve: the `serve run` keys and CLI flags become the service's config."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pytest

from pipeline.commands.serve import (
    app,
    cors_origin_arg,
    replicas_arg,
    serve_parser,
    service_config,
    web_config,
)


def test_service_config_from_serve_run_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MUSICFM_STORE", raising=False)
    monkeypatch.delenv("MUSICFM_STORAGE_OPTIONS", raising=False)
    with pytest.raises(ValueError, match="no store"):
        service_config({})
    cfg = service_config({"store": "s3://b/store", "storage_options": '{"region": "eu-west-1"}',
                          "max_upload_mb": "2", "refresh_s": "5"})  # fmt: skip
    assert cfg["store"] == "s3://b/store" and cfg["storage_options"]
    assert cfg["max_upload_bytes"] == 2 * 2**20 and cfg["refresh_s"] == 5.0
    assert cfg["checkpoint"] is None and cfg["device"] is None
    monkeypatch.setenv("MUSICFM_STORE", "/data/store")
    assert service_config({})["store"] == "/data/store"  # serve run without store=
    with pytest.raises(ValueError):
        service_config({"storage_options": "{not json"})


def test_flag_types() -> None:
    assert replicas_arg("3") == (3, 3) and replicas_arg("1-4") == (1, 4)
    for bad in ("0", "4-2", "x", "1-"):
        with pytest.raises(argparse.ArgumentTypeError):
            replicas_arg(bad)
    assert cors_origin_arg("https://example.org:8443") == "https://example.org:8443"
    with pytest.raises(argparse.ArgumentTypeError):
        cors_origin_arg("https://example.org/path")
    args = serve_parser().parse_args(["--store", "s", "--replicas", "2-5", "--cors-origin", "http://a.b"])
    assert args.replicas == (2, 5) and args.cors_origin == ["http://a.b"] and args.port == 8000


def test_web_config_carries_only_the_token_hash(tmp_path: Path) -> None:
    token = "t0ken-of-more-than-16-chars"
    (tmp_path / "tok").write_text(token + "\n")
    cfg = web_config({"auth_token_file": str(tmp_path / "tok"), "cors_origin": "https://x.org"})
    assert cfg["auth_token_sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in repr(cfg) and cfg["cors_origins"] == ["https://x.org"]
    assert web_config({})["auth_token_sha256"] is None and web_config({})["upload_timeout_s"] == 120.0


def test_app_builds_a_serve_application() -> None:
    from ray import serve

    built = app({"store": "/data/store", "replicas": "1-3", "max_ongoing": "8", "num_cpus": "0.5"})
    assert isinstance(built, serve.Application)
    with pytest.raises(argparse.ArgumentTypeError):
        app({"store": "/data/store", "replicas": "0"})
