"""decode_audio on the shared real clips, on synthetic files, and on broken inputs."""

from __future__ import annotations

import csv
import io
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from pipeline.errors import DecodeError, PipelineError, TooShortError, error_type
from pipeline.io.audio import TARGET_SR, AudioLimits, DecodedAudio, decode_audio, probe_audio
from tools.testkit.memory import traced_peak

REPO = Path(__file__).resolve().parents[2]


def _clip_rows() -> list[dict[str, str]]:
    """Rows of shared/audio/catalog.csv (same search as tests/conftest.py), for parametrize."""
    for cand in (os.environ.get("MUSICFM_SHARED"), REPO / "shared", REPO.parent / "shared"):
        if cand and (Path(cand) / "audio" / "catalog.csv").is_file():
            with open(Path(cand) / "audio" / "catalog.csv", newline="") as f:
                return list(csv.DictReader(f))
    return []


CLIP_ROWS = _clip_rows()


def _reference(data: np.ndarray, sr: int) -> np.ndarray:
    """Direct full read -> mono mean -> one-shot soxr: (N,) float32 at 24 kHz."""
    mono = data.mean(axis=1, dtype=np.float32) if data.ndim == 2 else data.astype(np.float32)
    if sr == TARGET_SR:
        return mono
    return soxr.resample(mono, sr, TARGET_SR, quality="HQ").astype(np.float32)


def _check_output(out: DecodedAudio) -> None:
    s = out.samples
    assert s.ndim == 1 and s.dtype == np.float32 and s.flags.c_contiguous
    assert np.isfinite(s).all()
    assert out.duration_s == pytest.approx(len(s) / TARGET_SR)


def _tone(n: int, sr: int, channels: int, seed: int = 0, amp: float = 0.5) -> np.ndarray:
    """(n, channels) float32: a different sine per channel plus a little noise."""
    t = np.arange(n) / sr
    rng = np.random.default_rng(seed)
    cols = [
        amp * np.sin(2 * np.pi * (220 + 110 * c) * t) + 0.01 * rng.standard_normal(n) for c in range(channels)
    ]
    return np.stack(cols, axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# real clips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", CLIP_ROWS, ids=[r["track_id"] for r in CLIP_ROWS])
def test_decode_shared_clip(audio_dir: Path, row: dict[str, str]) -> None:
    path = audio_dir / row["uri"]
    out = decode_audio(str(path))
    _check_output(out)
    duration = float(row["duration_s"])
    assert out.sample_rate_in == int(row["sample_rate"])
    assert out.channels_in == int(row["channels"])
    assert abs(out.duration_s - duration) <= 1e-3, (out.duration_s, duration)
    assert abs(len(out.samples) - duration * TARGET_SR) <= 24
    assert out.warnings == []
    # no normalisation; only resampler overshoot on (clipped, lossy-origin) sources goes past 1
    assert np.abs(out.samples).max() <= 1.5

    ref_data, ref_sr = sf.read(str(path), dtype="float32", always_2d=True)
    ref = _reference(ref_data, ref_sr)
    assert len(ref) == len(out.samples)
    np.testing.assert_allclose(out.samples, ref, atol=2e-4, rtol=0)

    # same result from bytes and from a file object
    raw = path.read_bytes()
    from_bytes = decode_audio(raw)
    np.testing.assert_array_equal(from_bytes.samples, out.samples)
    with open(path, "rb") as f:
        from_file = decode_audio(f, block_frames=10_000)
    np.testing.assert_allclose(from_file.samples, out.samples, atol=1e-5, rtol=0)


def test_shared_clip_formats_all_covered() -> None:
    fmts = {r["format"] for r in CLIP_ROWS}
    assert {"ogg_vorbis", "flac_pcm16", "flac_pcm24", "wav_pcm16", "wav_float32", "mp3", "ogg_opus"} <= fmts


def test_decode_variants(audio_dir: Path) -> None:
    for path in sorted((audio_dir / "variants").glob("*.ogg")):
        out = decode_audio(path)
        _check_output(out)
        info = sf.info(str(path))
        assert out.sample_rate_in == info.samplerate
        assert out.duration_s == pytest.approx(info.frames / info.samplerate, abs=1e-3)


def test_probe(audio_dir: Path) -> None:
    info = probe_audio(audio_dir / "clips" / "hw_city.ogg")
    assert (info.sample_rate, info.channels) == (44100, 2)
    assert info.duration_s == pytest.approx(30.0, abs=1e-3)
    assert info.format.startswith("OGG")


# ---------------------------------------------------------------------------------------------
# synthetic files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "subtype", "ext", "sr", "channels", "atol"),
    [
        ("WAV", "PCM_16", "wav", 44100, 2, 1e-4),
        ("WAV", "FLOAT", "wav", 48000, 6, 1e-5),
        ("WAV", "PCM_16", "wav", 8000, 1, 1e-4),
        ("WAV", "FLOAT", "wav", 24000, 2, 0),
        ("FLAC", "PCM_24", "flac", 8000, 1, 1e-5),
        ("FLAC", "PCM_16", "flac", 48000, 2, 1e-4),
        ("FLAC", "PCM_16", "flac", 24000, 6, 0),
        ("OGG", "VORBIS", "ogg", 48000, 2, 1e-4),
        ("OGG", "VORBIS", "ogg", 24000, 1, 0),
    ],
)
def test_synthetic_formats(
    tmp_path: Path, fmt: str, subtype: str, ext: str, sr: int, channels: int, atol: float
) -> None:
    n = int(2.5 * sr) + 7
    path = tmp_path / f"x.{ext}"
    sf.write(str(path), _tone(n, sr, channels), sr, subtype=subtype, format=fmt)
    out = decode_audio(str(path), block_frames=4096)
    _check_output(out)
    assert (out.sample_rate_in, out.channels_in, out.frames_in) == (sr, channels, sf.info(str(path)).frames)
    ref_data, _ = sf.read(str(path), dtype="float32", always_2d=True)
    ref = _reference(ref_data, sr)
    assert len(out.samples) == len(ref)
    assert abs(len(out.samples) - n * TARGET_SR / sr) <= 1
    np.testing.assert_allclose(out.samples, ref, atol=atol, rtol=0)


def test_downmix_is_channel_mean(tmp_path: Path) -> None:
    n = 24000
    x = _tone(n, TARGET_SR, 1)[:, 0]
    # L = x, R = -x cancels exactly; at 24 kHz there is no resampling
    path = tmp_path / "cancel.wav"
    sf.write(str(path), np.stack([x, -x], axis=1), TARGET_SR, subtype="FLOAT")
    assert np.abs(decode_audio(str(path)).samples).max() == 0.0
    # six constant channels 0.0, 0.1, ..., 0.5 -> 0.25
    consts = np.tile(np.arange(6, dtype=np.float32) / 10, (n, 1))
    path6 = tmp_path / "six.wav"
    sf.write(str(path6), consts, TARGET_SR, subtype="FLOAT")
    out = decode_audio(str(path6))
    assert out.channels_in == 6
    np.testing.assert_allclose(out.samples, 0.25, atol=1e-7)


def test_no_normalisation(tmp_path: Path) -> None:
    path = tmp_path / "quiet.wav"
    x = 0.01 * _tone(TARGET_SR, TARGET_SR, 1, amp=1.0)
    sf.write(str(path), x, TARGET_SR, subtype="FLOAT")
    out = decode_audio(str(path))
    np.testing.assert_array_equal(out.samples, x[:, 0])


@pytest.mark.parametrize("block_frames", [1, 1000, 65536, 10**7])
def test_block_size_does_not_change_result(tmp_path: Path, block_frames: int) -> None:
    sr = 44100
    path = tmp_path / "b.flac"
    sf.write(str(path), _tone(sr // 10 if block_frames == 1 else 3 * sr, sr, 2), sr, subtype="PCM_16")
    ref_data, _ = sf.read(str(path), dtype="float32", always_2d=True)
    out = decode_audio(str(path), block_frames=block_frames)
    np.testing.assert_allclose(out.samples, _reference(ref_data, sr), atol=1e-4, rtol=0)


def test_non_seekable_stream(tmp_path: Path) -> None:
    class Pipe(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._b = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
            chunk = self._b.read(len(buf))
            buf[: len(chunk)] = chunk
            return len(chunk)

    path = tmp_path / "p.ogg"
    sf.write(str(path), _tone(48000, 48000, 2), 48000, format="OGG", subtype="VORBIS")
    out = decode_audio(Pipe(path.read_bytes()))
    assert out.duration_s == pytest.approx(1.0, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# broken inputs
# ---------------------------------------------------------------------------------------------


def _wav_bytes(x: np.ndarray, sr: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def _patch_data_size(wav: bytes, size: int) -> bytes:
    i = wav.index(b"data")
    return wav[: i + 4] + struct.pack("<I", size) + wav[i + 8 :]


def test_zero_byte(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="empty input"):
        decode_audio(b"")
    p = tmp_path / "empty.wav"
    p.write_bytes(b"")
    with pytest.raises(DecodeError, match="empty input"):
        decode_audio(str(p))
    with pytest.raises(DecodeError, match="empty input"):
        decode_audio(io.BytesIO(b""))


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="not found"):
        decode_audio(str(tmp_path / "nope.wav"))
    with pytest.raises(DecodeError, match="not a regular file"):
        decode_audio(str(tmp_path))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes(seed: int) -> None:
    junk = np.random.default_rng(seed).integers(0, 256, size=50_000, dtype=np.uint8).tobytes()
    with pytest.raises(DecodeError, match="not a readable audio file") as ei:
        decode_audio(junk)
    assert "\n" not in str(ei.value)
    assert ei.value.stage == "decode" and error_type(ei.value) == "DecodeError"


def test_text_is_not_audio() -> None:
    with pytest.raises(DecodeError, match="not a readable audio file"):
        decode_audio(b"track_id,uri\nx,y.ogg\n" * 100)


def _truncation_cases(audio_dir: Path) -> list[tuple[str, bytes]]:
    clips = audio_dir / "clips"
    return [
        (name, (clips / name).read_bytes())
        for name in ("hw_city.ogg", "hw_oriental.flac", "lc_lincity.wav", "hw_snow.mp3", "fb_mainzik_1p.opus")
    ]


@pytest.mark.timeout(120)
def test_truncated_files(audio_dir: Path) -> None:
    """Cut real files at random offsets: a DecodeError, or what decoded (plus a warning where the
    header states a length); never a hang or another exception type. Cutting inside the header is
    always a DecodeError. (libsndfile reports a cut FLAC as lost sync -> DecodeError; a cut Ogg
    just ends early, its length being read from the last page.)"""
    rng = np.random.default_rng(42)
    for name, data in _truncation_cases(audio_dir):
        full = decode_audio(data)
        cuts = [4, 11, 30, *sorted(rng.integers(45, len(data) - 1, size=4))]
        for cut in cuts:
            t0 = time.monotonic()
            try:
                out = decode_audio(data[:cut])
            except DecodeError as e:
                msg = str(e)
                assert msg and "\n" not in msg
                assert (
                    "not a readable audio file" in msg
                    or "truncated" in msg
                    or "shorter than" in msg
                    or "no audio frames" in msg
                ), (name, cut, msg)
            else:
                assert cut >= 45, f"{name} cut at {cut} bytes decoded"
                _check_output(out)
                assert len(out.samples) < len(full.samples), (name, cut)
                if name.endswith((".wav", ".mp3")):
                    # the header (WAV data chunk, MP3 Xing frame count) still claims the full length
                    assert any(w.startswith("header claimed") for w in out.warnings), (
                        name,
                        cut,
                        out.warnings,
                    )
            assert time.monotonic() - t0 < 20


def test_wav_header_claims_huge_length() -> None:
    """A valid WAV whose data chunk claims ~2 GB: what decoded is kept, with a warning."""
    x = _tone(3 * 22050, 22050, 1)
    patched = _patch_data_size(_wav_bytes(x, 22050), 0x7FFF0000)
    out = decode_audio(patched)
    assert out.duration_s == pytest.approx(3.0, abs=1e-3)
    assert any("header claimed" in w for w in out.warnings), out.warnings


def test_wav_header_claims_huge_length_and_tight_limit() -> None:
    """libsndfile clamps the claim to the file size; the real length still meets max_duration_s."""
    x = _tone(2 * 8000, 8000, 1)
    patched = _patch_data_size(_wav_bytes(x, 8000), 0x7FFF0000)
    with pytest.raises(DecodeError, match=r"(exceeds the limit|longer than the limit)"):
        decode_audio(patched, limits=AudioLimits(max_duration_s=1.5))


def test_nan_and_inf_float_wav() -> None:
    x = _tone(24000, 24000, 2)
    x[100, 0] = np.nan
    x[5000, 1] = np.inf
    x[6000, :] = -np.inf
    with pytest.raises(DecodeError, match=r"4 non-finite \(NaN/Inf\) sample values, first at 0\.004 s"):
        decode_audio(_wav_bytes(x, 24000, "FLOAT"))
    y = _tone(44100, 44100, 1)
    y[-1] = np.nan
    with pytest.raises(DecodeError, match="1 non-finite"):
        decode_audio(_wav_bytes(y, 44100, "FLOAT"), block_frames=1000)


def test_too_many_channels() -> None:
    x = _tone(8000, 8000, 4)
    with pytest.raises(DecodeError, match="4 channels, over the limit of 2"):
        decode_audio(_wav_bytes(x, 8000), limits=AudioLimits(max_channels=2))
    x33 = np.zeros((2000, 33), dtype=np.float32)
    with pytest.raises(DecodeError, match="33 channels, over the limit of 32"):
        decode_audio(_wav_bytes(x33, 8000))


def test_too_short() -> None:
    with pytest.raises(TooShortError, match="1000 samples at 24000 Hz") as ei:
        decode_audio(_wav_bytes(_tone(1000, 24000, 1), 24000))
    assert isinstance(ei.value, DecodeError) and error_type(ei.value) == "TooShortError"
    assert ei.value.stage == "decode"
    # exactly the minimum is fine
    assert len(decode_audio(_wav_bytes(_tone(1025, 24000, 1), 24000)).samples) == 1025
    # 400 samples at 8 kHz -> 1200 at 24 kHz: long enough
    assert len(decode_audio(_wav_bytes(_tone(400, 8000, 1), 8000)).samples) == 1200
    with pytest.raises(TooShortError):
        decode_audio(_wav_bytes(_tone(24000, 24000, 1), 24000), limits=AudioLimits(min_samples=24001))


def test_max_duration_exceeded() -> None:
    data = _wav_bytes(_tone(3 * 8000, 8000, 1), 8000)
    with pytest.raises(DecodeError, match=r"duration 3\.000 s \(header\) exceeds the limit of 2\.000 s"):
        decode_audio(data, limits=AudioLimits(max_duration_s=2.0))
    assert decode_audio(data, limits=AudioLimits(max_duration_s=3.0)).duration_s == pytest.approx(3.0)


def test_max_bytes() -> None:
    data = _wav_bytes(_tone(8000, 8000, 1), 8000)
    with pytest.raises(DecodeError, match="over the 1000-byte limit"):
        decode_audio(data, limits=AudioLimits(max_bytes=1000))
    with pytest.raises(DecodeError, match="over the 1000-byte limit"):
        decode_audio(io.BytesIO(data), limits=AudioLimits(max_bytes=1000))


def test_deadline(audio_dir: Path) -> None:
    path = audio_dir / "clips" / "hw_city.ogg"
    with pytest.raises(DecodeError, match=r"decode exceeded 1e-09 s"):
        decode_audio(str(path), block_frames=256, deadline_s=1e-9)
    assert decode_audio(str(path), deadline_s=60).duration_s == pytest.approx(30.0, abs=1e-3)


def test_limits_validation() -> None:
    for kwargs in (
        {"max_bytes": 0},
        {"max_duration_s": 0},
        {"max_duration_s": float("inf")},
        {"max_channels": 0},
        {"min_samples": 0},
    ):
        with pytest.raises(ValueError):
            AudioLimits(**kwargs)
    with pytest.raises(ValueError):
        decode_audio(b"x", block_frames=0)


def test_errors_are_pipeline_errors() -> None:
    for exc in (DecodeError("x"), TooShortError("y")):
        assert isinstance(exc, PipelineError) and exc.stage == "decode"


# ---------------------------------------------------------------------------------------------
# bounded memory
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_flac(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~10 min, 48 kHz, stereo, 16-bit FLAC written block by block."""
    sr, seconds = 48000, 600
    path = tmp_path_factory.mktemp("long") / "long.flac"
    block = _tone(10 * sr, sr, 2, amp=0.3)
    with sf.SoundFile(str(path), "w", sr, 2, subtype="PCM_16", format="FLAC") as f:
        for _ in range(seconds // 10):
            f.write(block)
    return path


@pytest.mark.timeout(120)
def test_block_decoding_bounded_memory(long_flac: Path) -> None:
    peak, out = traced_peak(
        """
        from pipeline.io.audio import decode_audio
        def decode(path):
            out = decode_audio(path)
            return {"shape": list(out.samples.shape), "nbytes": out.samples.nbytes,
                    "sr_in": out.sample_rate_in, "channels_in": out.channels_in}
        """,
        f"decode({str(long_flac)!r})",
    )
    assert out["shape"] == [600 * TARGET_SR]
    assert out["sr_in"] == 48000 and out["channels_in"] == 2
    full_read = 600 * 48000 * 2 * 4  # what sf.read(..., dtype=float32) alone would hold
    assert peak < 2.5 * out["nbytes"], (peak, out["nbytes"])
    assert peak < full_read / 3


def test_growing_output_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the header is not trusted for preallocation the output grows; the result is the same."""
    import pipeline.io.audio as audio_mod

    path = tmp_path / "g.ogg"
    sf.write(str(path), _tone(5 * 44100, 44100, 2), 44100, format="OGG", subtype="VORBIS")
    expected = decode_audio(str(path)).samples
    monkeypatch.setattr(audio_mod, "_PREALLOC_FREE_BYTES", 0)
    monkeypatch.setattr(audio_mod, "_PREALLOC_MAX_RATIO", 0)
    monkeypatch.setattr(audio_mod, "_INITIAL_OUT_SAMPLES", 1000)
    out = decode_audio(str(path), block_frames=3000)
    assert out.samples.flags.c_contiguous and out.samples.flags.owndata
    np.testing.assert_array_equal(out.samples, expected)


def test_fifo_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    with pytest.raises(DecodeError, match="not a regular file"):
        decode_audio(str(fifo))


def test_errors_pickle() -> None:
    import pickle

    for exc in (DecodeError("x token=abc"), TooShortError("short")):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc) and back.stage == exc.stage
    assert str(DecodeError("x token=abc")) == "x token=***"


# --------------------------------------------------------------------------- scan + stream


@pytest.mark.parametrize(("sr", "channels"), [(24000, 1), (44100, 2), (48000, 6), (22050, 1), (16000, 3)])
def test_scan_then_stream_gives_decode_audio_bit_for_bit(sr: int, channels: int) -> None:
    from pipeline.io.audio import scan_audio, stream_audio

    x = _tone(sr * 5 + 777, sr, channels, seed=sr)
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="FLAC")
    data = buf.getvalue()
    whole = decode_audio(data)
    scan = scan_audio(data)
    assert (scan.num_samples, scan.frames_in, scan.sample_rate_in, scan.channels_in) == (
        whole.samples.shape[0],
        whole.frames_in,
        sr,
        channels,
    )
    pieces = list(stream_audio(data, scan.num_samples, block_frames=4096))
    assert len(pieces) > 10  # it really came in pieces
    assert np.array_equal(np.concatenate(pieces), whole.samples)
    if sr == TARGET_SR:  # the 24 kHz path reuses its block buffer: every piece must be its own
        assert len({p.__array_interface__["data"][0] for p in pieces}) == len(pieces)


def test_output_samples_is_the_resampled_length() -> None:
    from pipeline.io.audio import output_samples

    rng = np.random.default_rng(3)
    for sr in (8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000, 12345):
        for n in rng.integers(2000, 300_000, size=4):
            got = soxr.ResampleStream(sr, TARGET_SR, 1, dtype="float32", quality="HQ")
            total = got.resample_chunk(np.zeros(int(n), np.float32)).shape[0]
            total += got.resample_chunk(np.zeros(0, np.float32), last=True).shape[0]
            assert output_samples(int(n), sr) == total, (sr, n)


def test_scan_reports_what_decode_audio_refuses(tmp_path: Path) -> None:
    from pipeline.io.audio import scan_audio, stream_audio

    x = _tone(24000 * 3, 24000, 1)
    x[30000, 0] = np.nan
    sf.write(tmp_path / "nan.wav", x, 24000, subtype="FLOAT")
    with pytest.raises(DecodeError, match="non-finite") as a:
        decode_audio(tmp_path / "nan.wav")
    with pytest.raises(DecodeError, match="non-finite") as b:
        scan_audio(tmp_path / "nan.wav")
    assert str(a.value) == str(b.value)
    sf.write(tmp_path / "ok.wav", _tone(24000 * 3, 24000, 1), 24000)
    with pytest.raises(TooShortError):
        scan_audio(tmp_path / "ok.wav", AudioLimits(min_samples=10**7))
    with pytest.raises(DecodeError, match="changed while it was read"):
        list(stream_audio(tmp_path / "ok.wav", 24000 * 3 + 1))
