"""The one storage-options translator: both accepted styles reach fsspec/s3fs and Lance, against a
real S3 API (moto)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.io.objects import (
    fetch_bytes,
    fsspec_options,
    lance_options,
    normalize_storage_options,
    open_uri,
    parse_storage_options,
    redacted,
    scrub,
)


def test_both_styles_normalise_to_the_same_options() -> None:
    s3fs_style = {
        "endpoint_url": "http://h:9",
        "key": "AK",
        "secret": "SK",
        "token": "T",
        "region": "eu-west-1",
    }
    lance_style = {
        "aws_endpoint": "http://h:9",
        "aws_access_key_id": "AK",
        "aws_secret_access_key": "SK",
        "aws_session_token": "T",
        "aws_region": "eu-west-1",
        "allow_http": "true",
    }
    a, b = normalize_storage_options(s3fs_style), normalize_storage_options(lance_style)
    assert {k: v for k, v in b.items() if not k.startswith("lance_")} == a
    assert lance_options("s3://b/x", s3fs_style) == lance_options("s3://b/x", lance_style)
    fs_a, fs_b = fsspec_options("s3://b/x", s3fs_style), fsspec_options("s3://b/x", lance_style)
    assert fs_a == fs_b and fs_a["client_kwargs"] == {"region_name": "eu-west-1"}
    assert "allow_http" not in fs_b and "lance_allow_http" not in fs_b  # never reaches s3fs


def test_anon_and_skip_signature_are_the_same_thing() -> None:
    assert normalize_storage_options({"aws_skip_signature": "true"}) == {"anon": True}
    assert lance_options("s3://b", {"anon": True})["aws_skip_signature"] == "true"


def test_parse_storage_options_one_line_errors() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_storage_options("{nope")
    with pytest.raises(ValueError, match="must be a JSON object"):
        parse_storage_options("[1]")
    assert parse_storage_options('{"aws_endpoint": "http://x"}') == {"endpoint_url": "http://x"}


def test_secrets_are_redacted_and_scrubbed_in_both_styles() -> None:
    so = {"aws_secret_access_key": "sekret-value", "key": "AKIAXYZ", "endpoint_url": "http://h"}
    r = redacted(so)
    assert r["aws_secret_access_key"] == "***" and r["key"] == "***" and r["endpoint_url"] == "http://h"
    assert "sekret-value" not in scrub("failed with sekret-value and AKIAXYZ", so)


@pytest.mark.parametrize("style", ["s3fs", "lance"])
def test_each_style_reads_objects_and_writes_lance_on_s3(s3_server, style: str) -> None:
    """The reported bug: Lance-style keys in --storage-options made s3fs fail with
    ``AioSession.__init__() got an unexpected keyword argument``."""
    import lance

    bucket = s3_server.bucket(f"objects-{style}")
    s3_server.client().put_object(Bucket=bucket[5:], Key="a.bin", Body=b"hello")
    so = s3_server.options(style)
    fs, path = open_uri(f"{bucket}/a.bin", so)
    assert fs.cat_file(path) == b"hello"
    data, version = fetch_bytes(f"{bucket}/a.bin", so)
    assert data == b"hello" and version
    uri = f"{bucket}/t.lance"
    lance.write_dataset(pa.table({"x": [1, 2, 3]}), uri, storage_options=lance_options(uri, so))
    assert lance.dataset(uri, storage_options=lance_options(uri, so)).count_rows() == 3
