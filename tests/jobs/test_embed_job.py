"""The embed job as users run it: flags, S3 (moto server), and a real `ray job submit`."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lance
import pytest

from pipeline.runs.embed import run_embed
from pipeline.runs.settings import EmbedJob
from tests.conftest import AUDIO, GOLDEN, REPO
from tools.testkit.net import free_port

JOB = str(REPO / "jobs" / "embed_catalog.py")
CKPT, STATS = str(GOLDEN / "checkpoint.pt"), str(GOLDEN / "stats.json")


def _run(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, JOB, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
        check=False,
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--catalog", "c.csv"], "--catalog and --output are required"),
        (["--catalog", "c.csv", "--output", "o", "--layers", "7,x"], "comma-separated layer indices"),
        (["--catalog", "c.csv", "--output", "o", "--window-s", "-3"], "positive number"),
        (["--catalog", "c.csv", "--output", "o", "--precision", "int4"], "invalid choice"),
        (["--catalog", "c.csv", "--output", "o", "--storage-options", "{bad"], "not valid JSON"),
        (["--catalog", "c.csv", "--output", "o", "--max-error-rate", "2"], "[0, 1]"),
        (["--catalog", "c.csv", "--output", "o", "--batchsize", "3"], "unrecognized arguments"),
    ],
)
def test_bad_flags_give_one_line(args: list[str], needle: str) -> None:
    r = _run(args, timeout=60)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("embed_catalog: error:"), r.stderr


def test_runtime_failure_is_one_line_not_a_traceback(tmp_path) -> None:
    r = _run(
        [
            "--catalog",
            str(tmp_path / "missing.csv"),
            "--output",
            str(tmp_path / "o"),
            "--checkpoint",
            CKPT,
            "--stats",
            STATS,
            "--no-progress",
        ],
        timeout=120,
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "embed_catalog: error:" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("embed_catalog: error:")


def test_help_documents_every_flag() -> None:
    r = _run(["--help"], timeout=60)
    assert r.returncode == 0
    for flag in (
        "--catalog",
        "--output",
        "--checkpoint",
        "--stats",
        "--model-config",
        "--layers",
        "--window-s",
        "--hop-s",
        "--profile",
        "--frames-hz",
        "--precision",
        "--batch-size",
        "--gpu-actors",
        "--decode-cpus",
        "--format",
        "--limit",
        "--storage-options",
        "--allowed-prefixes",
        "--demo",
    ):
        assert flag in r.stdout


# --------------------------------------------------------------------------- S3


def test_end_to_end_on_s3(ray_cluster, s3_server, tmp_path) -> None:

    s3 = s3_server.client()
    s3.create_bucket(Bucket="music")
    picks = ["hw_fruit", "lc_lincity", "fb_introzik"]
    with open(AUDIO / "catalog.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["track_id"] in picks]
    for r in rows:
        s3.upload_file(str(AUDIO / r["uri"]), "music", f"catalog/{r['uri']}")
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["track_id", "uri", "title"])
    w.writeheader()
    w.writerows(
        [{"track_id": r["track_id"], "uri": r["uri"], "title": r["title"]} for r in rows]
        + [
            {"track_id": "ghost", "uri": "clips/ghost.ogg", "title": "missing object"},
            {"track_id": "outside", "uri": "s3://other-bucket/x.ogg", "title": "outside the prefix"},
        ]
    )
    s3.put_object(Bucket="music", Key="catalog/catalog.csv", Body=buf.getvalue().encode())
    opts = {"endpoint_url": s3_server, "key": "testing", "secret": "testing", "region": "us-east-1"}
    job = EmbedJob(
        catalog="s3://music/catalog/catalog.csv",
        output="s3://music/store",
        checkpoint=CKPT,
        stats=STATS,
        layers=(3,),
        precision="fp32",
        storage_options=opts,
        decode_cpus=2,
    )
    report = run_embed(job, progress=False)
    assert report.tracks_ok == 3 and report.tracks_failed == 2
    lo = {
        "aws_endpoint": s3_server,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "aws_region": "us-east-1",
        "allow_http": "true",
    }
    tracks = lance.dataset("s3://music/store/tracks.lance", storage_options=lo).to_table().to_pylist()
    assert {t["track_id"] for t in tracks} == set(picks)
    etags = {o["Key"]: o["ETag"].strip('"') for o in s3.list_objects_v2(Bucket="music")["Contents"]}
    for t in tracks:
        assert t["uri"].startswith("s3://music/catalog/clips/")
        assert t["content_version"] == etags[t["uri"][len("s3://music/") :]]  # ETag from object metadata
    errors = {
        e["track_id"]: e
        for e in lance.dataset("s3://music/store/errors.lance", storage_options=lo).to_table().to_pylist()
    }
    assert errors["ghost"]["stage"] == "fetch" and errors["outside"]["stage"] == "catalog"
    run = lance.dataset("s3://music/store/runs.lance", storage_options=lo).to_table().to_pylist()[-1]
    assert '"secret": "***"' in run["args_json"] and "testing" not in run["args_json"].replace(s3_server, "")


# --------------------------------------------------------------------------- ray job submit


def _stop_head(temp: str) -> None:
    """Stop the head started by the test: every process whose command line names its temp dir."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if temp.encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_against_a_local_head(tmp_path) -> None:
    venv_bin = Path(sys.executable).parent
    ray_bin = str(venv_bin / "ray")
    # A throwaway local head without token auth (Ray 2.60 enables it by default).
    env = {
        **os.environ,
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    gcs, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's unix socket paths must fit 107 chars
    # Teardown kills the processes of THIS head only (found by its temp dir): `ray stop` would kill
    # every Ray cluster on the machine, the test session's one included.
    start = subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            f"--port={gcs}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=3",
            "--num-gpus=1",
            "--include-dashboard=true",
            f"--temp-dir={temp}",
            # own agent ports: the defaults are taken by the test session's cluster on this machine
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            "--disable-usage-stats",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        out = tmp_path / "store"
        catalog = tmp_path / "cat"
        catalog.mkdir()
        for name in ("hw_fruit.ogg", "hw_snow.mp3"):
            shutil.copy(AUDIO / "clips" / name, catalog / name)
        runtime_env = {
            "env_vars": {"MUSICFM_TEST_MARKER": "1"},
            "excludes": [".venv", ".git", "demo_store", "*.pt", "*.safetensors"],
        }
        deadline = time.time() + 180
        while True:  # the job server comes up a little after `ray start` returns
            r = subprocess.run(
                [ray_bin, "job", "list", "--address", f"http://127.0.0.1:{dash}"],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                check=False,
            )
            if r.returncode == 0 or time.time() > deadline:
                break
            time.sleep(2)
        agent_deadline = time.time() + 300
        while True:  # the head's job agent comes up a while after the dashboard (slow on 2 busy cores)
            sub = subprocess.run(
                [
                    ray_bin,
                    "job",
                    "submit",
                    "--address",
                    f"http://127.0.0.1:{dash}",
                    "--working-dir",
                    str(REPO),
                    "--runtime-env-json",
                    json.dumps(runtime_env),
                    "--",
                    "python",
                    "jobs/embed_catalog.py",
                    "--catalog",
                    str(catalog),
                    "--output",
                    str(out),
                    "--checkpoint",
                    CKPT,
                    "--stats",
                    STATS,
                    "--layers",
                    "2,3",
                    "--no-progress",
                    "--decode-cpus",
                    "1",
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=400,
                check=False,
            )
            if "No available agent" not in sub.stderr + sub.stdout or time.time() > agent_deadline:
                break
            time.sleep(3)
        assert sub.returncode == 0, (sub.stdout[-3000:], sub.stderr[-3000:])
        assert "succeeded" in sub.stdout.lower() and "2 embedded, 0 failed" in sub.stdout
        tracks = lance.dataset(str(out / "tracks.lance")).to_table()
        assert tracks.num_rows == 2 and tracks.schema.field("layer_2").type.list_size == 48
    finally:
        _stop_head(temp)
