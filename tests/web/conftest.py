"""Fixtures of the browser tests: a real store built from shared/audio, a real Serve app on a free
loopback port, and Debian's Chromium driven by Playwright (never `playwright install`)."""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import AUDIO
from tools.testkit.net import free_port
from tools.testkit.reliability import job_kwargs

CHROMIUM = os.environ.get("MUSICFM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE_TITLE = "<img src=x onerror=alert(1)>"
HOSTILE_TRACK = "lc_lincity"


@pytest.fixture(scope="session")
def web_store(ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    """The 12 clips of shared/audio (one with a hostile title) plus one broken file, embedded with
    the small golden model; returns (store path, run report)."""
    from pipeline.runs.embed import run_embed
    from pipeline.runs.settings import EmbedJob

    root = tmp_path_factory.mktemp("web-store")
    (root / "bad.wav").write_bytes(b"RIFF but not a wav file" * 8)
    with open(AUDIO / "catalog.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(root / "catalog.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["track_id", "uri", "title", "artist", "license"])
        for r in rows:
            title = HOSTILE_TITLE if r["track_id"] == HOSTILE_TRACK else r["title"]
            w.writerow([r["track_id"], str(AUDIO / r["uri"]), title, r["artist"], r["license"]])
        w.writerow(["broken", str(root / "bad.wav"), "Broken", "Nobody", "none"])
    settings = job_kwargs(window_s=10.0, hop_s=10.0, batch_size=4, allowed_prefixes=(str(AUDIO), str(root)))
    job = EmbedJob(catalog=str(root / "catalog.csv"), output=str(root / "store"), **settings)
    report = run_embed(job, progress=False)
    assert report.status == "ok" and report.tracks_ok == 12 and report.tracks_failed == 1
    return root / "store", report


def copy_store(store: Path, dest: Path) -> Path:
    shutil.copytree(store, dest)
    return dest


@contextlib.contextmanager
def serve_web(store: Path, web: dict, name: str, headers: dict | None = None) -> Iterator[str]:
    """The search app with the page on a free loopback port; yields its base URL."""
    from ray import serve

    from pipeline.search.service import serve_app
    from pipeline.search.web import deployment_options

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        cfg = {"store": str(store), "refresh_s": 0.3, "max_upload_bytes": 4 * 2**20}
        app = serve_app(cfg, num_cpus=0, name=name, options=deployment_options((1, 1), 32, 64), web=web)
        serve.run(app, name=name, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                if requests.get(f"{url}/healthz", headers=headers, timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the web app did not come up")
            time.sleep(0.3)
        yield url
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: $MUSICFM_TEST_ARTIFACTS, else a pytest temp dir (printed)."""
    env = os.environ.get("MUSICFM_TEST_ARTIFACTS")
    path = Path(env) if env else tmp_path_factory.mktemp("web-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


class PageLog:
    """Console errors, page errors, dialogs and /audio responses seen by a page."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.audio: list[tuple[str, int, str | None]] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("dialog", self._dialog)
        page.on("response", self._response)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _response(self, resp) -> None:
        if "/audio/" in resp.url:
            self.audio.append((resp.url, resp.status, resp.request.headers.get("range")))
