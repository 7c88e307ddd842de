"""jobs/evaluate.py and jobs/compare_models.py end to end on rendered MIDI (real instrument samples
through fluidsynth), with the small random-weight golden model embedded by the real embed job
(Ray, Lance): scores equal mir_eval / scikit-learn called directly on the saved JAMS predictions,
a store holding the task's profile is reused, unreadable audio becomes an error row, runs are
recorded with kind "evaluate", and a comparison gives a paired interval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jams
import lance
import mir_eval
import numpy as np
import pytest

from pipeline.commands.evaluate import compare_main, evaluate_main
from pipeline.evaluate.metrics import read_jams_prediction, tagging_metrics
from pipeline.evaluate.tasks import get_task
from tests.evaluate.conftest import MODEL_ARGS, PROBE_ARGS
from tests.evaluate.test_units import genre_folder


def run(argv: list[str]) -> dict:
    out = Path(argv[argv.index("--output") + 1])
    assert evaluate_main(argv + PROBE_ARGS) == 0
    res = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().count("|") > 10 and (
        out / f"{res['task']}_layers.png"
    ).stat().st_size > 1000
    return res


def source_annotation(folder: Path, track_id: str, namespace: str) -> jams.Annotation:
    """The reference as written by the renderer, read with jams directly (not our loader)."""
    jam = jams.load(str(folder / f"{track_id}.jams"), validate=False)
    return jam.search(namespace=namespace)[0]


def saved(out: Path, head: str, track_id: str, task: str):
    return read_jams_prediction(str(out / "predictions" / head / f"{track_id}.jams"), get_task(task))


def runs_of(store: Path, kind: str) -> list[dict]:
    rows = lance.dataset(str(store / "runs.lance")).to_table().to_pylist()
    return [r for r in rows if r["kind"] == kind]


def test_beat_and_downbeat_scores_are_mir_eval_on_the_saved_predictions(
    ray_cluster, drums: Path, tmp_path: Path
) -> None:
    data = tmp_path / "drums"
    shutil.copytree(drums, data)
    (data / "zz_broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    shutil.copy(data / "drums_00.jams", data / "zz_broken.jams")
    out = tmp_path / "beat"
    res = run(["--task", "beat", "--dataset", str(data), *MODEL_ARGS, "--output", str(out)])
    assert res["model_id"].startswith("musicfm-") and res["profile"] == {
        "window_s": 6.0,
        "frames_hz": 50.0,
        "level": "frame",
    }
    assert [e["track_id"] for e in res["error_rows"]] == ["zz_broken"]  # unreadable audio: an error row
    assert set(res["layers"]) == {"layer_0", "layer_1", "layer_2", "layer_3", "weighted"}
    for head, m in res["layers"].items():
        f = [mir_eval.beat.f_measure(source_annotation(data, t, "beat").to_event_values()[0],
                                     saved(out, head, t, "beat").events, 0.07) for t in res["test_tracks"]]  # fmt: skip
        assert m["metrics"]["f_measure"] == pytest.approx(np.mean(f))
        assert m["ci95"]["f_measure"][0] <= m["metrics"]["f_measure"] <= m["ci95"]["f_measure"][1]
    best = res["layers"][res["best_layer"]]["metrics"]["f_measure"]
    assert best > 0.5, res["layers"]  # drums at known tempi: onsets are in the features
    store = out / "features"
    assert len(runs_of(store, "evaluate")) == 1 and len(runs_of(store, "embed")) == 1
    # downbeat from the same store (same profile): reused as it is, nothing embedded again
    out2 = tmp_path / "downbeat"
    res2 = run(["--task", "downbeat", "--dataset", str(data), "--store", str(store), "--output", str(out2)])
    assert len(runs_of(store, "embed")) == 1 and len(runs_of(store, "evaluate")) == 2
    # the same model again into the same store: the embed job finds every track already there
    res3 = run(
        ["--task", "beat", "--dataset", str(data), *MODEL_ARGS, "--output", str(out), "--max-epochs", "2"]
    )
    assert (
        res3["settings"]["embed"]["tracks_embedded"] == 0
        and res3["settings"]["embed"]["already_stored"] == 12
    )
    assert res3["settings_id"] == res["settings_id"]
    per = [mir_eval.beat.f_measure(np.array([o.time for o in source_annotation(data, x, "beat").data if o.value == 1]),
                                   saved(out2, "layer_1", x, "downbeat").events, 0.07) for x in res2["test_tracks"]]  # fmt: skip
    assert res2["layers"]["layer_1"]["metrics"]["f_measure"] == pytest.approx(np.mean(per))


def test_chord_and_key_on_triad_progressions(ray_cluster, triads: Path, tmp_path: Path) -> None:
    out = tmp_path / "chord"
    res = run(
        ["--task", "chord", "--dataset", str(triads), *MODEL_ARGS, "--layers", "0,3", "--output", str(out)]
    )
    assert set(res["layers"]) == {"layer_0", "layer_3", "weighted"}
    for head, m in res["layers"].items():
        got = {"majmin": [], "mirex": []}
        for t in res["test_tracks"]:
            iv, labels = source_annotation(triads, t, "chord").to_interval_values()
            p = saved(out, head, t, "chord")
            s = mir_eval.chord.evaluate(np.asarray(iv), labels, p.intervals, list(p.labels))
            got["majmin"].append(s["majmin"])
            got["mirex"].append(s["mirex"])
        assert m["metrics"]["majmin"] == pytest.approx(np.mean(got["majmin"]))
        assert m["metrics"]["mirex"] == pytest.approx(np.mean(got["mirex"]))
    # key: track-level, 12 s windows; the chord store (12 s windows) serves it as it is
    out2 = tmp_path / "key"
    res2 = run(
        ["--task", "key", "--dataset", str(triads), "--store", str(out / "features"), "--output", str(out2)]
    )
    for head, m in res2["layers"].items():
        w = [mir_eval.key.weighted_score(source_annotation(triads, t, "key_mode").data[0].value.replace(":", " "),
                                         saved(out2, head, t, "key").key) for t in res2["test_tracks"]]  # fmt: skip
        assert m["metrics"]["weighted_score"] == pytest.approx(np.mean(w))


def test_structure_boundaries_on_sections_of_different_instruments(
    ray_cluster, sections: Path, tmp_path: Path
) -> None:
    out = tmp_path / "structure"
    res = run(
        [
            "--task",
            "structure",
            "--dataset",
            str(sections),
            *MODEL_ARGS,
            "--layers",
            "1,3",
            "--output",
            str(out),
        ]
    )
    for head, m in res["layers"].items():
        for window, key in ((0.5, "hr_0.5"), (3.0, "hr_3")):
            f = [mir_eval.segment.detection(np.asarray(source_annotation(sections, t, "segment_open").to_interval_values()[0]),
                                            saved(out, head, t, "structure").intervals, window=window, trim=False)[2]
                 for t in res["test_tracks"]]  # fmt: skip
            assert m["metrics"][key] == pytest.approx(np.mean(f))


def test_genre_tagging_and_a_paired_comparison_of_two_models(
    ray_cluster, timbre: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, tags_csv = timbre
    out = tmp_path / "cmp"
    model = MODEL_ARGS[2:]  # --stats, --model-config, --precision (both models are golden-sized)
    argv = ["--task", "genre", "--dataset", str(folder), "--a", str(MODEL_ARGS[1]), "--b", "random:1", *model,
            "--output", str(out), *PROBE_ARGS]  # fmt: skip
    assert compare_main(argv) == 0
    cmp = json.loads((out / "compare.json").read_text())
    assert cmp["a"]["model_id"] != cmp["b"]["model_id"] and cmp["b"]["model_id"].startswith("random-")
    for head, m in cmp["layers"].items():
        d = m["accuracy"]
        assert d["ci"][0] <= d["diff"] <= d["ci"][1] and d["diff"] == pytest.approx(d["a"] - d["b"])
        assert head in cmp["verdict"] and "95% CI" in cmp["verdict"][head]
    res_a = json.loads((out / "a" / "results.json").read_text())
    for head, m in res_a["layers"].items():
        acc = [saved(out / "a", head, t, "genre").tag_names[int(np.argmax(saved(out / "a", head, t, "genre").scores))]
               == source_annotation(folder, t, "tag_open").data[0].value for t in res_a["test_tracks"]]  # fmt: skip
        assert m["metrics"]["accuracy"] == pytest.approx(np.mean(acc))
        assert cmp["layers"][head]["accuracy"]["a"] == pytest.approx(m["metrics"]["accuracy"])
    # tagging from a catalog with a tags column, on model a's store (same 29.1 s profile)
    res = run(["--task", "tagging", "--dataset", str(tags_csv), "--store", str(out / "a" / "features"),
               "--output", str(tmp_path / "tagging")])  # fmt: skip
    truth = {r.split(",")[0]: r.split(",")[2].split("|") for r in tags_csv.read_text().splitlines()[1:]}
    for head, m in res["layers"].items():
        preds = [saved(tmp_path / "tagging", head, t, "tagging") for t in res["test_tracks"]]
        names = preds[0].tag_names
        y = np.array([[n in truth[t] for n in names] for t in res["test_tracks"]], np.int64)
        want = tagging_metrics(y, np.stack([p.scores for p in preds]))
        for k in ("roc_auc", "average_precision"):
            assert m["metrics"][k] == pytest.approx(want[k], nan_ok=True)


def test_a_task_the_dataset_cannot_serve_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    data = genre_folder(tmp_path / "g")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--task", "chord", "--dataset", str(data), *MODEL_ARGS, "--output", str(out)])
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no chord annotation for task chord" in err and "t00.jams" in err


def test_missing_annotation_is_one_line_naming_the_file(tmp_path: Path, capsys) -> None:
    data = genre_folder(tmp_path / "g")
    (data / "t03.jams").unlink()
    assert (
        evaluate_main(
            ["--task", "genre", "--dataset", str(data), *MODEL_ARGS, "--output", str(tmp_path / "o")]
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("evaluate: error: missing annotation") and err.endswith("t03.jams") and "\n" not in err
    )
