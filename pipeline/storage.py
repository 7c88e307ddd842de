"""Storage options: one user-facing form (s3fs style), translated for Lance (object_store).

``--storage-options`` takes s3fs-style keys: ``endpoint_url``, ``key``, ``secret``, ``token``,
``region`` / ``client_kwargs.region_name``, ``anon``. Missing values come from the standard AWS
environment (``AWS_ENDPOINT_URL[_S3]``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

SECRET_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "password",
        "access_key",
        "secret_key",
        "session_token",
    }
)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """Parse the ``--storage-options`` JSON (an object); raise ValueError with a one-line reason."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--storage-options is not valid JSON: {e.msg} at char {e.pos}") from None
    if not isinstance(value, dict):
        raise ValueError("--storage-options must be a JSON object")
    return value


def redacted(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy safe to log or store: secret values replaced by ``***``."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if isinstance(v, Mapping):
            out[k] = redacted(v)
        elif k.lower() in SECRET_KEYS or any(s in k.lower() for s in ("secret", "token", "password")):
            out[k] = "***"
        else:
            out[k] = v
    return out


def lance_options(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str] | None:
    """Lance ``storage_options`` for ``uri`` (``None`` for local paths)."""
    if not uri.startswith(("s3://", "s3a://")):
        return None
    so = dict(storage_options or {})
    ck = dict(so.get("client_kwargs") or {})
    env = os.environ
    endpoint = (
        so.get("endpoint_url")
        or ck.get("endpoint_url")
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
    )
    region = (
        so.get("region") or ck.get("region_name") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    )
    out = {
        "aws_access_key_id": so.get("key") or env.get("AWS_ACCESS_KEY_ID"),
        "aws_secret_access_key": so.get("secret") or env.get("AWS_SECRET_ACCESS_KEY"),
        "aws_session_token": so.get("token") or env.get("AWS_SESSION_TOKEN"),
        "aws_region": region or "us-east-1",
        "aws_endpoint": endpoint,
    }
    if endpoint and str(endpoint).startswith("http://"):
        out["allow_http"] = "true"
    if so.get("anon"):
        out["aws_skip_signature"] = "true"
    return {k: str(v) for k, v in out.items() if v}
