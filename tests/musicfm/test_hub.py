"""musicfm.hub / MusicFM25Hz.from_pretrained against a local Hugging Face Hub stand-in.

A small HTTP server on 127.0.0.1 answers the requests ``huggingface_hub.hf_hub_download`` makes:
``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}``. Small files are answered directly
(git-blob ETag, ``X-Repo-Commit``); the checkpoint is served like an LFS file on the real Hub: the
``HEAD`` answers 302 with ``X-Linked-Etag`` (sha256) / ``X-Linked-Size`` and a ``Location`` on a second
server (another port, i.e. another origin, like the Hub's CDN), from which the client downloads it.
Errors carry the Hub's ``X-Error-Code`` header (EntryNotFound, RevisionNotFound).

Every download runs in a fresh Python process with ``HF_ENDPOINT`` / ``HF_HOME`` / ``HF_HUB_OFFLINE``
in its environment, exactly as a user would set them: ``huggingface_hub.constants`` reads them once at
import, so patching ``os.environ`` inside this process would not reach an already imported hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from musicfm import MusicFM25Hz
from musicfm.hub import PRESETS, REPO_ID, HubError, fetch_pretrained
from tests.conftest import GOLDEN, REPO

pytest.importorskip("huggingface_hub")

COMMIT_MAIN = "0123456789abcdef0123456789abcdef01234567"
COMMIT_V1 = "fedcba9876543210fedcba9876543210fedcba98"
CKPT_BYTES = (GOLDEN / "checkpoint.pt").read_bytes()
STATS_BYTES = (GOLDEN / "stats.json").read_bytes()
CKPT_SHA256 = hashlib.sha256(CKPT_BYTES).hexdigest()
REPO_DIR = "models--" + REPO_ID.replace("/", "--")  # the hub cache's folder for the repo


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# --------------------------------------------------------------------------- the fake hub


@dataclass
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    revision: str | None = None
    filename: str | None = None
    authorization: str | None = None


@dataclass
class FakeHub:
    """Hub + CDN servers on 127.0.0.1 (free ports), serving ``files`` at every revision in ``refs``."""

    files: dict[str, bytes]
    refs: dict[str, str] = field(default_factory=lambda: {"main": COMMIT_MAIN, "v1.0": COMMIT_V1})
    lfs_suffixes: tuple[str, ...] = (".pt",)
    plain_404: bool = False  # answer every request with a bare 404 (a mirror without Hub headers)
    requests: list[Request] = field(default_factory=list)

    def start(self) -> FakeHub:
        self._blobs = {hashlib.sha256(b).hexdigest(): b for b in self.files.values()}
        self._hub = self._serve("hub")
        self._cdn = self._serve("cdn")
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def stop(self) -> None:
        for srv in (self._hub, self._cdn):
            srv.shutdown()
            srv.server_close()

    def hub_requests(self) -> list[Request]:
        return [r for r in self.requests if r.server == "hub"]

    def _serve(self, role: str) -> ThreadingHTTPServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:  # noqa: N802 (http.server API)
                hub._answer(self, role, body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub._answer(self, role, body=True)

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return srv

    def _answer(self, h: BaseHTTPRequestHandler, role: str, body: bool) -> None:
        req = Request(role, h.command, h.path, authorization=h.headers.get("Authorization"))
        self.requests.append(req)
        if self.plain_404:
            return self._send(h, 404, {"Content-Type": "text/plain"}, b"Not Found", body)
        if role == "cdn":  # /blobs/{sha256}
            data = self._blobs.get(h.path.rsplit("/", 1)[-1])
            if data is None:
                return self._send(h, 404, {}, b"no such blob", body)
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            return self._send(h, 200, {"ETag": etag, "Content-Type": "application/octet-stream"}, data, body)
        # /{namespace}/{name}/resolve/{revision}/{filename}
        parts = h.path.lstrip("/").split("/", 4)
        if len(parts) != 5 or parts[2] != "resolve":
            return self._send(h, 404, {"X-Error-Code": "RepoNotFound"}, b"Repository not found", body)
        repo, revision, filename = f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote(parts[4])
        req.revision, req.filename = revision, filename
        if repo != REPO_ID:
            return self._send(h, 404, {"X-Error-Code": "RepoNotFound"}, b"Repository not found", body)
        commit = self.refs.get(revision) or (revision if revision in self.refs.values() else None)
        if commit is None:
            hdr = {"X-Error-Code": "RevisionNotFound", "X-Error-Message": f"Invalid rev id: {revision}"}
            return self._send(h, 404, hdr, b"Revision not found", body)
        data = self.files.get(filename)
        if data is None:
            hdr = {
                "X-Error-Code": "EntryNotFound",
                "X-Error-Message": "Entry not found",
                "X-Repo-Commit": commit,
            }
            return self._send(h, 404, hdr, b"Entry not found", body)
        if filename.endswith(self.lfs_suffixes):  # LFS: redirect to the CDN with the linked etag and size
            sha = hashlib.sha256(data).hexdigest()
            hdr = {
                "Location": f"{self.cdn}/blobs/{sha}",
                "X-Repo-Commit": commit,
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data)),
                "ETag": f'"{_git_blob_sha1(sha.encode())}"',  # the pointer file's etag
            }
            return self._send(h, 302, hdr, b"", body)
        hdr = {
            "X-Repo-Commit": commit,
            "ETag": f'"{_git_blob_sha1(data)}"',
            "Content-Type": "application/json",
        }
        return self._send(h, 200, hdr, data, body)

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], data: bytes, body: bool
    ) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body and data:
            h.wfile.write(data)


@pytest.fixture
def hub():
    server = FakeHub(files={"pretrained_msd.pt": CKPT_BYTES, "msd_stats.json": STATS_BYTES}).start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- a user's process

_CHILD = r"""
import json, sys
from musicfm.hub import HubError, fetch_pretrained
a = json.loads(sys.argv[1])
kw = {k: a[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in a}
try:
    if a["what"] == "model":
        from musicfm import MusicFM25Hz
        m = MusicFM25Hz.from_pretrained(a["name"], **kw)
        out = {"ok": True, "model_id": m.model_id, "provenance": m.provenance}
    else:
        ckpt, stats = fetch_pretrained(a["name"], **kw)
        out = {"ok": True, "ckpt": ckpt, "stats": stats}
except HubError as e:
    out = {"ok": False, "error": type(e).__name__, "message": str(e)}
print("RESULT " + json.dumps(out))
"""


def run_user(
    hf_home: Path,
    endpoint: str,
    *,
    what: str = "fetch",
    name: str = "msd",
    offline: bool = False,
    env: dict[str, str] | None = None,
    **kwargs: object,
) -> dict:
    """Run fetch_pretrained / from_pretrained in a fresh interpreter with the hub's env vars set."""
    child_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "MUSICFM_SHA256"))
    }
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        child_env.pop(k, None)
    child_env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="1" if offline else "0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_ETAG_TIMEOUT="5",
        NO_PROXY="127.0.0.1,localhost",
        PYTHONPATH=str(REPO),
        **(env or {}),
    )
    arg = json.dumps({"what": what, "name": name, **kwargs})
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, arg],
        env=child_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    return json.loads(lines[-1][len("RESULT ") :])


def _snapshot(hf_home: Path, commit: str) -> Path:
    return hf_home / "hub" / REPO_DIR / "snapshots" / commit


@pytest.fixture(scope="module")
def golden_model_id() -> str:
    return MusicFM25Hz.from_checkpoint(GOLDEN / "checkpoint.pt", GOLDEN / "stats.json").model_id


# --------------------------------------------------------------------------- tests


def test_download_loads_the_model_and_fills_the_hf_cache(hub: FakeHub, tmp_path: Path, golden_model_id: str):
    hf_home = tmp_path / "hf"
    out = run_user(hf_home, hub.endpoint, what="model")
    assert out["ok"], out
    assert out["model_id"] == golden_model_id  # same weights and stats as from_checkpoint on the golden files
    assert out["provenance"]["file"] == "pretrained_msd.pt"

    snap = _snapshot(hf_home, COMMIT_MAIN)
    assert (snap / "pretrained_msd.pt").read_bytes() == CKPT_BYTES
    assert (snap / "msd_stats.json").read_bytes() == STATS_BYTES
    blobs = hf_home / "hub" / REPO_DIR / "blobs"
    assert (blobs / CKPT_SHA256).is_file()  # LFS blob named by its sha256 (X-Linked-Etag)
    assert (blobs / _git_blob_sha1(STATS_BYTES)).is_file()  # plain file named by its git blob sha1
    assert (hf_home / "hub" / REPO_DIR / "refs" / "main").read_text() == COMMIT_MAIN

    hub_reqs = {(r.method, r.filename, r.revision) for r in hub.hub_requests()}
    assert ("HEAD", "pretrained_msd.pt", "main") in hub_reqs and (
        "HEAD",
        "msd_stats.json",
        "main",
    ) in hub_reqs
    assert ("GET", "msd_stats.json", "main") in hub_reqs
    cdn_gets = [r for r in hub.requests if r.server == "cdn" and r.method == "GET"]
    assert [r.path for r in cdn_gets] == [f"/blobs/{CKPT_SHA256}"]  # the checkpoint came from the "CDN"


def test_second_call_uses_the_cache_offline_or_unreachable(
    hub: FakeHub, tmp_path: Path, golden_model_id: str
):
    hf_home = tmp_path / "hf"
    first = run_user(hf_home, hub.endpoint)
    assert first["ok"], first
    endpoint = hub.endpoint
    hub.stop()  # nothing answers any more

    offline = run_user(hf_home, endpoint, what="model", offline=True)
    assert offline["ok"], offline
    assert offline["model_id"] == golden_model_id

    again = run_user(hf_home, endpoint, offline=True)
    assert (again["ckpt"], again["stats"]) == (first["ckpt"], first["stats"])
    assert Path(again["ckpt"]).parent == _snapshot(hf_home, COMMIT_MAIN)

    # online mode but the endpoint refuses connections: huggingface_hub falls back to the cached snapshot
    unreachable = run_user(hf_home, endpoint)
    assert unreachable["ok"], unreachable
    assert unreachable["ckpt"] == first["ckpt"]


def test_offline_and_not_cached_is_a_clear_hub_error(hub: FakeHub, tmp_path: Path):
    out = run_user(tmp_path / "empty", hub.endpoint, offline=True)
    assert not out["ok"] and out["error"] == "HubError"
    msg = out["message"]
    assert REPO_ID in msg and "msd_stats.json" in msg
    assert "not in the local Hugging Face cache" in msg and "offline" in msg
    assert hub.requests == []  # offline really means no request


def test_unreachable_endpoint_and_not_cached_is_a_clear_hub_error(tmp_path: Path):
    server = FakeHub(files={}).start()
    endpoint = server.endpoint
    server.stop()  # connection refused
    out = run_user(tmp_path / "empty", endpoint)
    assert not out["ok"] and out["error"] == "HubError"
    assert "not in the local Hugging Face cache" in out["message"] and "ConnectError" in out["message"]


def test_local_files_only_and_not_cached_is_a_clear_hub_error(hub: FakeHub, tmp_path: Path):
    out = run_user(tmp_path / "empty", hub.endpoint, local_files_only=True)
    assert not out["ok"] and "not in the local Hugging Face cache" in out["message"]
    assert hub.requests == []


def test_unknown_preset_is_a_hub_error() -> None:
    with pytest.raises(HubError, match=r"unknown pretrained model 'nope'.*msd.*fma"):
        fetch_pretrained("nope")
    with pytest.raises(HubError, match="unknown pretrained model"):
        MusicFM25Hz.from_pretrained("MSD")  # names are exact
    assert set(PRESETS) == {"msd", "fma"}


def test_revision_is_passed_through_and_cached_per_commit(hub: FakeHub, tmp_path: Path):
    hf_home = tmp_path / "hf"
    out = run_user(hf_home, hub.endpoint, revision="v1.0")
    assert out["ok"], out
    assert {r.revision for r in hub.hub_requests()} == {"v1.0"}  # every request asked for the pinned revision
    assert Path(out["ckpt"]).parent == _snapshot(hf_home, COMMIT_V1)
    assert (hf_home / "hub" / REPO_DIR / "refs" / "v1.0").read_text() == COMMIT_V1

    # a full commit hash that is already cached resolves from disk without any request
    n = len(hub.requests)
    by_commit = run_user(hf_home, hub.endpoint, revision=COMMIT_V1)
    assert by_commit["ckpt"] == out["ckpt"] and len(hub.requests) == n

    bad = run_user(tmp_path / "hf2", hub.endpoint, revision="no-such-tag")
    assert not bad["ok"] and "RevisionNotFound" in bad["message"], bad
    assert {r.revision for r in hub.requests[n:]} == {"no-such-tag"}


def test_sha256_pin_mismatch_deletes_the_cached_file(hub: FakeHub, tmp_path: Path):
    hf_home = tmp_path / "hf"
    out = run_user(hf_home, hub.endpoint, env={"MUSICFM_SHA256_MSD": "0" * 64})
    assert not out["ok"] and out["error"] == "HubError"
    assert "SHA-256 mismatch" in out["message"] and CKPT_SHA256 in out["message"]
    snap = _snapshot(hf_home, COMMIT_MAIN)
    assert not (snap / "pretrained_msd.pt").exists() and not (snap / "pretrained_msd.pt").is_symlink()
    assert not (hf_home / "hub" / REPO_DIR / "blobs" / CKPT_SHA256).exists()
    assert (snap / "msd_stats.json").is_file()  # only the checkpoint is pinned

    # the next call downloads it again and, with the right pin (any case), succeeds
    ok = run_user(hf_home, hub.endpoint, env={"MUSICFM_SHA256_MSD": CKPT_SHA256.upper()})
    assert ok["ok"], ok
    assert Path(ok["ckpt"]).read_bytes() == CKPT_BYTES
    cdn_gets = [r for r in hub.requests if r.server == "cdn" and r.method == "GET"]
    assert len(cdn_gets) == 2


def test_correct_sha256_pin_passes(hub: FakeHub, tmp_path: Path, golden_model_id: str):
    out = run_user(tmp_path / "hf", hub.endpoint, what="model", env={"MUSICFM_SHA256_MSD": CKPT_SHA256})
    assert out["ok"], out
    assert out["model_id"] == golden_model_id


def test_token_goes_to_the_hub_but_not_to_the_cdn(hub: FakeHub, tmp_path: Path):
    out = run_user(tmp_path / "hf", hub.endpoint, token="hf_dummy_token")
    assert out["ok"], out
    assert {r.authorization for r in hub.hub_requests()} == {"Bearer hf_dummy_token"}
    assert {r.authorization for r in hub.requests if r.server == "cdn"} == {None}


def test_missing_file_404_is_a_clear_hub_error(tmp_path: Path):
    server = FakeHub(files={"msd_stats.json": STATS_BYTES}).start()  # the checkpoint is missing
    try:
        out = run_user(tmp_path / "hf", server.endpoint)
    finally:
        server.stop()
    assert not out["ok"] and out["error"] == "HubError"
    msg = out["message"]
    assert f"{REPO_ID}/pretrained_msd.pt" in msg and "404" in msg and "EntryNotFound" in msg


def test_plain_404_from_a_mirror_is_a_clear_hub_error(tmp_path: Path):
    """A wrong HF_ENDPOINT (no Hub headers, bare 404) must say 404, not 'offline'."""
    server = FakeHub(files={}, plain_404=True).start()
    try:
        out = run_user(tmp_path / "hf", server.endpoint)
    finally:
        server.stop()
    assert not out["ok"] and out["error"] == "HubError"
    msg = out["message"]
    assert f"{REPO_ID}/msd_stats.json" in msg and "404" in msg and "HF_ENDPOINT" in msg, msg
    assert "offline" not in msg  # the server did answer
