"""Audio decoding for the CPU data plane: any libsndfile format -> mono float32 at 24 kHz.

:func:`decode_audio` reads the input **by blocks** (``block_frames`` frames at a time),
downmixes every block to mono (mean over channels) and feeds it to a streaming
``soxr.ResampleStream`` (``HQ``), so the only full-length allocation is the output array.
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
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from pipeline.errors import DecodeError, TooShortError, redact

__all__ = ["TARGET_SR", "AudioLimits", "DecodedAudio", "decode_audio", "probe_audio", "AudioInfo"]

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
    """
    if block_frames < 1:
        raise ValueError(f"block_frames must be >= 1, got {block_frames}")
    t0 = time.monotonic()
    src, nbytes, _desc = _prepare_source(data, limits)
    warnings: list[str] = []
    with _open(src) as f:
        sr_in, ch, header_frames = int(f.samplerate), int(f.channels), int(f.frames)
        fmt = _header_format(f)
        # ---- header checks (before decoding anything) -------------------------------------
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

        # ---- output buffer --------------------------------------------------------------------
        ratio = TARGET_SR / sr_in
        expected_out = int(math.ceil(header_frames * ratio)) + 16 if header_known else 0
        budget = max(_PREALLOC_FREE_BYTES, _PREALLOC_MAX_RATIO * (nbytes or 0))
        if header_known and expected_out * 4 <= budget:
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

        resampler = (
            None
            if sr_in == TARGET_SR
            else soxr.ResampleStream(sr_in, TARGET_SR, 1, dtype="float32", quality=resample_quality)
        )
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
            if frames_in > max_frames_in:
                raise DecodeError(
                    f"audio longer than the limit of {_fmt_s(limits.max_duration_s)} s"
                    + (f" (header claimed {_fmt_s(header_frames / sr_in)} s)" if header_known else "")
                )
            m = mono[:n]  # (n,)
            if ch == 1:
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
            if bad == 0:
                _append(m if resampler is None else resampler.resample_chunk(m, last=False))
            if deadline_s is not None and time.monotonic() - t0 > deadline_s:
                raise DecodeError(
                    f"decode exceeded {deadline_s:g} s (stopped at {_fmt_s(frames_in / sr_in)} s of audio)"
                )
        if bad:
            raise DecodeError(
                f"{bad} non-finite (NaN/Inf) sample values, first at {_fmt_s(first_bad_s or 0.0)} s"
            )
        if resampler is not None:
            _append(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))

    claimed = max(header_frames if header_known else 0, claimed_frames or 0)
    if claimed > frames_in:
        warnings.append(f"header claimed {_fmt_s(claimed / sr_in)} s, decoded {_fmt_s(frames_in / sr_in)} s")
    if frames_in == 0:
        raise TooShortError("no audio frames decoded (empty stream)")
    if n_out < limits.min_samples:
        raise TooShortError(
            f"audio is {n_out} samples at {TARGET_SR} Hz ({_fmt_s(n_out / TARGET_SR)} s), "
            f"shorter than the minimum of {limits.min_samples} samples"
        )
    if cap != n_out:
        out.resize(n_out, refcheck=False)  # shrink in place (realloc), no second full-length copy
    assert out.flags.c_contiguous and out.dtype == np.float32
    return DecodedAudio(
        samples=out,
        sample_rate_in=sr_in,
        channels_in=ch,
        duration_s=n_out / TARGET_SR,
        warnings=[redact(w) for w in warnings],
        frames_in=frames_in,
        format=fmt,
    )
