"""A real S3 API on 127.0.0.1 (moto's threaded server), shared by tests and benchmarks.

:class:`S3Server` *is* the endpoint URL (a ``str``), so it goes wherever an endpoint goes, and
also gives a boto3 client, buckets, and storage options in both styles the pipeline accepts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tools.testkit.net import free_port

#: Credentials moto accepts; exported to the environment while a server runs.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server(str):
    """The endpoint URL of a running moto server, with helpers."""

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=str(self),
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (if needed); returns ``s3://name``."""
        c = self.client()
        existing = {b["Name"] for b in c.list_buckets().get("Buckets", [])}
        if name not in existing:
            c.create_bucket(Bucket=name)
        return f"s3://{name}"

    def options(self, style: str = "s3fs", endpoint: str | None = None) -> dict[str, Any]:
        """Storage options for this server: ``s3fs`` style (``endpoint_url``, ``key``, ...) or
        ``lance`` / object_store style (``aws_endpoint``, ``aws_access_key_id``, ...).
        ``endpoint`` replaces the server's (e.g. a fault proxy in front of it)."""
        ep = endpoint or str(self)
        if style == "s3fs":
            return {"endpoint_url": ep, "key": "testing", "secret": "testing", "region": "us-east-1"}
        if style == "lance":
            return {
                "aws_endpoint": ep,
                "aws_access_key_id": "testing",
                "aws_secret_access_key": "testing",
                "aws_region": "us-east-1",
                "allow_http": "true",
            }
        raise ValueError(f"style must be s3fs or lance, got {style!r}")


@contextmanager
def moto_server() -> Iterator[S3Server]:
    """Run a moto S3 server on a free loopback port, with the test credentials in the
    environment; yields its :class:`S3Server`. Restores the environment afterwards."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    old = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
