"""SIGTERM to the search service (``jobs/serve_search.py``), as Kubernetes stops a pod, mid-load:
a request in flight (its body still arriving when the signal comes) is answered in full, the
process exits 0 within its grace period, with no stack dump, and then refuses connections."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from pipeline.search.synthetic import write_synthetic_store
from tests.conftest import REPO
from tools.testkit.net import free_port

GRACE_S = 30.0


def _start(store: Path, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_raylet_start_wait_time_s": "300",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "jobs/serve_search.py", "--store", str(store), "--port", str(port),
           "--num-cpus", "0", "--grace-s", str(GRACE_S)]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_up(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if requests.get(f"{url}/healthz", timeout=30).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or slow to answer under load
            pass
        time.sleep(0.5)
    raise AssertionError("the service did not come up")


def test_sigterm_finishes_the_request_in_flight_and_exits_0(tmp_path: Path) -> None:
    syn = write_synthetic_store(str(tmp_path / "store"), n_tracks=60, layers=(3,), dim=16, clusters=4, seed=1)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(tmp_path / "store", port)
    try:
        _wait_up(url, proc)
        query = syn.track_vectors[3][7]
        body = json.dumps({"vector": [float(v) for v in query], "k": 5, "layer": 3}).encode()
        half, sent_half, go_on = len(body) // 2, threading.Event(), threading.Event()

        def slow_body() -> Iterator[bytes]:
            yield body[:half]
            sent_half.set()
            go_on.wait(60)
            yield body[half:]

        answer: dict = {}

        def in_flight() -> None:
            r = requests.post(f"{url}/search", data=slow_body(), headers={"content-type": "application/json"},
                              timeout=120)  # fmt: skip
            answer["status"], answer["json"] = r.status_code, r.json()

        load_codes: list[int] = []
        stop_load = threading.Event()

        def load() -> None:  # quick requests around the signal
            while not stop_load.is_set():
                try:
                    load_codes.append(
                        requests.get(f"{url}/similar/{syn.track_ids[1]}?k=3&layer=3", timeout=30).status_code
                    )
                except requests.RequestException:
                    load_codes.append(-1)  # refused once the service is stopping: fine, never a hang
                time.sleep(0.05)

        threads = [threading.Thread(target=in_flight), threading.Thread(target=load)]
        for t in threads:
            t.start()
        assert sent_half.wait(60)
        time.sleep(1.0)  # the request is in the service: headers and half of its body received
        deadline = time.monotonic() + 60
        while 200 not in load_codes and time.monotonic() < deadline:
            time.sleep(0.1)
        assert 200 in load_codes  # under load
        proc.send_signal(signal.SIGTERM)
        t_sig = time.monotonic()
        time.sleep(2.0)  # the service is stopping while the request's body is still arriving
        go_on.set()
        threads[0].join(120)
        stop_load.set()
        threads[1].join(60)
        out, err = proc.communicate(timeout=GRACE_S + 60)
        stop_s = time.monotonic() - t_sig
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert answer.get("status") == 200, (answer, err[-3000:])
    ids = [r["track_id"] for r in answer["json"]["hits"]]
    assert len(ids) == 5 and ids[0] == syn.track_ids[7]
    assert proc.returncode == 0, err[-3000:]
    assert stop_s < GRACE_S + 30, stop_s
    for dump in ("SIGTERM received", "PC: @"):  # Ray's C++ signal handler's stack dump
        assert dump not in err and dump not in out, err[-3000:]
    assert not any(line.startswith("Traceback") for line in err.splitlines()), err[-3000:]  # the driver's
    assert "serve_search: SIGTERM: finishing the requests in flight" in out and "serve_search: stopped" in out
    assert all(c in (200, 404, 503, -1) for c in load_codes), load_codes
    try:
        requests.get(f"{url}/healthz", timeout=5)
        raise AssertionError("still answering after exit")
    except requests.ConnectionError:
        pass
