"""Probes through ``train_probe``: synthetic tasks with known answers (the label is a function of
the stored vectors), real clips labelled by the game they come from, save/reload, labels files,
wrong model refused. The estimators themselves: test_probe_models.py; few vs many labels on real
audio: test_probe_protocol.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.commands.insights import predict_main, train_probe_main
from pipeline.insights.predict import ProbeMismatchError, predict_store
from pipeline.insights.probes import (
    LabelError,
    Probe,
    ProbeSettings,
    load_labels,
    read_features,
    train_probe,
    train_threads,
)
from pipeline.search.synthetic import tracks_table
from tests.insights.conftest import read_catalog, read_variants

DIM = 32


N = 400
CLASSES = ("folk", "jazz", "rock")


def write_store(
    root: Path, n: int, seed: int = 0, model_id: str = "musicfm-synthetic"
) -> dict[int, np.ndarray]:
    """``n`` tracks: layer 12 drawn around 3 centres (track ``i`` around centre ``i % 3``, noise of
    the centres' size), layer 6 pure noise (no label signal)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, DIM)).astype(np.float32)
    l12 = centres[np.arange(n) % 3] + rng.standard_normal((n, DIM)).astype(np.float32)
    vecs = {6: rng.standard_normal((n, DIM)).astype(np.float32), 12: l12}
    ids = [f"t{i:05d}" for i in range(n)]
    meta = {"title": [f"T{i}" for i in range(n)], "artist": ["A"] * n, "genre": ["g"] * n}
    lance.write_dataset(
        tracks_table(ids, vecs, meta, model_id=model_id), str(root / "tracks.lance"), mode="overwrite"
    )
    return vecs


def write_labels(path: Path, columns: dict[str, list]) -> Path:
    t = pa.table(columns)
    if path.suffix == ".parquet":
        pq.write_table(t, path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in t.to_pylist()))
    else:
        import pyarrow.csv as pcsv

        pcsv.write_csv(t, path)
    return path


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_store")
    vecs = write_store(root, N)
    return root, vecs


def ids(n: int) -> list[str]:
    return [f"t{i:05d}" for i in range(n)]


@pytest.mark.parametrize("estimator", ["auto", "mlp"])
def test_multiclass_known_answer_and_layer_weights(syn, tmp_path, estimator) -> None:
    """Class = the centre a track was drawn around (layer 12); layer 6 is noise: the probe must
    reach high accuracy and put most of its layer weight on layer 12. 400 labels: below the
    linear threshold, so the metric is cross-validated whichever estimator is forced."""
    root, vecs = syn
    names = np.array(CLASSES)[np.arange(N) % 3]
    lab = write_labels(tmp_path / "genre.csv", {"track_id": ids(N), "genre": names.tolist()})
    probe = train_probe(
        str(root),
        str(lab),
        ProbeSettings(task="multiclass", layers=(6, 12), estimator=estimator, max_epochs=40),
        str(tmp_path / "p"),
    )
    c = probe.card
    assert c["estimator"] == ("linear" if estimator == "auto" else "mlp")
    assert c["metrics"]["accuracy"] >= 0.9 and c["metrics"]["macro_f1"] >= 0.9, c["metrics"]
    lo, hi = c["metrics_ci95"]["accuracy"]
    assert lo <= c["metrics"]["accuracy"] <= hi and hi - lo < 0.1
    assert c["metrics_majority"]["accuracy"] == pytest.approx(1 / 3, abs=0.01)
    assert c["evaluation"]["protocol"].startswith("5-fold cross-validation")
    assert c["evaluation"]["scored_tracks"] == N and len(c["evaluation"]["fold_metrics"]) == 5
    assert c["layer_weights"]["12"] > c["layer_weights"]["6"]
    assert c["labels"] == ["folk", "jazz", "rock"] and c["name"] == "genre"
    assert c["splits"] == {"train": N, "val": 0, "test": 0} and c["labelled_tracks"] == N
    assert c["model_id"] == "musicfm-synthetic" and c["settings_id"] == "s-synthetic"
    assert c["threads"] == 1 and 0 < c["fit_s"] <= c["train_s"]  # a small set trains on one thread
    assert (c["strength"] is not None) == (estimator == "auto") and (c["epochs"] is None) == (
        estimator == "auto"
    )


def test_train_threads() -> None:
    import torch

    assert train_threads(3, 10**9) == 3  # explicit
    assert train_threads(None, 1_000) == 1  # small steps
    assert 1 <= train_threads(None, 10**9) <= torch.get_num_threads()


def test_random_labels_stay_at_chance(syn, tmp_path) -> None:
    root, _ = syn
    y = np.random.default_rng(7).integers(0, 2, N)
    lab = write_labels(tmp_path / "coin.csv", {"track_id": ids(N), "coin": [str(v) for v in y]})
    probe = train_probe(str(root), str(lab), ProbeSettings(task="multiclass", layers=(6, 12)))
    c = probe.card
    assert 0.4 <= c["metrics"]["accuracy"] <= 0.6
    lo, hi = c["metrics_ci95"]["accuracy"]
    assert lo <= 0.5 <= hi + 0.02  # the interval does not claim skill


def test_multilabel_known_answer(syn, tmp_path) -> None:
    root, vecs = syn
    w = np.random.default_rng(2).standard_normal((DIM, 3))
    on = vecs[12] @ w > 0.0
    tags = ["|".join(t for t, o in zip(("happy", "sad", "calm"), row, strict=True) if o) for row in on]
    lab = write_labels(tmp_path / "mood.jsonl", {"track_id": ids(N), "mood": tags})
    probe = train_probe(str(root), str(lab), ProbeSettings(task="multilabel", layers=(6, 12)))
    m = probe.card["metrics"]
    assert m["roc_auc"] >= 0.9 and m["average_precision"] >= 0.85 and m["labels_scored"] == 3, m
    assert probe.card["labels"] == ["calm", "happy", "sad"]


def test_regression_known_answer(syn, tmp_path) -> None:
    root, vecs = syn
    w = np.random.default_rng(3).standard_normal(DIM)
    y = vecs[12] @ w * 10 + 120 + np.random.default_rng(4).normal(0, 1, N)
    lab = write_labels(tmp_path / "bpm.parquet", {"track_id": ids(N), "bpm": y.tolist()})
    probe = train_probe(str(root), str(lab), ProbeSettings(task="regression", layers=(12,)))
    assert probe.card["metrics"]["r2"] >= 0.9 and probe.card["estimator"] == "linear"
    pred = probe.predict(np.stack([vecs[12][:50]], 1))
    assert np.mean(np.abs(pred[:, 0] - y[:50])) < 0.3 * np.std(y)


@pytest.mark.parametrize("estimator", ["linear", "mlp"])
def test_probe_reloaded_from_disk_predicts_the_same(syn, tmp_path, estimator) -> None:
    root, vecs = syn
    y = (vecs[12][:, 0] > 0).astype(int)
    lab = write_labels(tmp_path / "l.csv", {"track_id": ids(N), "side": [["left", "right"][v] for v in y]})
    probe = train_probe(
        str(root), str(lab), ProbeSettings(task="multiclass", layers=(6, 12), estimator=estimator,
                                           max_epochs=20), str(tmp_path / "p")
    )  # fmt: skip
    again = Probe.load(str(tmp_path / "p"))
    x = read_features(str(root), [6, 12]).x
    assert np.array_equal(probe.predict(x), again.predict(x))
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["probe.json", "probe.safetensors"]
    card = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert card["layers"] == [6, 12] and card["estimator"] == again.model.estimator == estimator


def test_labels_file_errors(tmp_path) -> None:
    with pytest.raises(LabelError, match="no track_id column"):
        load_labels(str(write_labels(tmp_path / "a.csv", {"id": ["x"], "g": ["y"]})), "multiclass")
    with pytest.raises(LabelError, match="at least 2 classes"):
        load_labels(
            str(write_labels(tmp_path / "b.csv", {"track_id": ["x", "y"], "g": ["z", "z"]})), "multiclass"
        )
    with pytest.raises(LabelError, match="not numeric"):
        load_labels(str(write_labels(tmp_path / "c.csv", {"track_id": ["x"], "g": ["z"]})), "regression")
    lab = load_labels(
        str(write_labels(tmp_path / "d.parquet", {"track_id": ["x", "y"], "a": [1, 0], "b": [1, 1]})),
        "multilabel",
    )
    assert lab.labels == ["a", "b"] and lab.y.tolist() == [[1, 1], [0, 1]]


def test_wrong_model_refused_with_one_line(syn, tmp_path) -> None:
    root, vecs = syn
    lab = write_labels(
        tmp_path / "l.csv", {"track_id": ids(N), "side": [["l", "r"][int(v)] for v in (vecs[12][:, 0] > 0)]}
    )
    train_probe(
        str(root),
        str(lab),
        ProbeSettings(task="multiclass", layers=(6, 12), max_epochs=3),
        str(tmp_path / "p"),
    )
    other = tmp_path / "other"
    write_store(other, 50, model_id="musicfm-other")
    with pytest.raises(
        ProbeMismatchError, match="trained on model musicfm-synthetic .* holds model musicfm-other"
    ):
        predict_store(str(other), str(tmp_path / "p"))
    err = io.StringIO()
    assert predict_main(["--store", str(other), "--probe", str(tmp_path / "p")], err=err) == 2
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith(
        "predict: error: probe side was trained"
    )
    assert "tag_side" not in lance.dataset(str(other / "tracks.lance")).schema.names  # nothing written


def test_train_probe_cli(syn, tmp_path) -> None:
    root, vecs = syn
    lab = write_labels(tmp_path / "l.csv", {"track_id": ids(N), "side": [CLASSES[i % 3] for i in range(N)]})
    out = io.StringIO()
    argv = ["--store", str(root), "--labels", str(lab), "--layers", "6,12", "--task", "multiclass", "--out",
            str(tmp_path / "p"), "--estimator", "mlp", "--head", "linear", "--max-epochs", "30", "--json"]  # fmt: skip
    assert train_probe_main(argv, out=out) == 0
    card = json.loads(out.getvalue())
    assert card["estimator"] == "mlp" and card["hidden"] == 0  # Adam linear head, 30 epochs: weaker
    assert card["metrics"]["accuracy"] > card["metrics_majority"]["accuracy"] + 0.2
    assert card["summary"].startswith(f"probe side (multiclass, mlp, track level, {N} labelled tracks)")
    assert "5-fold cross-validation" in card["summary"] and "majority class: accuracy 0.33" in card["summary"]
    err = io.StringIO()
    assert train_probe_main([*argv[:-1], "--layers", "6,7"], err=err) == 2
    assert err.getvalue().startswith("train_probe: error: layer 7 is not in tracks.lance")


# --------------------------------------------------------------------------- real clips


@pytest.mark.parametrize("level", ["track", "window"])
def test_real_clips_labelled_by_game(clip_store, tmp_path, level) -> None:
    """Labels: the Debian package (game) each clip comes from. The copies are not labelled: the
    probe must give each shared variant the label it gives its source."""
    store, _ = clip_store
    pkg = {r["track_id"]: r["package"] for r in read_catalog()}
    lab = write_labels(tmp_path / "pkg.csv", {"track_id": list(pkg), "game": list(pkg.values())})
    probe = train_probe(str(store), str(lab), ProbeSettings(task="multiclass", layers=(1, 3), level=level, max_epochs=100),
                        str(tmp_path / "p"))  # fmt: skip
    c = probe.card
    assert c["splits"] == {"train": 12, "val": 0, "test": 0} and c["level"] == level
    assert c["estimator"] == "linear" and c["evaluation"]["scored_tracks"] == 12
    assert c["metrics_train"]["accuracy"] > c["metrics_majority"]["accuracy"] == 0.5  # 6 of 12: hedgewars
    assert set(c["metrics"]) == {"accuracy", "macro_f1"}
    if level == "window":
        assert c["rows"]["train"] > c["splits"]["train"]  # every window of a labelled track
    rep = predict_store(str(store), str(tmp_path / "p"))
    assert rep.rows == 18 and rep.columns == ["tag_game", "tag_game_score"]
    t = {r["track_id"]: r for r in lance.dataset(str(store / "tracks.lance")).to_table().to_pylist()}
    for v in read_variants():
        copy = Path(v["variant_uri"]).stem
        assert t[copy]["tag_game"] == t[v["source_track_id"]]["tag_game"], copy
    assert all(t[k]["tag_game"] in set(pkg.values()) and 0 < t[k]["tag_game_score"] <= 1 for k in t)
