"""The Ray Serve search app, over real HTTP on a free local port."""

from __future__ import annotations

import time
import urllib.parse

import lance
import numpy as np
import pytest
import requests

from pipeline.search.reader import open_store
from pipeline.search.synthetic import tracks_table, write_synthetic_store
from tests.conftest import AUDIO, GOLDEN
from tools.testkit.net import free_port

DIM = 48  # the golden model's width, so audio queries can be embedded
CLIP = AUDIO / "clips" / "hw_fruit.ogg"
LIMIT = 400_000


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    from ray import serve

    from musicfm import MusicFM25Hz
    from pipeline.search.service import serve_app

    model = MusicFM25Hz.from_checkpoint(str(GOLDEN / "checkpoint.pt"), str(GOLDEN / "stats.json"))
    root = tmp_path_factory.mktemp("serve-store")
    args = {
        "checkpoint": str(GOLDEN / "checkpoint.pt"),
        "stats": str(GOLDEN / "stats.json"),
        "window_s": 10.0,
        "hop_s": 10.0,
    }
    syn = write_synthetic_store(
        str(root),
        n_tracks=80,
        layers=(2, 3),
        dim=DIM,
        windows_per_track=2,
        clusters=6,
        model_id=model.model_id,
        run_args=args,
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        cfg = {"store": str(root), "max_upload_bytes": LIMIT, "refresh_s": 0.2}
        serve.run(serve_app(cfg, num_cpus=0), name="search-test", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                raise RuntimeError("search service did not come up")
            time.sleep(0.5)
        yield url, root, syn
    finally:
        serve.shutdown()


def test_health_and_info(service) -> None:
    url, _, _ = service
    assert requests.get(f"{url}/healthz", timeout=30).json()["tracks"] >= 80
    info = requests.get(f"{url}/info", timeout=30).json()
    assert info["layers"] == [2, 3] and info["dim"] == DIM and info["model_id"].startswith("musicfm-")


def test_similar_matches_the_library(service) -> None:
    url, root, _ = service
    r = requests.get(f"{url}/similar/trk00003", params={"k": 4, "layer": 2}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    doc = r.json()
    ids = [h["track_id"] for h in doc["hits"]]
    assert len(ids) == 4 and "trk00003" not in ids and doc["query_track_id"] == "trk00003"
    assert ids == [h.track_id for h in open_store(str(root)).search("trk00003", layer=2, k=4)]
    scores = [h["score"] for h in doc["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert doc["hits"][0]["metadata"]["title"].startswith("Title ")


def test_similar_window_level_with_where(service) -> None:
    url, _, _ = service
    q = urllib.parse.urlencode({"k": 3, "level": "window", "where": "genre = 'jazz'"})
    doc = requests.get(f"{url}/similar/trk00003?{q}", timeout=30).json()
    assert doc["level"] == "window" and len(doc["hits"]) == 3
    assert all(h["metadata"]["genre"] == "jazz" and h["end_s"] > h["start_s"] for h in doc["hits"])


@pytest.mark.parametrize(
    ("path", "params", "status", "needle"),
    [
        ("/similar/no-such-track", {}, 404, "unknown track_id 'no-such-track'"),
        ("/similar/trk00003", {"layer": 99}, 400, "available layers: 2, 3"),
        ("/similar/trk00003", {"k": 0}, 400, "k must be in 1..1000"),
        ("/similar/trk00003", {"k": 1001}, 400, "k must be in 1..1000"),
        ("/similar/trk00003", {"k": "ten"}, 400, "k must be an integer"),
        ("/similar/trk00003", {"level": "frame"}, 400, "level must be"),
        ("/similar/trk00003", {"where": "nosuch = 1"}, 400, "bad where"),
    ],
)
def test_similar_errors(service, path, params, status, needle) -> None:
    url, _, _ = service
    r = requests.get(url + path, params=params, timeout=30)
    assert r.status_code == status
    doc = r.json()
    assert doc["status"] == status and needle in doc["error"]


def test_search_by_vector(service) -> None:
    url, _, syn = service
    v = syn.track_vectors[3][11].tolist()
    r = requests.post(f"{url}/search", json={"vector": v, "k": 3, "layer": 3}, timeout=30)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["query"] == "vector" and doc["hits"][0]["track_id"] == "trk00011"
    assert doc["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5) and len(doc["hits"]) == 3
    # query-string parameters apply to JSON bodies too
    assert len(requests.post(f"{url}/search?k=2", json={"vector": v}, timeout=30).json()["hits"]) == 2


@pytest.mark.parametrize(
    ("kwargs", "status", "needle"),
    [
        ({"json": {"vector": [1.0, 2.0]}}, 400, "this store's vectors have 48"),
        ({"json": {"vector": "abc"}}, 400, "array of numbers"),
        ({"json": {"k": 3}}, 400, 'needs "vector"'),
        ({"data": b"{nope", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"data": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported content type"),
        ({"data": b"", "headers": {"content-type": "audio/ogg"}}, 400, "empty body"),
        ({"data": b"\0" * (LIMIT + 1), "headers": {"content-type": "audio/wav"}}, 413, "over the limit"),
        (
            {"data": b"not audio at all" * 100, "headers": {"content-type": "application/octet-stream"}},
            422,
            "cannot embed",
        ),
    ],
)
def test_search_errors(service, kwargs, status, needle) -> None:
    url, _, _ = service
    r = requests.post(f"{url}/search", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_search_by_uploaded_audio(service) -> None:
    url, _, _ = service
    data = CLIP.read_bytes()
    r = requests.post(
        f"{url}/search",
        params={"k": 5, "layer": 3},
        files={"file": (CLIP.name, data, "audio/ogg")},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["query"] == "audio" and doc["layer"] == 3 and len(doc["hits"]) == 5
    # the same bytes as a raw body, and form fields as parameters
    raw = requests.post(
        f"{url}/search?k=5&layer=3&filename=q.ogg",
        data=data,
        headers={"content-type": "audio/ogg"},
        timeout=120,
    ).json()
    assert [h["track_id"] for h in raw["hits"]] == [h["track_id"] for h in doc["hits"]]
    form = requests.post(
        f"{url}/search",
        data={"k": "2", "layer": "3"},
        files={"file": (CLIP.name, data, "audio/ogg")},
        timeout=120,
    ).json()
    assert len(form["hits"]) == 2


def test_new_rows_are_served_after_refresh(service) -> None:
    url, root, syn = service
    v = -syn.track_vectors[2][0]
    t = tracks_table(
        ["late"],
        {2: v[None, :], 3: syn.track_vectors[3][0][None, :]},
        {"title": ["Late"], "artist": [None], "genre": ["pop"]},
        model_id=syn.model_id,
    )
    lance.write_dataset(t, str(root / "tracks.lance"), mode="append")
    deadline = time.time() + 20
    while True:
        r = requests.get(f"{url}/similar/late", params={"k": 1, "layer": 2}, timeout=30)
        if r.status_code == 200 or time.time() > deadline:
            break
        time.sleep(0.3)
    assert r.status_code == 200, r.text
    r = requests.post(f"{url}/search", json={"vector": v.tolist(), "k": 1, "layer": 2}, timeout=30)
    assert r.json()["hits"][0]["track_id"] == "late"
    np.testing.assert_equal(len(r.json()["hits"]), 1)
