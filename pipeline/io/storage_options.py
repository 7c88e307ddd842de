"""Storage options: the one translator between the two accepted styles, and secret scrubbing.

``--storage-options`` (and every API taking ``storage_options``) accepts either style:

* s3fs style: ``endpoint_url``, ``key``, ``secret``, ``token``, ``region`` /
  ``client_kwargs.region_name``, ``anon``;
* Lance / object_store style: ``aws_endpoint`` (or ``aws_endpoint_url``), ``aws_access_key_id``,
  ``aws_secret_access_key``, ``aws_session_token``, ``aws_region``, ``allow_http``,
  ``aws_skip_signature``.

:func:`normalize_storage_options` turns either into the s3fs style; :func:`fsspec_options` and
:func:`lance_options` derive what fsspec/s3fs and Lance need. Missing values come from the
standard AWS environment (``AWS_ENDPOINT_URL[_S3]``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``).
:mod:`pipeline.io.objects` re-exports every name here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from pipeline.errors import is_secret_key, redact
from pipeline.io.uris import split_scheme

__all__ = [
    "fsspec_options",
    "lance_options",
    "normalize_storage_options",
    "parse_storage_options",
    "redacted",
    "scrub",
    "secret_values",
]


#: Lance / object_store key -> s3fs-style key.
_OBJECT_STORE_KEYS = {
    "aws_access_key_id": "key",
    "access_key_id": "key",
    "aws_secret_access_key": "secret",
    "secret_access_key": "secret",
    "aws_session_token": "token",
    "session_token": "token",
    "aws_endpoint": "endpoint_url",
    "aws_endpoint_url": "endpoint_url",
    "endpoint": "endpoint_url",
    "aws_region": "region",
    "aws_default_region": "region",
}
#: object_store keys with no s3fs counterpart: implied by other values, or Lance-only.
_LANCE_ONLY_KEYS = ("allow_http", "aws_skip_signature", "aws_virtual_hosted_style_request",
                    "virtual_hosted_style_request", "timeout", "connect_timeout")  # fmt: skip


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """Parse the ``--storage-options`` JSON (an object) and check its keys; raise ValueError with
    a one-line reason."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--storage-options is not valid JSON: {e.msg} at char {e.pos}") from None
    if not isinstance(value, dict):
        raise ValueError("--storage-options must be a JSON object")
    return normalize_storage_options(value)


def normalize_storage_options(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Either accepted style -> the s3fs style (the project's one internal form). Lance-only
    keys (``allow_http``, ``aws_skip_signature``, timeouts) are kept as ``lance_<key>`` hints."""
    out: dict[str, Any] = {}
    for k, v in (storage_options or {}).items():
        key = str(k)
        low = key.lower()
        if low in _OBJECT_STORE_KEYS:
            out.setdefault(_OBJECT_STORE_KEYS[low], v)
        elif low == "aws_skip_signature":
            out.setdefault("anon", str(v).lower() in ("1", "true", "yes"))
        elif low in _LANCE_ONLY_KEYS:
            out[f"lance_{low}"] = v
        else:
            out[key] = v
    return out


def fsspec_options(uri: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """fsspec keyword arguments for ``uri`` (s3fs wants ``client_kwargs.region_name``; the
    endpoint falls back to ``AWS_ENDPOINT_URL[_S3]``)."""
    so = {k: v for k, v in normalize_storage_options(storage_options).items() if not k.startswith("lance_")}
    scheme, _ = split_scheme(uri)
    if scheme not in ("s3", "s3a"):
        return so
    ck = dict(so.get("client_kwargs") or {})
    if "region" in so:  # the pipeline's neutral key
        ck.setdefault("region_name", so.pop("region"))
        so["client_kwargs"] = ck
    if "endpoint_url" not in so and "endpoint_url" not in ck:
        ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if ep:
            so["endpoint_url"] = ep
    return so


def lance_options(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str] | None:
    """Lance (object_store) ``storage_options`` for ``uri``; ``None`` for local paths without options."""
    so = normalize_storage_options(storage_options)
    hints = {k[len("lance_") :]: v for k, v in so.items() if k.startswith("lance_")}
    if not uri.startswith(("s3://", "s3a://")):
        rest = {k: v for k, v in so.items() if not k.startswith("lance_") and k != "client_kwargs"}
        out = {**rest, **hints}
        return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in out.items()} or None
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
    out.update(hints)
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in out.items() if v}


def redacted(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy safe to log or store: secret values replaced by ``***``."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if isinstance(v, Mapping):
            out[k] = redacted(v)
        elif is_secret_key(str(k)):
            out[k] = "***"
        else:
            out[k] = v
    return out


def secret_values(storage_options: Mapping[str, Any] | None) -> list[str]:
    """The secret values in ``storage_options`` (nested too), to scrub from messages."""
    out: list[str] = []

    def walk(d: Mapping[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v)
            elif isinstance(v, str) and len(v) >= 4 and is_secret_key(str(k)):
                out.append(v)

    if storage_options:
        walk(storage_options)
    return out


def scrub(text: str, storage_options: Mapping[str, Any] | None) -> str:
    """``text`` with the secret values of ``storage_options`` and every known secret pattern removed."""
    for v in secret_values(storage_options):
        text = text.replace(v, "***")
    return redact(text)


# --------------------------------------------------------------------------- filesystems
