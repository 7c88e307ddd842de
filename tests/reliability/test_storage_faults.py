"""Object storage faults and secrets: the embed job, as users run it (jobs/embed_catalog.py in a
subprocess joining the cluster), on S3 (moto) behind tools/fault_proxy.py, with canary
credentials as the real ones.

One run, ~20 % transient faults on reads, listings and writes (500, 503 SlowDown, connection
resets, responses cut halfway, writes whose answer is lost, slow responses) plus a permanent 403
on two audio objects:

* every readable track lands exactly once, the two denied ones are error rows;
* no canary (environment credentials, ``--storage-options`` key/secret/token, a password in a
  catalog URI, a signature in a catalog URI) appears in stdout/stderr, in the cluster's logs, in
  any stored table (errors, runs.args_json, tracks, ...) or in any object the run wrote.

Then the fast, clear failures: a catalog that answers 403, an output bucket that does not exist
(also with ``--debug``: its traceback leaks nothing either).
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
import uuid

import pytest
import soundfile as sf

from pipeline.runs.embed import run_embed
from pipeline.runs.settings import EmbedJob
from tests.conftest import REPO
from tools.fault_proxy import FaultConfig, FaultProxy, classify
from tools.testkit.reliability import CKPT, JOB, STATS, check_store, grep_tree, job_kwargs, store_tables, tone

BUCKET = "reliability-music"
N_GOOD = 8
TAG = uuid.uuid4().hex[:10]
CANARY = {
    "env_key_id": f"CANARYAKID{TAG}",
    "env_secret": f"canary-env-secret-{TAG}",
    "env_token": f"canary-env-token-{TAG}",
    "so_key": f"CANARYSOKEY{TAG}",
    "so_secret": f"canary-so-secret-{TAG}",
    "so_token": f"canary-so-token-{TAG}",
    "uri_password": f"canary-uri-password-{TAG}",
    "uri_signature": f"canary-uri-signature-{TAG}",
}


@pytest.fixture(scope="module")
def s3_music(s3_server):
    s3 = s3_server.client()
    s3.create_bucket(Bucket=BUCKET)
    rows = []
    for i in range(N_GOOD + 2):
        name = f"denied_{i}.flac" if i >= N_GOOD else f"s{i:02d}.flac"
        buf = io.BytesIO()
        sf.write(buf, tone(2.0, 24000, 1, seed=i), 24000, format="FLAC")
        s3.put_object(Bucket=BUCKET, Key=f"cat/audio/{name}", Body=buf.getvalue())
        rows.append({"track_id": name.split(".")[0], "uri": f"audio/{name}", "title": name})
    rows.append(
        {
            "track_id": "creds_in_uri",
            "uri": f"s3://{CANARY['env_key_id']}:{CANARY['uri_password']}@{BUCKET}/cat/audio/s00.flac",
            "title": "credentials in the uri",
        }
    )
    rows.append(
        {
            "track_id": "signed_uri",
            "uri": f"audio/s01.flac?X-Amz-Signature={CANARY['uri_signature']}&X-Amz-Expires=60",
            "title": "a pre-signed style query",
        }
    )
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["track_id", "uri", "title"])
    w.writeheader()
    w.writerows(rows)
    s3.put_object(Bucket=BUCKET, Key="cat/catalog.csv", Body=buf.getvalue().encode())
    return s3_server, s3


def _opts(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing", "region": "us-east-1"}


def _canary_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID=CANARY["env_key_id"],
        AWS_SECRET_ACCESS_KEY=CANARY["env_secret"],
        AWS_SESSION_TOKEN=CANARY["env_token"],
        AWS_DEFAULT_REGION="us-east-1",
    )
    return env


def _job_cli(catalog: str, output: str, so: dict, *extra: str, env: dict, timeout: float = 400):
    import json

    args = [sys.executable, JOB, "--catalog", catalog, "--output", output, "--checkpoint", CKPT]
    args += ["--stats", STATS, "--layers", "1,3", "--precision", "fp32", "--window-s", "1"]
    args += ["--no-progress", "--decode-cpus", "2", "--storage-options", json.dumps(so), *extra]
    return subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_classify_requests() -> None:
    assert classify("GET", "/b/k.wav", "") == "get"
    assert classify("HEAD", "/b/k.wav", "") == "get"
    assert classify("GET", "/b", "list-type=2&prefix=cat/") == "list"
    assert classify("GET", "/b/", "") == "list"
    assert classify("PUT", "/b/k", "partNumber=1&uploadId=x") == "put"
    assert classify("POST", "/b/k", "uploads") == "put"
    assert classify("DELETE", "/b/k", "") == "put"


def test_transient_faults_lose_nothing_403_is_an_error_row_and_no_secret_leaks(ray_cluster, s3_music) -> None:
    endpoint, s3 = s3_music
    cfg = FaultConfig(
        rates={"get": 0.2, "list": 0.2, "put": 0.2},
        kinds=("500", "503", "reset", "cut", "lost", "slow"),
        slow_s=0.3,
        seed=7,
        deny=rf"^/{BUCKET}/cat/audio/denied_",
        deny_classes=("get",),
    )
    so = {
        "endpoint_url": None,
        "key": CANARY["so_key"],
        "secret": CANARY["so_secret"],
        "token": CANARY["so_token"],
        "region": "us-east-1",
    }
    env = {**_canary_env(), "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    out = f"s3://{BUCKET}/store-faulty"
    t0 = time.perf_counter()
    with FaultProxy(endpoint, cfg) as proxy:
        so["endpoint_url"] = proxy.url
        r = _job_cli(f"s3://{BUCKET}/cat/catalog.csv", out, so, env=env)
        stats = proxy.snapshot()
    took = time.perf_counter() - t0
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    print(f"faulty S3 run: {took:.1f} s, proxy {stats}")
    # faults reached every class of request
    for cls in ("get", "list", "put"):
        assert stats.get(f"{cls}.requests", 0) > 0, stats
    assert sum(v for k, v in stats.items() if k.startswith("get.fault.")) >= 3, stats
    assert sum(v for k, v in stats.items() if k.startswith("put.fault.")) >= 1, stats
    assert stats.get("get.denied", 0) >= 2, stats
    # the store, read directly (no proxy): nothing lost, nothing duplicated
    tables = store_tables(out, _opts(endpoint))
    check_store(tables, expect_tracks={f"s{i:02d}" for i in range(N_GOOD)})
    errors = {e["track_id"]: e for e in tables["errors"].to_pylist()}
    assert set(errors) == {f"denied_{N_GOOD}", f"denied_{N_GOOD + 1}", "creds_in_uri", "signed_uri"}, errors
    for k in (f"denied_{N_GOOD}", f"denied_{N_GOOD + 1}"):
        e = errors[k]
        assert (e["stage"], e["error_type"]) == ("fetch", "FetchError") and e["message"].startswith(
            "access denied"
        )
    assert errors["creds_in_uri"]["stage"] == "catalog" and errors["signed_uri"]["stage"] == "fetch"
    assert f"{N_GOOD} embedded, 4 failed" in r.stdout
    # no canary anywhere: process output, every table (all columns), every object, cluster logs
    canaries = list(CANARY.values())
    text = r.stdout + r.stderr
    for name, tbl in tables.items():
        if tbl is not None:
            text += f"\n[{name}] " + repr(tbl.to_pylist())
    for obj in s3.list_objects_v2(Bucket=BUCKET, Prefix="store-faulty/").get("Contents", []):
        text += s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read().decode("latin-1")
    leaks = [text[max(0, text.index(c) - 150) : text.index(c) + 50] for c in canaries if c in text]
    assert not leaks, leaks
    import ray._private.worker

    logs = ray._private.worker._global_node.get_logs_dir_path()
    assert not grep_tree(logs, canaries)
    run = tables["runs"].to_pylist()[-1]
    assert '"secret": "***"' in run["args_json"] and '"token": "***"' in run["args_json"]


def test_catalog_403_and_missing_output_bucket_fail_fast_and_clearly(s3_music) -> None:
    endpoint, _s3 = s3_music
    with FaultProxy(endpoint, FaultConfig(deny=rf"^/{BUCKET}/cat/catalog\.csv")) as proxy:
        t0 = time.perf_counter()
        job = EmbedJob(
            catalog=f"s3://{BUCKET}/cat/catalog.csv",
            output=f"s3://{BUCKET}/store-denied",
            storage_options=_opts(proxy.url),
            **job_kwargs(),
        )
        with pytest.raises(Exception) as ei:
            run_embed(job, progress=False)
        took = time.perf_counter() - t0
    msg = str(ei.value)
    assert type(ei.value).__name__ == "CatalogError" and "access denied" in msg and "\n" not in msg, msg
    assert took < 15, took
    # missing output bucket, through the CLI with --debug and canary credentials
    so = {**_opts(endpoint), "key": CANARY["so_key"], "secret": CANARY["so_secret"]}
    t0 = time.perf_counter()
    r = _job_cli(
        f"s3://{BUCKET}/cat/catalog.csv", "s3://no-such-output-bucket/store", so, "--debug", env=_canary_env()
    )
    took = time.perf_counter() - t0
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith(
        "embed_catalog: error: --output s3://no-such-output-bucket"
    ), r.stderr
    assert "does not exist" in last and "Traceback" in r.stderr  # --debug shows the traceback
    assert not [c for c in CANARY.values() if c in r.stdout + r.stderr]
    assert took < 60, took
    r = _job_cli(f"s3://{BUCKET}/cat/catalog.csv", "s3://no-such-output-bucket/store", so, env=_canary_env())
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("kind", ["reset", "lost"])
def test_commits_survive_a_broken_connection_without_duplicates(s3_music, kind: str) -> None:
    """Lance retries 5xx itself but not a conditional manifest PUT whose connection broke
    (``reset``: it never arrived; ``lost``: it arrived, the answer did not). The embed job's
    commits retry those: an Overwrite is re-committed, an append first checks for its run's rows."""
    import lance
    import pyarrow as pa

    from pipeline.runs.report import error_table
    from pipeline.store.commits import append_once, commit_overwrite
    from pipeline.store.tables import Store

    s3_server, _s3 = s3_music
    root = f"s3://{BUCKET}/commits-{kind}"
    direct = Store(root, _opts(s3_server))
    schema = pa.schema([("x", pa.int64())])
    frags = lance.fragment.write_fragments(
        pa.table({"x": [1, 2, 3]}), direct.uri("t"), schema=schema, storage_options=direct.lance_options
    )
    commit_overwrite(direct, "t", schema, frags)
    append_once(direct, "errors", error_table([{"track_id": "a", "message": "m"}], "run-1"), "run-1")
    cfg = FaultConfig(rates={"get": 0.0, "list": 0.0, "put": 1.0}, kinds=(kind,), max_consecutive=1)
    with FaultProxy(s3_server, cfg) as proxy:
        faulty = Store(root, _opts(proxy.url))
        frags = lance.fragment.write_fragments(
            pa.table({"x": [4, 5]}), direct.uri("t"), schema=schema, storage_options=direct.lance_options
        )
        commit_overwrite(faulty, "t", schema, frags)
        rows = error_table([{"track_id": "b", "message": "m"}, {"track_id": "c", "message": "m"}], "run-2")
        append_once(faulty, "errors", rows, "run-2")
        stats = proxy.snapshot()
    assert stats.get(f"put.fault.{kind}", 0) >= 2, stats
    assert sorted(direct.open("t").to_table()["x"].to_pylist()) == [4, 5]
    assert sorted(direct.open("errors").to_table()["track_id"].to_pylist()) == ["a", "b", "c"]


def test_refresh_on_s3_with_broken_commits_converges(ray_cluster, s3_music) -> None:
    """The refresh on S3 with every PUT's first try failing (half ``reset``: never arrived, half
    ``lost``: arrived, answer lost) and 10 % transient read/list faults: the lease, the chunk
    appends, the merge, the deletes, maintenance and the run row all retry safely; the store ends
    equal (track set, windows) to a refresh without faults, with no duplicate rows."""
    import lance

    from pipeline.runs.refresh import run_refresh
    from pipeline.runs.settings import RefreshJob
    from pipeline.store.tables import Store

    s3_server, s3 = s3_music
    direct = _opts(s3_server)
    root = f"s3://{BUCKET}/refresh-faults"
    cat0 = f"s3://{BUCKET}/cat/refresh0.csv"
    cat1 = f"s3://{BUCKET}/cat/refresh1.csv"

    def put_catalog(uri: str, names: list[str]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, ["track_id", "uri", "title"])
        w.writeheader()
        w.writerows({"track_id": n, "uri": f"audio/{n}.flac", "title": n} for n in names)
        s3.put_object(Bucket=BUCKET, Key=uri.split(f"{BUCKET}/", 1)[1], Body=buf.getvalue().encode())

    put_catalog(cat0, [f"s{i:02d}" for i in range(5)])
    put_catalog(cat1, [f"s{i:02d}" for i in range(2, N_GOOD)])  # 0, 1 removed; 5..7 new
    assert run_embed(EmbedJob(catalog=cat0, output=root, storage_options=direct, **job_kwargs()),
                     progress=False).status == "ok"  # fmt: skip

    cfg = FaultConfig(
        rates={"get": 0.1, "list": 0.1, "put": 1.0}, kinds=("reset", "lost"), max_consecutive=1, seed=3
    )
    with FaultProxy(s3_server, cfg) as proxy:
        faulty = _opts(proxy.url)
        job = RefreshJob(
            embed=EmbedJob(catalog=cat1, output=root, storage_options=faulty, **job_kwargs()),
            chunk_size=2, retention_days=0.0,
        )  # fmt: skip
        rep = run_refresh(job)
        stats = proxy.snapshot()
    assert stats.get("put.fault.reset", 0) >= 3 and stats.get("put.fault.lost", 0) >= 3, stats
    assert rep.status == "ok" and (rep.plan["new"], rep.deleted, rep.tracks_ok) == (3, 2, 3), rep.summary()
    assert rep.chunks == 2
    tables = store_tables(root, direct)
    check_store(tables, expect_tracks=[f"s{i:02d}" for i in range(2, N_GOOD)])
    runs = lance.dataset(Store(root, direct).uri("runs"), storage_options=Store(root, direct).lance_options)
    rows = runs.to_table().to_pylist()
    assert sum(r["run_id"] == rep.run_id for r in rows) == 1  # the run row once, despite lost answers
