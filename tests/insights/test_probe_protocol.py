"""The default probe protocol on few and on many labels (issue 23, part 2).

Few: 60 tracks of real audio — the 12 shared clips cut into 5 consecutive 4 s segments each,
embedded through the embed job with the small golden model (one 4 s window per track) —
labelled by the game each clip comes from (3 classes, 30 / 15 / 15; majority 0.5). The default
probe must pick the linear model, report a cross-validated accuracy well above the majority class,
and agree within a few points with scikit-learn's own cross-validated L2 logistic regression on
the same standardised vectors.

Many: 6,000 synthetic labelled rows take the MLP path, evaluated on a held-out split.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lance
import numpy as np
import pytest
import soundfile as sf

from pipeline.insights.probes import ProbeSettings, train_probe
from tests.conftest import AUDIO
from tests.insights.conftest import embed, read_catalog
from tests.insights.test_probes import write_labels, write_store

SEGMENT_S, SEGMENTS = 4.0, 5


@pytest.fixture(scope="module")
def segment_store(ray_cluster, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(store, {track_id: game}) of the 60 segments."""
    root = tmp_path_factory.mktemp("probe_segments")
    (root / "audio").mkdir()
    rows, game = [], {}
    for r in read_catalog():
        x, sr = sf.read(str(AUDIO / r["uri"]), dtype="float32", always_2d=True)
        for k in range(SEGMENTS):
            tid = f"{r['track_id']}_s{k}"
            seg = x[int(k * SEGMENT_S * sr) : int((k + 1) * SEGMENT_S * sr)]
            sf.write(str(root / "audio" / f"{tid}.wav"), seg, sr)
            rows.append({"track_id": tid, "uri": f"{tid}.wav", "title": tid, "artist": r["artist"]})
            game[tid] = r["package"]
    with open(root / "audio" / "catalog.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["track_id", "uri", "title", "artist"])
        w.writeheader()
        w.writerows(rows)
    embed(root / "audio" / "catalog.csv", root / "store", window_s=SEGMENT_S, hop_s=SEGMENT_S)
    return root / "store", game


def sklearn_cv_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """scikit-learn's reference: standardise + LogisticRegressionCV (L2, balanced, C by inner
    5-fold CV), scored by an outer stratified 5-fold CV."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(Cs=[1e-3, 1e-2, 0.1, 1, 10, 100], class_weight="balanced", max_iter=500),
    )
    return float(cross_val_score(model, x, y, cv=StratifiedKFold(5, shuffle=True, random_state=0)).mean())


def test_sixty_labels_of_real_audio_use_the_linear_model(segment_store, tmp_path) -> None:
    store, game = segment_store
    lab = write_labels(tmp_path / "game.csv", {"track_id": list(game), "game": list(game.values())})
    probe = train_probe(
        str(store), str(lab), ProbeSettings(task="multiclass", layers=(1, 3)), str(tmp_path / "p")
    )
    c = probe.card
    assert c["estimator"] == "linear" and c["labelled_tracks"] == 60
    assert (
        c["evaluation"]["protocol"].startswith("5-fold cross-validation")
        and c["evaluation"]["scored_tracks"] == 60
    )
    acc, majority = c["metrics"]["accuracy"], c["metrics_majority"]["accuracy"]
    assert majority == 0.5
    assert acc >= majority + 0.25, c["metrics"]  # a clear margin
    lo, hi = c["metrics_ci95"]["accuracy"]
    assert majority < lo <= acc <= hi  # the interval excludes the majority class too

    t = lance.dataset(str(store / "tracks.lance")).to_table(columns=["track_id", "layer_1", "layer_3"])
    order = {tid: i for i, tid in enumerate(t["track_id"].to_pylist())}
    x = np.concatenate([np.stack(t[col].to_numpy(zero_copy_only=False)) for col in ("layer_1", "layer_3")], 1)
    x = x[[order[k] for k in game]]
    ref = sklearn_cv_accuracy(x, np.array(list(game.values())))
    assert abs(acc - ref) <= 0.07, (acc, ref)


def test_six_thousand_rows_use_the_mlp(tmp_path) -> None:
    n = 6000
    vecs = write_store(tmp_path, n, seed=3)
    proj = vecs[12] @ np.random.default_rng(1).standard_normal(vecs[12].shape[1])
    y = (proj > np.median(proj)).astype(int)  # two balanced classes
    ids = [f"t{i:05d}" for i in range(n)]
    lab = write_labels(tmp_path / "l.csv", {"track_id": ids, "side": [["a", "b"][v] for v in y]})
    probe = train_probe(
        str(tmp_path), str(lab), ProbeSettings(task="multiclass", layers=(6, 12), max_epochs=30)
    )
    c = probe.card
    assert c["estimator"] == "mlp" and c["head"] == "mlp" and c["epochs"] >= 1
    assert c["evaluation"]["protocol"].startswith("held-out stratified test split (1200 tracks)")
    assert c["splits"]["test"] == 1200 and sum(c["splits"].values()) == n and c["splits"]["val"] > 0
    assert c["metrics"]["accuracy"] >= 0.85 and c["metrics_majority"]["accuracy"] < 0.6, c["metrics"]


def test_single_example_class_kept_in_training_and_noted(tmp_path) -> None:
    n = 90
    write_store(tmp_path, n, seed=4)
    ids = [f"t{i:05d}" for i in range(n)]
    names = ["folk", "jazz", "rock"]
    labels = [names[i % 3] for i in range(n)]
    labels[0] = "polka"  # one track
    lab = write_labels(tmp_path / "l.csv", {"track_id": ids, "genre": labels})
    probe = train_probe(str(tmp_path), str(lab), ProbeSettings(task="multiclass", layers=(12,)))
    c = probe.card
    assert c["single_example_classes"] == {"polka": 1} and "polka" in c["labels"]
    assert "kept in training" in c["notes"][0]
    assert c["evaluation"]["scored_tracks"] == n - 1  # never in a test fold
    x12 = probe.predict(np.zeros((1, 1, 32), np.float32))
    assert x12.shape == (1, 4)
