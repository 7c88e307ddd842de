"""The blocks between the decode and model stages: audio as one binary buffer per block (no
per-row ``bytes``), read back as views; the same samples and the same embedded rows as before."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import soundfile as sf

from pipeline import schemas
from pipeline.flow.decode import _task_table
from pipeline.flow.stages import DecodeStage, audio_array, audio_views
from pipeline.io.audio import AudioLimits, decode_audio
from pipeline.io.windows import plan_windows


def test_audio_array_round_trip_with_nulls_and_slices() -> None:
    rng = np.random.default_rng(0)
    flat = rng.standard_normal(1000).astype(np.float32)
    views = [flat[0:300], flat[300:700], flat[700:1000]]  # consecutive: the buffer is used as is
    arr = audio_array(views)
    assert arr.type == pa.large_binary() and arr.null_count == 0
    assert arr.buffers()[2].address == flat.__array_interface__["data"][0]  # no copy
    got = audio_views(arr)
    assert all(np.array_equal(g, v) for g, v in zip(got, views, strict=True))
    mixed = [flat[5:10], None, np.arange(3, dtype=np.float32), b"\x00\x00\x80\x3f"]
    arr = audio_array(mixed)
    got = audio_views(pa.chunked_array([arr.slice(1), arr.slice(0, 1)]))
    assert got[0] is None and np.array_equal(got[1], mixed[2]) and got[2].tolist() == [1.0]
    assert np.array_equal(got[3], flat[5:10])
    assert arr.to_pylist()[0] == flat[5:10].tobytes()  # the same bytes as the old per-row bytes


def test_decode_stage_blocks_hold_the_windows_samples(tmp_path) -> None:
    sr = 22050
    x = (0.3 * np.sin(2 * np.pi * 330 * np.arange(int(sr * 7.3)) / sr)).astype(np.float32)
    sf.write(tmp_path / "a.flac", np.stack([x, -x], axis=1), sr)
    from pipeline.engine.inference import EmbedSettings

    stage = DecodeStage(EmbedSettings(layers=(1,), window_s=2.0, hop_s=2.0), AudioLimits(), None)
    stage.WINDOWS_PER_BLOCK = 3
    batch = pa.Table.from_pylist([{"track_id": "a", "uri": str(tmp_path / "a.flac"), "metadata_json": "{}"},
                                  {"track_id": "b", "uri": str(tmp_path / "missing.flac"), "metadata_json": "{}"}])  # fmt: skip
    blocks = list(stage(batch))
    assert all(b.schema.equals(schemas.TASK_SCHEMA) for b in blocks)
    table = pa.concat_tables(blocks)
    samples = decode_audio(str(tmp_path / "a.flac")).samples
    wins = plan_windows(samples.shape[0], stage.spec)
    kinds = table["kind"].to_pylist()
    assert kinds == ["window"] * len(wins) + ["error"] and [b.num_rows for b in blocks] == [3, 1, 1]
    got = audio_views(table["audio"])
    for w, g in zip(wins, got, strict=False):
        assert np.array_equal(g, samples[w.start : w.end])
    assert got[-1] is None  # the error row has no audio
    assert _task_table([{"kind": "error", "track_id": "z"}]).column("audio").null_count == 1
