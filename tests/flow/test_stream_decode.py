"""DecodeStage on a track over its streaming threshold: scanned, then decoded piece by piece, its
windows cut as they arrive. The rows (every column but the decode time) and the samples are the
ones of the whole-file path, block by block; errors stay one error row per track."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from pipeline.engine.inference import EmbedSettings
from pipeline.flow.stages import DecodeStage, audio_views
from pipeline.io.audio import AudioLimits


def _rows(stage: DecodeStage, batch: pa.Table) -> tuple[list[dict], list[int]]:
    blocks = list(stage(batch))
    table = pa.concat_tables(blocks)
    rows = table.drop_columns(["audio", "decode_s"]).to_pylist()
    for r, a in zip(rows, audio_views(table["audio"]), strict=True):
        r["audio"] = None if a is None else a.tobytes()
    return rows, [b.num_rows for b in blocks]


@pytest.mark.parametrize(
    ("sr", "channels", "seconds", "window_s", "hop_s"),
    [
        (24000, 1, 37.3, 2.0, 2.0),
        (44100, 2, 23.9, 3.0, 2.0),
        (22050, 1, 41.0, 2.0, 5.0),
        (48000, 1, 1.5, 2.0, 2.0),
    ],
)
def test_streamed_track_has_the_whole_path_s_rows(tmp_path, sr, channels, seconds, window_s, hop_s) -> None:
    rng = np.random.default_rng(sr)
    x = (0.2 * rng.standard_normal((int(sr * seconds), channels))).astype(np.float32)
    sf.write(tmp_path / "a.flac", x, sr)
    batch = pa.Table.from_pylist(
        [
            {"track_id": "a", "uri": str(tmp_path / "a.flac"), "metadata_json": "{}", "chunk": 3},
            {"track_id": "b", "uri": str(tmp_path / "missing.flac"), "metadata_json": "{}", "chunk": 3},
        ]
    )
    settings = EmbedSettings(layers=(1,), window_s=window_s, hop_s=hop_s)
    whole = DecodeStage(settings, AudioLimits(), None)
    streamed = DecodeStage(settings, AudioLimits(), None)
    streamed.STREAM_ABOVE_S = 1.0  # every track here but the last one is "long"
    whole.WINDOWS_PER_BLOCK = streamed.WINDOWS_PER_BLOCK = 4
    assert streamed._streams(str(tmp_path / "a.flac")) and not whole._long(str(tmp_path / "a.flac"))
    rows_w, sizes_w = _rows(whole, batch)
    rows_s, sizes_s = _rows(streamed, batch)
    assert rows_s == rows_w and sizes_s == sizes_w
    assert rows_s[-1]["kind"] == "error" and rows_s[-1]["stage"] == "fetch"
    assert [r["window_ix"] for r in rows_s[:-1]] == list(range(rows_s[0]["num_windows"]))


def test_streamed_track_decode_time_adds_up_and_errors_stay_one_row(tmp_path) -> None:
    sf.write(tmp_path / "a.wav", np.zeros((24000 * 20, 1), np.float32), 24000)
    x = 0.1 * np.ones((24000 * 20, 1), np.float32)
    x[24000 * 15] = np.inf
    sf.write(tmp_path / "nan.wav", x, 24000, subtype="FLOAT")
    stage = DecodeStage(EmbedSettings(layers=(1,), window_s=2.0, hop_s=2.0), AudioLimits(), None)
    stage.STREAM_ABOVE_S = 5.0
    batch = pa.Table.from_pylist(
        [{"track_id": t, "uri": str(tmp_path / f"{t}.wav"), "metadata_json": "{}"} for t in ("a", "nan")]
    )
    table = pa.concat_tables(list(stage(batch)))
    kinds = table["kind"].to_pylist()
    assert kinds == ["window"] * 10 + ["error"]
    assert all(t > 0 for t in table["decode_s"].to_pylist()[:10])
    err = table.slice(10).to_pylist()[0]
    assert (err["stage"], err["error_type"]) == ("decode", "DecodeError") and "non-finite" in err["message"]
