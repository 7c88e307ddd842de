"""jobs/search.py and jobs/build_index.py run as subprocesses, the way users run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.search.synthetic import write_synthetic_store
from tests.conftest import REPO

DIM = 32


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RUST_LOG": "error", "PYTHONPATH": ""}
    return subprocess.run(
        [sys.executable, f"jobs/{script}.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cli-store")
    syn = write_synthetic_store(
        str(root), n_tracks=120, layers=(6, 12), dim=DIM, windows_per_track=3, clusters=8
    )
    return str(root), syn


def test_search_prints_a_readable_table(store) -> None:
    root, syn = store
    p = run("search", "--store", root, "--track-id", "trk00004", "-k", "3", "--level", "window")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "track_id", "title", "artist", "window"]
    assert len(lines) == 5 and lines[-1].startswith(
        "# 3 results, query track trk00004, layer 12, window level"
    )
    assert "exact search" in lines[-1]
    first = lines[1].split()
    assert (
        first[0] == "1" and 0 < float(first[1]) <= 1 and first[2].startswith("trk") and first[2] != "trk00004"
    )
    assert "Title" in lines[1] and "Artist" in lines[1]
    assert "-" in first[-1] and ":" in first[-1]  # window time m:ss.s-m:ss.s


def test_search_json_with_vector_file_and_where(store, tmp_path: Path) -> None:
    root, syn = store
    q = syn.track_vectors[6][17]
    np.save(tmp_path / "q.npy", q)
    p = run(
        "search",
        "--store",
        root,
        "--vector-file",
        str(tmp_path / "q.npy"),
        "--layer",
        "6",
        "-k",
        "4",
        "--where",
        "genre = 'pop' OR track_id = 'trk00017'",
        "--json",
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["layer"] == 6 and doc["exact"] is True and doc["query"] == "vector"
    assert [h["rank"] for h in doc["hits"]] == [1, 2, 3, 4]
    assert doc["hits"][0]["track_id"] == "trk00017" and doc["hits"][0]["score"] == pytest.approx(
        1.0, abs=1e-5
    )
    assert all(h["metadata"]["genre"] == "pop" for h in doc["hits"][1:])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((), "--store"),
        (("--track-id", "trk00001", "-k", "0"), "k"),
        (("--track-id", "trk00001", "-k", "5000"), "at most 1000"),
        (("--track-id", "trk00001", "--audio", "x.wav"), "not allowed with"),
        (("--track-id", "nope"), "unknown track_id 'nope'"),
        (("--track-id", "trk00001", "--layer", "3"), "available layers: 6, 12"),
        (("--track-id", "trk00001", "--where", "genre = = 1"), "bad where"),
        (("--track-id", "trk00001", "--storage-options", "{not json"), "not valid JSON"),
        (("--vector-file", "/nonexistent/q.npy"), "cannot read --vector-file"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(store, args, needle) -> None:
    root, _ = store
    full = args if not args else ("--store", root, *args)
    p = run("search", *full)
    assert p.returncode == 2
    assert p.stdout == ""
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("search: error: ") and needle in err
    assert "Traceback" not in p.stderr


def test_missing_store_is_exit_2(tmp_path: Path) -> None:
    p = run("search", "--store", str(tmp_path / "nothing"), "--track-id", "a")
    assert p.returncode == 2 and "no embedding store" in p.stderr and len(p.stderr.splitlines()) == 1


def test_build_index_cli(tmp_path: Path) -> None:
    write_synthetic_store(str(tmp_path), n_tracks=600, layers=(12,), dim=DIM, clusters=6)
    p = run("build_index", "--store", str(tmp_path), "--json")
    assert p.returncode == 0, p.stderr
    assert [(r["table"], r["action"]) for r in json.loads(p.stdout)] == [("tracks", "exact")]
    p = run("build_index", "--store", str(tmp_path), "--layer", "12", "--index-type", "ivf_pq")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("tracks.layer_12: built IVF_PQ (num_partitions=2 num_sub_vectors=4)")
    p = run("search", "--store", str(tmp_path), "--track-id", "trk00001", "-k", "2", "--nprobes", "1")
    assert p.returncode == 0 and "IVF_PQ (nprobes 1, refine 10)" in p.stdout
    p = run("build_index", "--store", str(tmp_path), "--index-type", "HNSW")
    assert p.returncode == 2 and p.stderr.startswith("build_index: error: argument --index-type")
    assert len(p.stderr.splitlines()) == 1
