"""Predictions written into tracks columns, then used by search filters (jobs/search.py --where)."""

from __future__ import annotations

import io
import json

import lance
import numpy as np
import pytest

from jobs.search import main as search_main
from pipeline.insights.predict import predict_store
from pipeline.insights.probes import ProbeSettings, train_probe
from tests.insights.test_probes import CLASSES, write_labels, write_store


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """A store of 600 tracks whose layer-12 vectors are drawn around 3 centres (track i around
    centre i % 3), a multiclass probe learnt from the first half's centre names and a
    multilabel probe (signs of two coordinates), both predicted into tracks."""
    root = tmp_path_factory.mktemp("tagged")
    vecs = write_store(root, 600, seed=5)
    tids = [f"t{i:05d}" for i in range(600)]
    names = np.array(CLASSES)[np.arange(600) % 3]
    labels = write_labels(root / "genre.csv", {"track_id": tids[:300], "tag": names[:300].tolist()})
    p1 = train_probe(str(root), str(labels), ProbeSettings(task="multiclass", layers=(12,), head="linear"),
                     str(root / "p_genre"), name="genre")  # fmt: skip
    x = vecs[12]
    moods = ["|".join(m for m, on in (("up", x[i, 1] > 0), ("down", x[i, 2] > 0)) if on) for i in range(600)]
    ml = write_labels(root / "mood.csv", {"track_id": tids, "mood": moods})
    train_probe(
        str(root),
        str(ml),
        ProbeSettings(task="multilabel", layers=(12,), head="linear"),
        str(root / "p_mood"),
    )
    predict_store(str(root), str(root / "p_genre"))
    predict_store(str(root), str(root / "p_mood"))
    assert p1.card["metrics"]["accuracy"] > 0.9
    return root, tids, names


def test_columns_written_for_every_track(tagged) -> None:
    root, tids, names = tagged
    t = lance.dataset(str(root / "tracks.lance")).to_table()
    assert {"tag_genre", "tag_genre_score", "tag_mood", "tag_mood_scores"} <= set(t.column_names)
    assert t.num_rows == 600 and t["tag_genre"].null_count == 0
    agree = np.mean(
        np.array(t["tag_genre"].to_pylist()) == names[[tids.index(i) for i in t["track_id"].to_pylist()]]
    )
    assert agree > 0.9  # unlabelled half included
    assert all(len(s) == 2 for s in t["tag_mood_scores"].to_pylist())


def test_search_where_filters_on_predictions(tagged, capsys) -> None:
    root, _, _ = tagged
    assert search_main(["--store", str(root), "--track-id", "t00001", "--layer", "12", "-k", "20",
                        "--where", "tag_genre = 'jazz' AND tag_genre_score > 0.6", "--json"]) == 0  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert len(res["hits"]) == 20
    assert all(
        h["metadata"]["tag_genre"] == "jazz" and h["metadata"]["tag_genre_score"] > 0.6 for h in res["hits"]
    )
    assert search_main(["--store", str(root), "--track-id", "t00001", "--layer", "12", "-k", "5",
                        "--where", "array_has(tag_mood, 'up')", "--json"]) == 0  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert res["hits"] and all("up" in h["metadata"]["tag_mood"] for h in res["hits"])


def test_predict_again_updates_in_place_and_run_filter(tagged) -> None:
    root, _, _ = tagged
    v0 = lance.dataset(str(root / "tracks.lance")).version
    before = (
        lance.dataset(str(root / "tracks.lance"))
        .to_table(columns=["track_id", "tag_genre"])
        .sort_by("track_id")
    )
    rep = predict_store(str(root), str(root / "p_genre"))
    after = (
        lance.dataset(str(root / "tracks.lance"))
        .to_table(columns=["track_id", "tag_genre"])
        .sort_by("track_id")
    )
    assert rep.rows == 600 and rep.version == v0 + 1 and before.equals(after)
    assert predict_store(str(root), str(root / "p_genre"), run_id="no-such-run").rows == 0


def test_predict_with_ray_tasks_gives_the_same_columns(tagged, ray_cluster) -> None:
    root, _, _ = tagged
    before = (
        lance.dataset(str(root / "tracks.lance"))
        .to_table(columns=["track_id", "tag_genre_score"])
        .sort_by("track_id")
    )
    rep = predict_store(str(root), str(root / "p_genre"), use_ray=True)
    after = (
        lance.dataset(str(root / "tracks.lance"))
        .to_table(columns=["track_id", "tag_genre_score"])
        .sort_by("track_id")
    )
    assert rep.ray and rep.rows == 600
    assert np.allclose(before["tag_genre_score"].to_numpy(), after["tag_genre_score"].to_numpy(), atol=1e-6)


def test_predict_cli_one_line_errors(tagged) -> None:
    from pipeline.commands.insights import predict_main

    root, _, _ = tagged
    err = io.StringIO()
    assert predict_main(["--store", str(root), "--probe", str(root / "nope")], err=err) == 2
    assert (
        err.getvalue().startswith("predict: error: cannot load the probe") and err.getvalue().count("\n") == 1
    )
