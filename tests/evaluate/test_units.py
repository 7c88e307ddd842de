"""The evaluation's parts without Ray: the probe on features with a known answer, decoding and
scoring against mir_eval called directly, datasets (JAMS folder, catalog, mirdata layout), splits
and the one-line errors for bad annotations."""

from __future__ import annotations

import json
from pathlib import Path

import jams
import mir_eval
import numpy as np
import pytest
import soundfile as sf

from pipeline.evaluate.datasets import DatasetError, TaskMismatch, load_dataset
from pipeline.evaluate.harness import decode
from pipeline.evaluate.metrics import Prediction, Scores, bootstrap, paired_bootstrap, tagging_metrics
from pipeline.evaluate.probe import ProbeConfig, fit_layer_probes
from pipeline.evaluate.tasks import CHORD_VOCAB, Reference, chord_class, get_task, key_class, merge_frames
from pipeline.insights.probe_models import FittedProbe

# --------------------------------------------------------------------------- probe


def planted(n: int, seed: int, shuffle: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, 8) features, 4 classes: layer 1 holds the class (one-hot + small noise), layers 0
    and 2 pure noise; ``shuffle`` permutes the labels (no signal anywhere)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.standard_normal((n, 3, 8)).astype(np.float32)
    x[:, 1, :4] += 5 * np.eye(4, dtype=np.float32)[y]
    return x, (rng.permutation(y) if shuffle else y)


def test_probe_on_an_informative_layer_is_near_perfect_and_the_weights_find_it() -> None:
    xt, yt = planted(600, 0)
    xv, yv = planted(200, 1)
    xs, ys = planted(400, 2)
    probes = fit_layer_probes(
        xt, yt, xv, yv, "multiclass", 4, ProbeConfig(max_epochs=40, lr=1e-2, batch_size=64), (0, 1, 2)
    )
    acc = (probes.predict(xs).argmax(-1) == ys[:, None]).mean(0)  # per head
    assert probes.heads == ["layer_0", "layer_1", "layer_2", "weighted"]
    assert acc[1] > 0.97 and acc[3] > 0.97
    assert acc[0] < 0.4 and acc[2] < 0.4  # noise layers: chance is 0.25
    assert int(np.argmax(probes.layer_weights)) == 1
    # one probe implementation: the heads are a layer sweep of the shared trainer (fit_probe)
    assert isinstance(probes.probe, FittedProbe) and probes.probe.estimator == "mlp"
    assert probes.probe.state["head_layers"].tolist() == [0, 1, 2, -1]


def test_probe_on_shuffled_labels_is_near_chance() -> None:
    xt, yt = planted(600, 0, shuffle=True)
    xv, yv = planted(200, 1, shuffle=True)
    xs, ys = planted(2000, 2, shuffle=True)
    probes = fit_layer_probes(
        xt, yt, xv, yv, "multiclass", 4, ProbeConfig(max_epochs=40, lr=1e-2, batch_size=64)
    )
    acc = (probes.predict(xs).argmax(-1) == ys[:, None]).mean(0)
    assert np.all(np.abs(acc - 0.25) < 0.06), acc


def test_mlp_probe_learns_xor_a_linear_one_cannot() -> None:
    rng = np.random.default_rng(0)

    def xor(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.choice([-1.0, 1.0], (n, 1, 2)).astype(np.float32) + 0.1 * rng.standard_normal(
            (n, 1, 2)
        ).astype(np.float32)
        return x, (x[:, 0, 0] * x[:, 0, 1] > 0).astype(np.int64)

    (xt, yt), (xv, yv), (xs, ys) = xor(400), xor(100), xor(400)
    acc = {}
    for kind in ("linear", "mlp"):
        p = fit_layer_probes(
            xt,
            yt,
            xv,
            yv,
            "multiclass",
            2,
            ProbeConfig(kind=kind, hidden=32, max_epochs=60, lr=2e-2, batch_size=64),
        )
        acc[kind] = float((p.predict(xs)[:, 0].argmax(-1) == ys).mean())
    assert acc["mlp"] > 0.95 and acc["linear"] < 0.7, acc


def test_probe_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="linear or mlp"):
        ProbeConfig(kind="svm")


# --------------------------------------------------------------------------- decoding and metrics


def test_beat_decoding_picks_peaks_and_scores_like_mir_eval() -> None:
    task = get_task("beat")
    hz = 50.0
    times = (np.arange(400) + 0.5) / hz
    ref = np.arange(0.5, 7.9, 0.5)
    prob = np.zeros((400, 1))
    for b in ref[:-3]:  # three beats missed
        prob[int(b * hz), 0] = 0.9
    pred = decode(task, prob, times, ("beat",), 0.5)
    assert len(pred.events) == len(ref) - 3
    s = Scores(task, [Reference(beats=ref)], [pred])
    assert s.value()["f_measure"] == pytest.approx(mir_eval.beat.f_measure(ref, pred.events))
    assert 0.8 < s.value()["f_measure"] < 0.95


def test_chord_frames_merge_into_intervals_scored_by_mir_eval() -> None:
    task = get_task("chord")
    hz = 16.0
    times = (np.arange(64) + 0.5) / hz  # 4 s
    classes = np.array([chord_class("C:maj")] * 32 + [chord_class("A:min")] * 32)
    iv, labels = merge_frames(classes, times, hz, CHORD_VOCAB)
    assert labels == ["C:maj", "A:min"] and np.allclose(iv, [[0, 2], [2, 4]])
    ref = Reference(
        intervals=np.array([[0, 2.0], [2.0, 3.0], [3.0, 4.0]]), labels=("C:maj7", "A:min", "F:maj")
    )
    probs = np.eye(len(CHORD_VOCAB))[classes]
    pred = decode(task, probs, times, CHORD_VOCAB, 0.5)
    got = Scores(task, [ref], [pred]).value()
    want = mir_eval.chord.evaluate(ref.intervals, list(ref.labels), pred.intervals, list(pred.labels))
    assert got["majmin"] == pytest.approx(want["majmin"]) and got["mirex"] == pytest.approx(want["mirex"])
    assert got["majmin"] == pytest.approx(0.75)  # C:maj7 reduces to C:maj; F:maj missed


def test_key_classes_and_weighted_score() -> None:
    assert key_class("C major") == 0 and key_class("A:minor") == 21 and key_class("Bb major") == 10
    task = get_task("key")
    refs = [Reference(key="C major"), Reference(key="A minor")]
    preds = [Prediction(key="G major"), Prediction(key="A minor")]  # fifth error = 0.5
    assert Scores(task, refs, preds).value()["weighted_score"] == pytest.approx(0.75)


def test_tagging_metrics_and_bootstrap_intervals() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 3))
    good = y + 0.3 * rng.standard_normal(y.shape)
    m = tagging_metrics(y, good)
    assert m["roc_auc"] > 0.9 and m["average_precision"] > 0.9
    task = get_task("tagging")
    names = ("a", "b", "c")
    refs = [Reference(tags=tuple(n for n, v in zip(names, row, strict=True) if v)) for row in y]
    mk = lambda s: [Prediction(scores=r, tag_names=names) for r in s]  # noqa: E731
    sa, sb = Scores(task, refs, mk(good)), Scores(task, refs, mk(rng.random(y.shape)))
    ci = bootstrap(sa.value, sa.n, 200)
    assert ci["roc_auc"][0] < m["roc_auc"] < ci["roc_auc"][1]
    cmp = paired_bootstrap(sa, sb, 200)
    assert cmp["roc_auc"]["ci"][0] > 0.3 and cmp["roc_auc"]["p_a_better"] == 1.0


# --------------------------------------------------------------------------- datasets


def write_track(
    folder: Path, name: str, annotations: dict | None, seconds: float = 1.0, split: str | None = None
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sf.write(str(folder / f"{name}.wav"), np.zeros(int(seconds * 24000), np.float32), 24000)
    if annotations is None:
        return
    jam = jams.JAMS()
    jam.file_metadata.duration = seconds
    for ns, obs in annotations.items():
        ann = jams.Annotation(ns)
        for t, d, v in obs:
            ann.append(time=t, duration=d, value=v)
        jam.annotations.append(ann)
    if split:
        jam.sandbox.split = split
    jam.save(str(folder / f"{name}.jams"))


def genre_folder(root: Path, n: int = 12, split: bool = False) -> Path:
    for i in range(n):
        s = (["train"] * 8 + ["valid"] * 2 + ["test"] * 2)[i] if split else None
        write_track(root, f"t{i:02d}", {"tag_open": [(0.0, 1.0, ["rock", "jazz", "folk"][i % 3])]}, split=s)
    return root


def test_seeded_split_is_stratified_recorded_and_reproducible(tmp_path: Path) -> None:
    task = get_task("genre")
    a = load_dataset(str(genre_folder(tmp_path / "g", 30)), task, seed=3)
    b = load_dataset(str(tmp_path / "g"), task, seed=3)
    assert [t.split for t in a.tracks] == [t.split for t in b.tracks]
    assert a.split_info["source"] == "seeded" and a.split_info["stratified"] and a.split_info["seed"] == 3
    assert a.split_info["sizes"] == {"train": 22, "valid": 4, "test": 4}
    for g in ("rock", "jazz", "folk"):  # every genre in train and in test
        assert {t.split for t in a.tracks if t.ref.tags == (g,)} >= {"train", "test"}


def test_official_split_from_jams_sandbox(tmp_path: Path) -> None:
    ds = load_dataset(str(genre_folder(tmp_path / "g", split=True)), get_task("genre"))
    assert ds.split_info["source"] == "official"
    assert [t.split for t in ds.tracks] == ["train"] * 8 + ["valid"] * 2 + ["test"] * 2


def test_missing_and_malformed_annotations_name_the_file(tmp_path: Path) -> None:
    root = genre_folder(tmp_path / "g")
    write_track(root, "orphan", None)
    with pytest.raises(DatasetError, match=r"missing annotation .*orphan\.jams"):
        load_dataset(str(root), get_task("genre"))
    (root / "orphan.jams").write_text("{not json")
    with pytest.raises(DatasetError, match=r"malformed annotation .*orphan\.jams") as e:
        load_dataset(str(root), get_task("genre"))
    assert "\n" not in str(e.value)


def test_a_task_the_annotations_do_not_hold_is_refused(tmp_path: Path) -> None:
    root = genre_folder(tmp_path / "g")
    with pytest.raises(TaskMismatch, match="no beat annotation for task beat"):
        load_dataset(str(root), get_task("beat"))
    cat = tmp_path / "cat.csv"
    cat.write_text("uri,genre\ng/t00.wav,rock\n")
    with pytest.raises(TaskMismatch, match="needs timed annotations"):
        load_dataset(str(cat), get_task("chord"))
    with pytest.raises(TaskMismatch, match="needs columns uri and key"):
        load_dataset(str(cat), get_task("key"))


def test_catalog_with_tags_and_a_split_column(tmp_path: Path) -> None:
    genre_folder(tmp_path / "g")
    rows = ["uri,tags,split"] + [
        f"g/t{i:02d}.wav,{'a|b' if i % 2 else 'b'},{'test' if i > 9 else 'train'}" for i in range(12)
    ]
    (tmp_path / "cat.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(str(tmp_path / "cat.csv"), get_task("tagging"))
    assert ds.tracks[1].ref.tags == ("a", "b") and ds.tracks[0].track_id == "t00"
    assert ds.split_info["source"] == "official" and ds.split_info["valid_carved_from_train"]
    assert ds.split_info["sizes"]["test"] == 2 and ds.split_info["sizes"]["valid"] >= 1


def beatles_home(root: Path, n: int = 6) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny dataset in mirdata's Beatles layout: its index (placed in the data home), audio,
    and Isophonics-format beat / chord / key / section files; plus one indexed track without
    audio (left out, counted)."""
    tracks, beats = {}, {}
    for i in range(n + 1):
        tid = f"00{i}"
        rel = {"audio": f"audio/01_-_Album/{i:02d}_-_Song.wav", "beat": f"annotations/beat/The Beatles/01_-_Album/{i:02d}_-_Song.txt",
               "chords": f"annotations/chordlab/The Beatles/01_-_Album/{i:02d}_-_Song.lab",
               "keys": f"annotations/keylab/The Beatles/01_-_Album/{i:02d}_-_Song.lab",
               "sections": f"annotations/seglab/The Beatles/01_-_Album/{i:02d}_-_Song.lab"}  # fmt: skip
        tracks[tid] = {k: [v, None] for k, v in rel.items()}
        if i == n:
            continue  # indexed, but its audio is not here
        for v in rel.values():
            (root / v).parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(root / rel["audio"]), np.zeros(24000, np.float32), 24000)
        b = np.round(np.arange(0.1 + 0.01 * i, 4.0, 0.5), 3)
        beats[tid] = b
        (root / rel["beat"]).write_text("".join(f"{t:.3f}\t{k % 4 + 1}\n" for k, t in enumerate(b)))
        (root / rel["chords"]).write_text("0.0 2.0 C\n2.0 4.0 A:min\n")
        (root / rel["keys"]).write_text("0.0\t4.0\tKey\tC\n")
        (root / rel["sections"]).write_text("0.0\t2.0\tverse\tverse\n2.0\t4.0\tchorus\tchorus\n")
    (root / "beatles_index_1.2.json").write_text(json.dumps({"version": "1.2", "tracks": tracks}))
    return root, beats


def test_mirdata_layout_dataset(tmp_path: Path) -> None:
    home, beats = beatles_home(tmp_path / "beatles")
    ds = load_dataset("beatles", get_task("downbeat"), data_home=str(home))
    assert ds.absent == 1 and len(ds.tracks) == 6 and ds.split_info["source"] == "seeded"
    t = ds.tracks[0]
    np.testing.assert_allclose(t.ref.beats, beats[t.track_id])
    assert list(t.ref.positions[:5]) == [1, 2, 3, 4, 1]
    chords = load_dataset("beatles", get_task("chord"), data_home=str(home)).tracks[0].ref
    assert chords.labels == ("C", "A:min")
    assert load_dataset("beatles", get_task("key"), data_home=str(home)).tracks[0].ref.key == "C major"
    with pytest.raises(TaskMismatch, match="no genre annotations"):
        load_dataset("beatles", get_task("genre"), data_home=str(home))
    (home / "annotations/beat/The Beatles/01_-_Album/02_-_Song.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing annotation .*02_-_Song\.txt"):
        load_dataset("beatles", get_task("beat"), data_home=str(home))
    with pytest.raises(DatasetError, match="needs --data-home"):
        load_dataset("beatles", get_task("beat"))


def test_finetune_mode_is_for_track_labels_and_says_so_in_one_line(tmp_path, capsys) -> None:
    from pipeline.commands.evaluate import evaluate_main

    data = genre_folder(tmp_path / "g")
    argv = ["--task", "beat", "--dataset", str(data), "--checkpoint", "random:0", "--mode", "finetune",
            "--output", str(tmp_path / "o")]  # fmt: skip
    assert evaluate_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == "evaluate: error: --mode finetune trains on track labels: --task genre or key, not beat"


def test_layer_ranges() -> None:
    from pipeline.commands.evaluate import layer_range

    assert layer_range("0-3,7") == (0, 1, 2, 3, 7) and layer_range("12") == (12,)
    with pytest.raises(Exception, match="distinct"):
        layer_range("1,1")
