"""Shared fixtures: paths to ../shared, one local Ray cluster per test session, a moto S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.testkit.paths import REPO, require_shared

SHARED = require_shared()
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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto server) on 127.0.0.1 for the session: an :class:`S3Server` (the
    endpoint URL as a ``str``, plus ``client()``, ``bucket(name)`` and ``options(style)``)."""
    from tools.testkit.s3 import moto_server

    with moto_server() as server:
        yield server
