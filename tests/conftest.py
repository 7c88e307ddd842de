"""Shared fixtures: paths to ../shared, one local Ray cluster per test session, a moto S3 server."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _find_shared() -> Path:
    for cand in (os.environ.get("MUSICFM_SHARED"), REPO / "shared", REPO.parent / "shared"):
        if cand and (Path(cand) / "golden").is_dir():
            return Path(cand)
    raise RuntimeError("cannot find the shared/ folder (golden data, audio clips); set MUSICFM_SHARED")


SHARED = _find_shared()
GOLDEN = SHARED / "golden"
AUDIO = SHARED / "audio"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run the long variants marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long variant: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def audio_dir() -> Path:
    return AUDIO


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session, with a declared GPU so GPU actor pools schedule."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # our own cluster, never one left running by `ray start`
            num_cpus=4,
            num_gpus=1,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
        )
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto server) on 127.0.0.1; yields (endpoint_url, storage_options)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in creds}
    os.environ.update(creds)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
