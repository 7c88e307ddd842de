"""Secrets through ``ray job submit --runtime-env-json`` (slow: starts its own Ray head).

The canary is the real S3 secret of the run (moto accepts any credentials), given only in the
runtime environment's ``env_vars``. It must not appear in what the user sees (submit output, job
logs), in the store, or in the job's own log lines; where Ray itself records the runtime
environment (its job table, agent logs) is reported separately, since that is Ray's behaviour.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import soundfile as sf

from tests.conftest import REPO
from tools.testkit.net import free_port
from tools.testkit.reliability import CKPT, STATS, grep_tree, store_tables, tone


@pytest.mark.slow
def test_runtime_env_secret_never_reaches_output_logs_or_store(s3_server, tmp_path) -> None:
    canary = f"canary-runtime-env-{uuid.uuid4().hex[:12]}"
    key_id = f"CANARYRTKEY{uuid.uuid4().hex[:8]}"
    s3 = s3_server.client()
    s3.create_bucket(Bucket="rt-env-secrets")
    for i in range(2):
        buf = tmp_path / f"a{i}.flac"
        sf.write(buf, tone(2.0, seed=i), 24000)
        s3.upload_file(str(buf), "rt-env-secrets", f"cat/a{i}.flac")
    s3.put_object(Bucket="rt-env-secrets", Key="cat/missing.csv", Body=b"uri\na0.flac\na1.flac\nnope.flac\n")

    venv_bin = Path(sys.executable).parent
    ray_bin = str(venv_bin / "ray")
    temp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # Ray's socket paths must stay short
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))},
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    gcs, dash = free_port(), free_port()
    # every port explicit: other clusters on the machine hold the defaults (e.g. the agent's 52365)
    ports = [f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1"]
    ports += [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}"]
    ports += [f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", *ports]
        + ["--include-dashboard=true", "--num-cpus=2", "--num-gpus=1", f"--temp-dir={temp}"]
        + ["--disable-usage-stats"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # stopped by its process group: never `ray stop` (it kills every cluster)
    )
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while time.time() < deadline:
            r = subprocess.run([ray_bin, "job", "list", "--address", address], env=env, capture_output=True)
            if r.returncode == 0:
                break
            time.sleep(2)
        runtime_env = {
            "env_vars": {
                "AWS_ACCESS_KEY_ID": key_id,
                "AWS_SECRET_ACCESS_KEY": canary,
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": s3_server,
            },
            "excludes": [".venv", ".git", "demo_store", "*.pt", "*.safetensors", "tests"],
        }
        out = "s3://rt-env-secrets/store"
        for _attempt in range(10):  # the job agent comes up a little after the job server
            sub = subprocess.run(
                [ray_bin, "job", "submit", "--address", address, "--working-dir", str(REPO)]
                + ["--runtime-env-json", json.dumps(runtime_env), "--"]
                + ["python", "jobs/embed_catalog.py", "--catalog", "s3://rt-env-secrets/cat/missing.csv"]
                + ["--output", out, "--checkpoint", CKPT, "--stats", STATS, "--layers", "1,3"]
                + ["--window-s", "1", "--no-progress", "--decode-cpus", "1"],
                env=env,
                capture_output=True,
                text=True,
                timeout=500,
                check=False,
            )
            if "No available agent" not in sub.stderr + sub.stdout:
                break
            time.sleep(3)
        assert sub.returncode == 0, (sub.stdout[-3000:], sub.stderr[-3000:])
        assert "2 embedded, 1 failed" in sub.stdout
        user_visible = sub.stdout + sub.stderr
        assert canary not in user_visible and key_id not in user_visible
        lo = {"endpoint_url": s3_server, "key": key_id, "secret": canary}
        tables = store_tables(out, lo)
        dump = "".join(repr(t.to_pylist()) for t in tables.values() if t is not None)
        assert canary not in dump and key_id not in dump
        errors = tables["errors"].to_pylist()
        assert [e["stage"] for e in errors] == ["fetch"]
        # the job's own log lines (driver and workers) carry no secret
        job_logs = [p for p in grep_tree(Path(temp), [canary]) if "/logs/" in p]
        ours = [
            p for p in job_logs if os.path.basename(p.split(":")[0]).startswith(("job-driver", "worker-"))
        ]
        assert not ours, ours
        ray_own = sorted({os.path.basename(p.split(":")[0]) for p in job_logs} - set(ours))
        jl = subprocess.run(
            [ray_bin, "job", "list", "--address", address], env=env, capture_output=True, text=True
        )
        shown = canary in jl.stdout + jl.stderr
        print(
            f"runtime_env secret recorded by Ray itself in: {ray_own or 'nothing'}; `ray job list` shows it: {shown}"
        )
    finally:
        from tools.testkit.reliability import load_psutil

        psutil = load_psutil()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(60)
        for proc in psutil.process_iter(["cmdline"]):  # this session's processes only
            with contextlib.suppress(psutil.Error):
                if any(temp in part for part in proc.info["cmdline"] or ()):
                    proc.kill()
        shutil.rmtree(temp, ignore_errors=True)
