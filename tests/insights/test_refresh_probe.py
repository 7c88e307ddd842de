"""``refresh_catalog.py --probe DIR``: after a refresh, the new and changed tracks get the probe's
predictions; the other tracks keep theirs, and the derived columns never count as catalog metadata
(they do not make tracks "changed" nor break the refresh's schema check)."""

from __future__ import annotations

from pathlib import Path

import lance
import pytest

from jobs.refresh_catalog import main as refresh_main
from pipeline.insights.predict import predict_store
from pipeline.insights.probes import ProbeSettings, train_probe
from tests.conftest import GOLDEN
from tests.insights.test_probes import write_labels
from tools.testkit.stores import write_catalog, write_tone

MODEL = ["--checkpoint", str(GOLDEN / "checkpoint.pt"), "--stats", str(GOLDEN / "stats.json"), "--layers", "1,3",
         "--precision", "fp32", "--window-s", "1", "--no-progress", "--decode-cpus", "1"]  # fmt: skip
FREQS = {"low1": 110.0, "low2": 130.0, "low3": 150.0, "high1": 1800.0, "high2": 2100.0, "high3": 2500.0}


def tracks(store: Path) -> dict[str, dict]:
    return {r["track_id"]: r for r in lance.dataset(str(store / "tracks.lance")).to_table().to_pylist()}


def test_refresh_with_probe_predicts_new_tracks(ray_cluster, tmp_path: Path, capsys) -> None:
    audio = tmp_path / "audio"
    audio.mkdir()
    rows = [(t, write_tone(audio / f"{t}.wav", 1.5, f), t.upper()) for t, f in FREQS.items()]
    store = tmp_path / "store"
    assert (
        refresh_main(["--catalog", write_catalog(tmp_path / "c1.csv", rows), "--store", str(store), *MODEL])
        == 0
    )
    lab = write_labels(tmp_path / "pitch.csv", {"track_id": list(FREQS), "pitch": [t[:-1] for t in FREQS]})
    train_probe(str(store), str(lab), ProbeSettings(task="multiclass", layers=(1, 3), head="linear", max_epochs=50),
                str(tmp_path / "probe"))  # fmt: skip
    predict_store(str(store), str(tmp_path / "probe"))
    before = tracks(store)
    assert all(r["tag_pitch"] in ("low", "high") for r in before.values())

    # the catalog changes: two new tracks, one re-mastered (new content), the rest untouched
    rows += [("new_low", write_tone(audio / "new_low.wav", 1.5, 120.0), "NL"),
             ("new_high", write_tone(audio / "new_high.wav", 1.5, 2300.0), "NH")]  # fmt: skip
    write_tone(audio / "low2.wav", 2.0, 140.0)
    capsys.readouterr()
    code = refresh_main(["--catalog", write_catalog(tmp_path / "c2.csv", rows), "--store", str(store),
                         "--probe", str(tmp_path / "probe"), *MODEL])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "probe pitch: 3 tracks predicted into tag_pitch, tag_pitch_score" in out
    after = tracks(store)
    run = after["new_low"]["run_id"]
    assert {t for t, r in after.items() if r["run_id"] == run} == {"new_low", "new_high", "low2"}
    assert all(after[t]["tag_pitch"] in ("low", "high") for t in after)
    for t in ("low1", "low3", "high1", "high2", "high3"):  # untouched: same row, same prediction
        assert (
            after[t]["run_id"] == before[t]["run_id"]
            and after[t]["tag_pitch_score"] == before[t]["tag_pitch_score"]
        )
    # a third refresh with nothing to do: derived columns are not metadata, nothing is rewritten
    assert refresh_main(["--catalog", str(tmp_path / "c2.csv"), "--store", str(store), *MODEL]) == 0
    out = capsys.readouterr().out
    assert tracks(store)["low1"]["run_id"] == before["low1"]["run_id"]
    assert "unchanged 8" in out and "metadata 0" in out and "metadata updated 0" in out, out


def test_bad_probe_dir_fails_before_the_refresh(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        refresh_main(
            ["--catalog", "c.csv", "--store", str(tmp_path / "s"), "--probe", str(tmp_path / "none"), *MODEL]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("refresh_catalog: error: --probe: cannot load the probe") and err.count("\n") == 1
