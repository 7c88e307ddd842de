"""Audio decoding for the CPU data plane: any libsndfile format -> mono float32 at 24 kHz.

:func:`decode_audio` reads the input **by blocks** (``block_frames`` frames at a time),
downmixes every block to mono (mean over channels) and feeds it to a streaming
``soxr.ResampleStream`` (``HQ``), so the only full-length allocation is the output array.
A track too long to hold is read twice instead: :func:`scan_audio` decodes it to the end keeping
only its length and checks, then :func:`stream_audio` yields the same samples piece by piece
(no full-length allocation at all; ``pipeline.flow.decode.DecodeStage`` cuts windows from them).
Limits (:class:`AudioLimits`) are checked on the header before decoding and again while
decoding, so a lying header cannot make the decoder run away.

Formats: whatever the libsndfile bundled with the ``soundfile`` wheel opens (WAV, FLAC,
Ogg Vorbis, Ogg Opus, MP3, AIFF, ...). Sample values are float32 in [-1, 1] exactly as
soundfile produces them (no normalisation).
"""

from __future__ import annotations

import io
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from pipeline.errors import DecodeError, TooShortError, redact

__all__ = [
    "TARGET_SR",
    "AudioInfo",
    "AudioLimits",
    "AudioScan",
    "DecodedAudio",
    "decode_audio",
    "output_samples",
    "probe_audio",
    "scan_audio",
    "stream_audio",
]

TARGET_SR = 24000

# Header sanity: rates outside this range are treated as a broken header.
_MIN_PLAUSIBLE_SR = 1000
_MAX_PLAUSIBLE_SR = 768_000
# When the header length looks implausible the output starts at this many samples and grows.
_INITIAL_OUT_SAMPLES = 1 << 20
# A header is trusted for preallocation only if output bytes <= max(this, ratio * input bytes).
_PREALLOC_FREE_BYTES = 64 * 1024**2
_PREALLOC_MAX_RATIO = 256


@dataclass(frozen=True)
class AudioLimits:
    """Per-file limits enforced by :func:`decode_audio`.

    Attributes:
        max_bytes: largest encoded input accepted (bytes).
        max_duration_s: longest input accepted (seconds, from the header and while decoding).
        max_channels: most channels accepted.
        min_samples: fewest output samples (at 24 kHz) accepted; fewer -> :class:`TooShortError`.
            The default 1025 is one MusicFM STFT frame (n_fft = 2048, centred).
    """

    max_bytes: int = 2 * 1024**3
    max_duration_s: float = 4 * 3600
    max_channels: int = 32
    min_samples: int = 1025

    def __post_init__(self) -> None:
        if not isinstance(self.max_bytes, int) or self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int, got {self.max_bytes!r}")
        if not (isinstance(self.max_duration_s, (int, float)) and math.isfinite(self.max_duration_s)):
            raise ValueError(f"max_duration_s must be a finite number, got {self.max_duration_s!r}")
        if self.max_duration_s <= 0:
            raise ValueError(f"max_duration_s must be > 0, got {self.max_duration_s!r}")
        if not isinstance(self.max_channels, int) or self.max_channels < 1:
            raise ValueError(f"max_channels must be an int >= 1, got {self.max_channels!r}")
        if not isinstance(self.min_samples, int) or self.min_samples < 1:
            raise ValueError(f"min_samples must be an int >= 1, got {self.min_samples!r}")


@dataclass
class DecodedAudio:
    """Result of :func:`decode_audio`.

    Attributes:
        samples: (N,) float32 mono at :data:`TARGET_SR`, C-contiguous.
        sample_rate_in: the source sample rate (Hz).
        channels_in: the source channel count.
        duration_s: duration of ``samples`` in seconds (``N / 24000``).
        warnings: human-readable notes (e.g. a header that over-states the length).
        frames_in: source frames actually decoded.
        format: libsndfile format/subtype, e.g. ``"OGG/VORBIS"``.
    """

    samples: np.ndarray  # (N,) float32
    sample_rate_in: int
    channels_in: int
    duration_s: float
    warnings: list[str] = field(default_factory=list)
    frames_in: int = 0
    format: str = ""


@dataclass(frozen=True)
class AudioInfo:
    """Header facts from :func:`probe_audio` (nothing is decoded)."""

    sample_rate: int
    channels: int
    frames: int  # as claimed by the header; may be wrong
    duration_s: float  # frames / sample_rate
    format: str


_Source = bytes | bytearray | memoryview | BinaryIO | str | os.PathLike


def _fmt_s(x: float) -> str:
    return f"{x:.3f}"


def _prepare_source(data: _Source, limits: AudioLimits) -> tuple[object, int | None, str]:
    """Return (object soundfile can open, input size in bytes or None, short description)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if n == 0:
            raise DecodeError("empty input (0 bytes)")
        if n > limits.max_bytes:
            raise DecodeError(f"input is {n} bytes, over the {limits.max_bytes}-byte limit")
        return io.BytesIO(data), n, f"{n}-byte buffer"
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if path.startswith("file://"):
            path = path[len("file://") :]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DecodeError(f"file not found: {path}") from None
        except OSError as e:
            raise DecodeError(f"cannot stat {path}: {e.strerror or e}") from None
        if not os.path.isfile(path):
            raise DecodeError(f"not a regular file: {path}")
        if st.st_size == 0:
            raise DecodeError(f"empty input (0 bytes): {path}")
        if st.st_size > limits.max_bytes:
            raise DecodeError(f"input is {st.st_size} bytes, over the {limits.max_bytes}-byte limit")
        return path, st.st_size, path
    # A file object.
    if not hasattr(data, "read"):
        raise TypeError(
            f"decode_audio needs bytes, a path or a binary file object, got {type(data).__name__}"
        )
    seekable = False
    try:
        seekable = bool(data.seekable())  # type: ignore[union-attr]
    except Exception:  # exotic file objects
        seekable = False
    if not seekable:
        # libsndfile needs to seek for most formats: buffer, bounded by max_bytes.
        buf = data.read(limits.max_bytes + 1)
        if not isinstance(buf, (bytes, bytearray)):
            raise TypeError("decode_audio needs a binary file object (read() returned text)")
        if len(buf) > limits.max_bytes:
            raise DecodeError(f"input is over the {limits.max_bytes}-byte limit")
        return _prepare_source(bytes(buf), limits)
    size: int | None = None
    try:
        pos = data.tell()
        end = data.seek(0, io.SEEK_END)
        data.seek(pos)
        size = int(end) - int(pos)
    except Exception:
        size = None
    if size == 0:
        raise DecodeError("empty input (0 bytes)")
    if size is not None and size > limits.max_bytes:
        raise DecodeError(f"input is {size} bytes, over the {limits.max_bytes}-byte limit")
    return data, size, "file object"


def _open(src: object) -> sf.SoundFile:
    try:
        return sf.SoundFile(src)  # type: ignore[arg-type]
    except sf.LibsndfileError as e:
        raise DecodeError(f"not a readable audio file: {e.error_string}") from None
    except (RuntimeError, ValueError, TypeError, OSError, EOFError) as e:
        raise DecodeError(f"not a readable audio file: {e}") from None


_LOG_CLAIM_RE = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


def _claimed_frames(f: sf.SoundFile, frames: int) -> int | None:
    """Frames a WAV/AIFF header *claims* when libsndfile clamped it to the file size.

    libsndfile silently clamps an over-long data chunk to what the file holds and notes it in its
    log (``data : 2147418112 (should be 132300)``); ``f.frames`` is then the clamped value. The
    claim is only used for the "header claimed X s" warning. ``None`` when nothing was clamped or
    the log is unavailable (it is read through soundfile's cffi handle).
    """
    try:
        buf = sf._ffi.new("char[]", 8192)
        sf._snd.sf_command(f._file, sf._snd.SFC_GET_LOG_INFO, buf, 8192)
        log = sf._ffi.string(buf).decode("latin-1")
    except Exception:  # private API; the warning is best effort
        return None
    m = _LOG_CLAIM_RE.search(log)
    if not m:
        return None
    claimed, actual = int(m.group(1)), int(m.group(2))
    if actual <= 0 or claimed <= actual or frames <= 0:
        return None
    return int(round(frames * claimed / actual))


def _header_format(f: sf.SoundFile) -> str:
    try:
        return f"{f.format}/{f.subtype}"
    except Exception:
        return "unknown"


def probe_audio(data: _Source, limits: AudioLimits = AudioLimits()) -> AudioInfo:
    """Read only the header of ``data`` (same inputs as :func:`decode_audio`)."""
    src, _, _ = _prepare_source(data, limits)
    with _open(src) as f:
        sr, ch, frames = int(f.samplerate), int(f.channels), int(f.frames)
        return AudioInfo(sr, ch, frames, frames / sr if sr > 0 else 0.0, _header_format(f))


def decode_audio(
    data: _Source,
    limits: AudioLimits = AudioLimits(),
    block_frames: int = 65536,
    deadline_s: float | None = None,
    resample_quality: str = "HQ",
) -> DecodedAudio:
    """Decode ``data`` to mono float32 at 24 kHz, block by block, with bounded memory.

    Args:
        data: encoded audio as ``bytes``, a seekable binary file object, or a local path
            (``str``/``PathLike``; a ``file://`` prefix is accepted). Non-seekable file objects
            are buffered in memory (up to ``limits.max_bytes``).
        limits: size / duration / channel / minimum-length limits.
        block_frames: source frames read per block (memory per block is
            ``block_frames * channels * 4`` bytes plus the resampler state).
        deadline_s: time budget for this file in seconds (wall clock, from the call); checked
            after every block; ``None`` for no budget.
        resample_quality: soxr quality (``HQ`` default; ``VHQ``, ``MQ``, ``LQ``, ``QQ``), for
            ``bench/decode_formats.py``, which measures speed and embedding drift of each.

    Returns:
        :class:`DecodedAudio` with ``samples`` of shape (N,), float32, C-contiguous, 24 kHz.

    Raises:
        DecodeError: empty input, not audio, truncated/corrupt stream, bad header (sample rate,
            channel count), more than ``max_channels`` channels, longer than
            ``max_duration_s`` (by header or while decoding), NaN/Inf samples, over
            ``max_bytes``, or over ``deadline_s``.
        TooShortError: fewer than ``limits.min_samples`` output samples.

    A header that claims more frames than the stream holds is not an error: what decoded is
    kept and a warning ``"header claimed X s, decoded Y s"`` is added.

    The whole track is one array here; :func:`scan_audio` + :func:`stream_audio` give the same
    samples piece by piece for a track too long to hold (``pipeline.flow.decode.DecodeStage``).
    """
    if block_frames < 1:
        raise ValueError(f"block_frames must be >= 1, got {block_frames}")
    t0 = time.monotonic()
    src, nbytes, _desc = _prepare_source(data, limits)
    with _open(src) as f:
        hdr = _check_header(f, limits)
        # ---- output buffer --------------------------------------------------------------------
        ratio = TARGET_SR / hdr.sr_in
        expected_out = int(math.ceil(hdr.header_frames * ratio)) + 16 if hdr.header_known else 0
        budget = max(_PREALLOC_FREE_BYTES, _PREALLOC_MAX_RATIO * (nbytes or 0))
        if hdr.header_known and expected_out * 4 <= budget:
            cap = expected_out
        else:
            cap = _INITIAL_OUT_SAMPLES
        out = np.empty(cap, dtype=np.float32)  # (cap,) grown with ndarray.resize (realloc)
        n_out = 0

        def _append(y: np.ndarray) -> None:
            nonlocal out, cap, n_out
            k = y.shape[0]
            if k == 0:
                return
            if n_out + k > cap:
                cap = max(n_out + k, int(cap * 1.5) + 1024)
                out.resize(cap, refcheck=False)
            out[n_out : n_out + k] = y
            n_out += k

        count = _Count()
        for y in _resampled(f, hdr, limits, block_frames, t0, deadline_s, resample_quality, count):
            _append(y)
    frames_in = count.frames_in
    warnings = _length_warnings(hdr, frames_in)
    if frames_in == 0:
        raise TooShortError("no audio frames decoded (empty stream)")
    _check_min_samples(n_out, limits)
    if cap != n_out:
        out.resize(n_out, refcheck=False)  # shrink in place (realloc), no second full-length copy
    assert out.flags.c_contiguous and out.dtype == np.float32
    return DecodedAudio(
        samples=out,
        sample_rate_in=hdr.sr_in,
        channels_in=hdr.ch,
        duration_s=n_out / TARGET_SR,
        warnings=[redact(w) for w in warnings],
        frames_in=frames_in,
        format=hdr.fmt,
    )


# --------------------------------------------------------------------------- shared decode loop


@dataclass(frozen=True)
class _Header:
    sr_in: int
    ch: int
    header_frames: int
    header_known: bool
    claimed_frames: int | None
    fmt: str
    max_frames_in: int


@dataclass
class _Count:
    frames_in: int = 0


def _check_header(f: sf.SoundFile, limits: AudioLimits) -> _Header:
    """The header's facts, checked before anything is decoded."""
    sr_in, ch, header_frames = int(f.samplerate), int(f.channels), int(f.frames)
    fmt = _header_format(f)
    if sr_in <= 0 or sr_in < _MIN_PLAUSIBLE_SR or sr_in > _MAX_PLAUSIBLE_SR:
        raise DecodeError(
            f"implausible sample rate {sr_in} Hz in header (accepted {_MIN_PLAUSIBLE_SR}..{_MAX_PLAUSIBLE_SR})"
        )
    if ch < 1:
        raise DecodeError(f"invalid channel count {ch} in header")
    if ch > limits.max_channels:
        raise DecodeError(f"{ch} channels, over the limit of {limits.max_channels}")
    max_frames_in = int(math.floor(limits.max_duration_s * sr_in))
    header_known = 0 < header_frames < (1 << 62)
    claimed_frames = _claimed_frames(f, header_frames) if header_known else None
    if header_known and header_frames > max_frames_in:
        raise DecodeError(
            f"duration {_fmt_s(header_frames / sr_in)} s (header) exceeds the limit of "
            f"{_fmt_s(limits.max_duration_s)} s"
        )
    return _Header(sr_in, ch, header_frames, header_known, claimed_frames, fmt, max_frames_in)


def _mono_blocks(
    f: sf.SoundFile,
    hdr: _Header,
    limits: AudioLimits,
    block_frames: int,
    t0: float,
    deadline_s: float | None,
    count: _Count,
    downmix: bool = True,
) -> Iterator[np.ndarray]:
    """Every block of ``f`` as mono samples at the source rate: (n,) float32 views of one reused
    buffer (``downmix=False``: decoded and checked only, nothing yielded). The limits, the deadline
    and the samples' finiteness are checked as it goes; ``count.frames_in`` is the frames read."""
    sr_in, ch = hdr.sr_in, hdr.ch
    block = np.empty((block_frames, ch), dtype=np.float32)  # (block_frames, C) reused
    mono = np.empty(block_frames, dtype=np.float32)  # (block_frames,) reused
    frames_in = 0
    bad = 0  # non-finite samples seen
    first_bad_s: float | None = None
    while True:
        try:
            got = f.read(block_frames, dtype="float32", always_2d=True, out=block)
        except sf.LibsndfileError as e:
            raise DecodeError(
                f"corrupt or truncated audio after {_fmt_s(frames_in / sr_in)} s: {e.error_string}"
            ) from None
        except (RuntimeError, ValueError, OSError, EOFError) as e:
            raise DecodeError(
                f"corrupt or truncated audio after {_fmt_s(frames_in / sr_in)} s: {e}"
            ) from None
        n = got.shape[0]  # got: (n, C), a view of block
        if n == 0:
            break
        frames_in += n
        count.frames_in = frames_in
        if frames_in > hdr.max_frames_in:
            raise DecodeError(
                f"audio longer than the limit of {_fmt_s(limits.max_duration_s)} s"
                + (f" (header claimed {_fmt_s(hdr.header_frames / sr_in)} s)" if hdr.header_known else "")
            )
        m = mono[:n]  # (n,)
        if not downmix:
            pass
        elif ch == 1:
            m[:] = got[:, 0]
        elif ch < 8:
            # np.mean(axis=1) runs a C-length inner loop per frame (~1 ms per 65536 stereo frames,
            # as much as decoding FLAC); whole-column adds are ~35x faster and, below 8 channels
            # (where np.mean's sum is still sequential), bit-identical to it.
            np.add(got[:, 0], got[:, 1], out=m)
            for c in range(2, ch):
                np.add(m, got[:, c], out=m)
            np.divide(m, np.float32(ch), out=m)
        else:
            np.mean(got, axis=1, dtype=np.float32, out=m)
        fin = np.isfinite(got)
        if not fin.all():
            nb = int(fin.size - np.count_nonzero(fin))
            if bad == 0:
                first_bad_s = (frames_in - n + int(np.argmin(fin.all(axis=1)))) / sr_in
            bad += nb
        if bad == 0 and downmix:
            yield m
        if deadline_s is not None and time.monotonic() - t0 > deadline_s:
            raise DecodeError(
                f"decode exceeded {deadline_s:g} s (stopped at {_fmt_s(frames_in / sr_in)} s of audio)"
            )
    if bad:
        raise DecodeError(
            f"{bad} non-finite (NaN/Inf) sample values, first at {_fmt_s(first_bad_s or 0.0)} s"
        )


def _resampled(
    f: sf.SoundFile,
    hdr: _Header,
    limits: AudioLimits,
    block_frames: int,
    t0: float,
    deadline_s: float | None,
    quality: str,
    count: _Count,
) -> Iterator[np.ndarray]:
    """Mono pieces at 24 kHz, in order: (n,) float32, a view of a reused buffer at 24 kHz input
    (copy it to keep it), else the resampler's fresh output."""
    resampler = (
        None
        if hdr.sr_in == TARGET_SR
        else soxr.ResampleStream(hdr.sr_in, TARGET_SR, 1, dtype="float32", quality=quality)
    )
    for m in _mono_blocks(f, hdr, limits, block_frames, t0, deadline_s, count):
        yield m if resampler is None else resampler.resample_chunk(m, last=False)
    if resampler is not None:
        yield resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


def _length_warnings(hdr: _Header, frames_in: int) -> list[str]:
    claimed = max(hdr.header_frames if hdr.header_known else 0, hdr.claimed_frames or 0)
    if claimed > frames_in:
        return [f"header claimed {_fmt_s(claimed / hdr.sr_in)} s, decoded {_fmt_s(frames_in / hdr.sr_in)} s"]
    return []


def _check_min_samples(n_out: int, limits: AudioLimits) -> None:
    if n_out < limits.min_samples:
        raise TooShortError(
            f"audio is {n_out} samples at {TARGET_SR} Hz ({_fmt_s(n_out / TARGET_SR)} s), "
            f"shorter than the minimum of {limits.min_samples} samples"
        )


# --------------------------------------------------------------------------- streaming


def output_samples(frames_in: int, sample_rate_in: int) -> int:
    """Samples at 24 kHz that :func:`decode_audio` gives for ``frames_in`` source frames: soxr's
    stream rounds ``frames_in * 24000 / rate`` half up (exact integer arithmetic)."""
    if sample_rate_in == TARGET_SR:
        return frames_in
    return (2 * frames_in * TARGET_SR + sample_rate_in) // (2 * sample_rate_in)


@dataclass(frozen=True)
class AudioScan:
    """What :func:`scan_audio` found by decoding a whole input without keeping it."""

    sample_rate_in: int
    channels_in: int
    frames_in: int
    num_samples: int  # samples at 24 kHz that stream_audio yields in all
    duration_s: float  # num_samples / 24000
    warnings: list[str]
    format: str


def scan_audio(
    data: _Source,
    limits: AudioLimits = AudioLimits(),
    block_frames: int = 65536,
    deadline_s: float | None = None,
) -> AudioScan:
    """Decode ``data`` to the end, checking it as :func:`decode_audio` does, and keep only its
    facts: the same errors, warnings and length (``num_samples`` = ``len(decode_audio(data).samples)``)
    in memory bounded by one block. The first pass of a track too long to hold (the second is
    :func:`stream_audio`): the window plan needs the length before the first window goes out."""
    if block_frames < 1:
        raise ValueError(f"block_frames must be >= 1, got {block_frames}")
    t0 = time.monotonic()
    src, _nbytes, _desc = _prepare_source(data, limits)
    count = _Count()
    with _open(src) as f:
        hdr = _check_header(f, limits)
        for _ in _mono_blocks(f, hdr, limits, block_frames, t0, deadline_s, count, downmix=False):
            pass
    if count.frames_in == 0:
        raise TooShortError("no audio frames decoded (empty stream)")
    n_out = output_samples(count.frames_in, hdr.sr_in)
    _check_min_samples(n_out, limits)
    warnings = [redact(w) for w in _length_warnings(hdr, count.frames_in)]
    return AudioScan(hdr.sr_in, hdr.ch, count.frames_in, n_out, n_out / TARGET_SR, warnings, hdr.fmt)


def stream_audio(
    data: _Source,
    expect_samples: int,
    limits: AudioLimits = AudioLimits(),
    block_frames: int = 65536,
    deadline_s: float | None = None,
    resample_quality: str = "HQ",
) -> Iterator[np.ndarray]:
    """The samples of :func:`decode_audio` piece by piece: (n,) float32 arrays at 24 kHz, each
    its own (never reused), whose concatenation is bit-identical to ``decode_audio(data).samples``.
    ``expect_samples``: the length :func:`scan_audio` found; a stream that ends at another length
    (the input changed between the passes) raises :class:`DecodeError` once it is over."""
    if block_frames < 1:
        raise ValueError(f"block_frames must be >= 1, got {block_frames}")
    t0 = time.monotonic()
    src, _nbytes, _desc = _prepare_source(data, limits)
    count = _Count()
    n = 0
    with _open(src) as f:
        hdr = _check_header(f, limits)
        for y in _resampled(f, hdr, limits, block_frames, t0, deadline_s, resample_quality, count):
            if y.shape[0]:
                n += y.shape[0]
                yield y.copy() if hdr.sr_in == TARGET_SR else y
    if n != expect_samples:
        raise DecodeError(
            f"the input changed while it was read: {n} samples decoded, {expect_samples} expected"
        )
