"""SIGTERM to a running refresh (and embed) job: the commit in flight finishes, committed chunks
stay as they are, the run is recorded as failed with the reason, the store's lease is released,
and the job exits 143 (:data:`pipeline.signals.EXIT_TERMINATED`) with one line and no stack dump.
The same command then resumes: every good track exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.signals import EXIT_TERMINATED
from tests.conftest import REPO
from tools.testkit.stores import CKPT, STATS, check_consistent, table, write_catalog, write_tone

N_TRACKS, CHUNK = 24, 2


def _cmd(job: str, catalog: str, store: Path) -> list[str]:
    out = "--store" if job == "refresh_catalog" else "--output"
    cmd = [
        sys.executable, f"jobs/{job}.py", "--catalog", catalog, out, str(store), "--checkpoint", CKPT,
        "--stats", STATS, "--layers", "1,3", "--precision", "fp32", "--window-s", "1", "--hop-s", "1", "--frames-hz", "5",
        "--chunk-size", str(CHUNK), "--decode-cpus", "1", "--gpu-actors", "1", "--batch-size", "4",
        "--log-format", "json", "--no-progress", "--planner", "driver",
    ]  # fmt: skip
    return cmd + (["--no-maintenance"] if job == "refresh_catalog" else [])


def _env() -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_raylet_start_wait_time_s": "300",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RAY_ADDRESS", None)
    return env


def _library(tmp_path: Path) -> tuple[str, list[str]]:
    audio = tmp_path / "audio"
    audio.mkdir()
    rows = [
        (f"s{i:02d}", write_tone(audio / f"s{i:02d}.wav", 6.0, 150.0 + 11 * i), f"T{i}")
        for i in range(N_TRACKS)
    ]
    return write_catalog(tmp_path / "catalog.csv", rows), [r[0] for r in rows]


def _stop_after_first_commit(cmd: list[str]) -> tuple[int, list[dict], str, float]:
    """Run ``cmd``; SIGTERM it once its first chunk is committed. (exit code, json events, other
    stderr lines, seconds from the signal to the exit)."""
    p = subprocess.Popen(cmd, cwd=REPO, env=_env(), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    events, other, t_sig = [], [], None
    assert p.stderr is not None
    deadline = time.monotonic() + 400
    for line in p.stderr:
        try:
            ev = json.loads(line)
        except ValueError:
            other.append(line.rstrip("\n"))
            continue
        events.append(ev)
        if t_sig is None and ev.get("step") == "chunk committed":
            p.send_signal(signal.SIGTERM)
            t_sig = time.monotonic()
        assert time.monotonic() < deadline, "the job did not finish"
    rc = p.wait(timeout=120)
    assert t_sig is not None, "no chunk was committed: " + "\n".join(other[-20:])
    return rc, events, "\n".join(other), time.monotonic() - t_sig


def _check_stopped(rc: int, events: list[dict], stderr: str, store: Path) -> set[str]:
    assert rc == EXIT_TERMINATED, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr.strip().splitlines()[-1], stderr[-3000:]
    for dump in ("Traceback", "SIGTERM received", "PC: @"):
        assert dump not in stderr, stderr[-3000:]
    committed = [e for e in events if e.get("step") == "chunk committed"]
    assert committed and len(committed) < N_TRACKS // CHUNK  # stopped part-way
    # the committed chunks are there, whole; nothing of the abandoned ones is visible
    check_consistent(store)
    ids = set(table(store, "tracks")["track_id"].to_pylist())
    assert len(ids) == sum(e["tracks"] for e in committed)
    run = table(store, "runs").to_pylist()[-1]
    assert run["status"] == "failed", run
    return ids


def test_sigterm_stops_a_refresh_after_the_commit_in_flight_and_the_same_command_resumes(tmp_path) -> None:
    catalog, good = _library(tmp_path)
    store = tmp_path / "store"
    cmd = _cmd("refresh_catalog", catalog, store)
    rc, events, stderr, stop_s = _stop_after_first_commit(cmd)
    ids = _check_stopped(rc, events, stderr, store)
    assert stop_s < 60, stop_s  # bounded: the commit in flight, then the stream is closed
    # the lease was released: the rerun takes the store at once (--lock-wait-s 0) and resumes
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    check_consistent(store)
    final = table(store, "tracks")["track_id"].to_pylist()
    assert sorted(final) == sorted(good) and ids <= set(final)
