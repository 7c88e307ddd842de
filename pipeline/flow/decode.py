"""The decode stage of the Ray data path: catalog rows -> window rows with their audio (or error
rows), and the Arrow layout of the audio column (:func:`audio_array`, :func:`audio_views`) that the
model stage (:class:`pipeline.flow.stages.EmbedStage`) reads without a copy.

Split out of :mod:`pipeline.flow.stages`, which re-exports :class:`DecodeStage`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import schemas
from pipeline.engine.inference import EmbedSettings, frame_ownership
from pipeline.errors import FetchError, PipelineError, WorkerCrashed, error_type, redact
from pipeline.io.audio import AudioLimits, decode_audio, probe_audio, scan_audio, stream_audio
from pipeline.io.objects import fetch_object, object_info, open_uri, version_from_info
from pipeline.io.windows import WindowCutter, plan_windows

_DECODE_COLS = [f.name for f in schemas.TASK_BASE_FIELDS]


def error_row(row: dict[str, Any], stage: str, exc: BaseException) -> dict[str, Any]:
    """The error row of ``row`` (a catalog or window row) failed in ``stage`` by ``exc`` (message redacted)."""
    msg = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    out = {name: None for name in _DECODE_COLS}
    out.update(
        kind="error",
        track_id=row.get("track_id"),
        uri=redact(row["uri"]) if row.get("uri") else row.get("uri"),  # error rows never keep a secret
        stage=stage,
        error_type=error_type(exc),
        message=msg[:2000],
        chunk=row.get("chunk"),
        # a window's error (model stage) says which window of how many: the track is complete
        # (and failed) once every window is accounted for
        window_ix=row.get("window_ix"),
        num_windows=row.get("num_windows"),
    )
    return out


class DecodeStage:
    """Catalog rows (track_id, uri, metadata_json) -> one row per window with its audio, or an error row.

    Blocks of at most ``WINDOWS_PER_BLOCK`` windows go out as the track is read. A track whose
    header says it is longer than ``STREAM_ABOVE_S`` (or does not say) is never held whole: it is
    decoded twice, first to the end for its length and checks (:func:`scan_audio`; the window plan
    needs the length), then piece by piece, its windows cut as they arrive (:class:`WindowCutter`),
    so this process holds one block of windows plus one piece of audio however long the file is.
    The windows and their samples are the same either way. A local file is read from disk; a
    remote object's encoded bytes are fetched whole into memory when they are at most
    ``SPOOL_ABOVE_BYTES`` (31 MB is 10 minutes of 24 kHz mono FLAC), else copied block by block
    into a local scratch file that is decoded like a local one and removed after the track
    (:func:`pipeline.io.objects.fetch_object`). After a streamed track, or one over ``TRIM_ABOVE_BYTES`` decoded, the heap is handed back to the OS (``malloc_trim``).

    Poison files: with ``attempts_dir`` set, a marker file per track is written before the track
    is read and removed once it is done. If the worker process dies meanwhile (a segfault in a
    decoder library, an OOM kill), Ray restarts the actor and retries the batch; the marker
    then counts the deaths, and after ``max_crashes`` the track becomes a ``WorkerCrashed``
    error row instead of killing the worker again (Ray's own retries are bounded, so without
    this one poison file would fail the whole run). Use one directory per run.
    """

    WINDOWS_PER_BLOCK = 16
    #: Tracks longer than this (by their header) are streamed: 20 min of 24 kHz float32 is 115 MB.
    STREAM_ABOVE_S = 20 * 60.0
    #: After a track whose decoded samples took this much, the heap is trimmed (``malloc_trim``):
    #: the workers' allocator keeps freed memory otherwise (64 MB: 11 min at 24 kHz).
    TRIM_ABOVE_BYTES = 64 * 1024**2
    #: Remote objects larger than this are spooled to a local file, not held in memory.
    SPOOL_ABOVE_BYTES = 32 * 1024**2

    def __init__(
        self,
        settings: EmbedSettings,
        limits: AudioLimits,
        storage_options: dict | None,
        decode_timeout_s: float | None = None,
        attempts_dir: str | None = None,
        max_crashes: int = 2,
        niceness: int = 0,
    ) -> None:
        if (
            niceness > 0
        ):  # below a model computing on the same cores (see pipeline.flow.runtime.cpu_model_plan)
            with contextlib.suppress(OSError, AttributeError):  # an actor has its own process
                os.nice(niceness)
        self.spec = settings.window_spec()
        self.limits = limits
        self.storage_options = storage_options
        self.decode_timeout_s = decode_timeout_s
        self.max_crashes = max_crashes
        self.attempts_dir = attempts_dir
        # this actor's scratch for spooled objects (one file at a time, removed after its track)
        self.spool_dir = os.path.join(tempfile.gettempdir(), "musicfm-spool", f"{os.getpid()}-{id(self):x}")
        self._spooled: list[str] = []
        if attempts_dir:
            try:
                os.makedirs(attempts_dir, exist_ok=True)
            except OSError:  # no local scratch space: decode without the guard
                self.attempts_dir = None

    def _marker(self, row: dict[str, Any]) -> str | None:
        if not self.attempts_dir:
            return None
        key = f"{row.get('track_id')}\0{row.get('uri')}".encode("utf-8", "surrogatepass")
        return os.path.join(self.attempts_dir, hashlib.sha256(key).hexdigest()[:32])

    def _guarded(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Every row of one track (:meth:`_guarded_blocks` joined)."""
        return [r for block in self._guarded_blocks(row) for r in block]

    def _guarded_blocks(self, row: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
        """:meth:`_one`, counting worker deaths on this row in its marker file."""
        marker = self._marker(row)
        if marker is None:
            yield from self._one(row)
            return
        try:
            with open(marker) as f:
                deaths = int(f.read().strip() or 0)
        except (OSError, ValueError):
            deaths = 0
        if deaths >= self.max_crashes:
            exc = WorkerCrashed(
                f"the decode worker died {deaths} times while reading this file "
                "(crash in the decoder, or killed for memory); skipped"
            )
            yield [error_row(row, "decode", exc)]
            return
        try:
            with open(marker, "w") as f:  # counts as a death unless removed below
                f.write(str(deaths + 1))
        except OSError:
            marker = None
        try:
            yield from self._one(row)
        finally:
            if marker is not None:
                with contextlib.suppress(OSError):
                    os.remove(marker)

    def _one(self, row: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
        """The blocks of rows of one track: its windows (at most ``WINDOWS_PER_BLOCK`` per block),
        or one error row; a spooled copy of its object is removed after it, whatever happened."""
        try:
            yield from self._track(row)
        finally:
            while self._spooled:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self._spooled.pop())

    def _track(self, row: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
        stage = "fetch"
        t0 = time.perf_counter()
        try:
            data, version = self._source(row)
            stage = "decode"
            if self._streams(data):
                yield from self._streamed(row, data, version, t0)
                return
            audio = decode_audio(data, self.limits, deadline_s=self.decode_timeout_s)
            del data
            wins = plan_windows(audio.samples.shape[0], self.spec)
        except PipelineError as e:
            yield [error_row(row, e.stage or stage, e)]
            return
        except Exception as e:  # an unexpected failure of one file must not stop the catalog
            yield [error_row(row, stage, e)]
            return
        facts = _TrackFacts(audio.samples.shape[0], audio.sample_rate_in, audio.channels_in, audio.warnings)
        try:
            # every window's samples, one after the other, in one buffer (one copy out of the
            # decoded track); each row's audio is a view of it, and the block tables reference
            # it without another copy (see _task_table)
            views = copy_windows(audio.samples, wins)
        except MemoryError as e:  # copying this track's windows ran out of memory: this track only
            yield [error_row(row, "decode", e)]
            return
        rows = self._window_rows(row, version, facts, wins, views, time.perf_counter() - t0)
        held = audio.samples.nbytes
        del audio, views
        for k in range(0, len(rows), self.WINDOWS_PER_BLOCK):
            yield rows[k : k + self.WINDOWS_PER_BLOCK]
        if held >= self.TRIM_ABOVE_BYTES:  # a long track's memory goes back to the OS now
            del rows
            trim_heap()

    def _source(self, row: dict[str, Any]) -> tuple[Any, str]:
        """(what to decode, content version): the path of a local file whose header says it is
        long (read from disk, twice), the path of a spooled copy of a remote object over
        ``SPOOL_ABOVE_BYTES`` (streamed the same way), else the object's bytes."""
        uri = row["uri"]
        local = uri[len("file://") :] if uri.startswith("file://") else uri
        if "://" not in local and os.path.isfile(local) and self._long(local):
            fs, path = open_uri(uri, self.storage_options)
            st = os.stat(local)
            if st.st_size > self.limits.max_bytes:  # the same check and message as a fetch
                raise FetchError(
                    f"object is {st.st_size} bytes, over the {self.limits.max_bytes}-byte limit: {uri}"
                )
            return local, version_from_info(object_info(fs, path), fs, path)
        remote = "://" in local
        data, version = fetch_object(
            uri,
            self.storage_options,
            self.limits.max_bytes,
            spool_dir=self.spool_dir if remote else None,
            spool_above=self.SPOOL_ABOVE_BYTES,
        )
        if isinstance(data, str):
            self._spooled.append(data)
        return data, version

    def _long(self, data: Any) -> bool:
        """Whether the header of ``data`` says it is over ``STREAM_ABOVE_S`` (or has no length).
        An unreadable header is the whole-file path's to report (its error row says why)."""
        try:
            info = probe_audio(io.BytesIO(data) if isinstance(data, bytes) else data, self.limits)
        except PipelineError:
            return False
        return not (0 < info.frames < (1 << 62)) or info.duration_s > self.STREAM_ABOVE_S

    def _streams(self, data: Any) -> bool:
        return isinstance(data, str) or self._long(data)

    def _streamed(
        self, row: dict[str, Any], data: Any, version: str, t0: float
    ) -> Iterator[list[dict[str, Any]]]:
        """The blocks of a long track, cut from :func:`stream_audio` as it decodes. The last block
        goes out once the stream has ended as the scan said (an input that changed meanwhile is
        an error row, and the windows already sent are then discarded with the failed track)."""
        deadline = self.decode_timeout_s
        scan = scan_audio(data, self.limits, deadline_s=deadline)
        wins = plan_windows(scan.num_samples, self.spec)
        facts = _TrackFacts(scan.num_samples, scan.sample_rate_in, scan.channels_in, scan.warnings)
        left = None if deadline is None else max(0.0, deadline - (time.perf_counter() - t0))
        cutter = WindowCutter(stream_audio(data, scan.num_samples, self.limits, deadline_s=left))
        try:
            for k in range(0, len(wins), self.WINDOWS_PER_BLOCK):
                part = wins[k : k + self.WINDOWS_PER_BLOCK]
                flat = np.empty(sum(w.length for w in part), dtype=np.float32)  # (block samples,)
                views, at = [], 0
                for w in part:
                    cutter.copy_into(w, flat[at : at + w.length])
                    views.append(flat[at : at + w.length])
                    at += w.length
                block = self._window_rows(row, version, facts, part, views, time.perf_counter() - t0)
                del flat, views
                t0 = time.perf_counter()
                if k + self.WINDOWS_PER_BLOCK >= len(wins):
                    cutter.drain()  # the last block waits for the stream's own end check
                yield block
                del block
        except (PipelineError, MemoryError, ValueError) as e:
            yield [error_row(row, "decode", e)]
        finally:
            trim_heap()

    def _window_rows(
        self,
        row: dict[str, Any],
        version: str,
        facts: _TrackFacts,
        wins: Sequence[Any],
        views: Sequence[np.ndarray],
        decode_s: float,
    ) -> list[dict[str, Any]]:
        """The rows of ``wins`` (some windows of one track, ``views`` their samples); ``decode_s``
        (the time spent on them) is shared among them."""
        sr = self.spec.sample_rate
        n = facts.num_samples
        all_wins = plan_windows(n, self.spec)
        own = dict(zip((w.ix for w in all_wins), frame_ownership(all_wins, n), strict=True))
        warnings = "; ".join(facts.warnings) or None
        rows = []
        for w, samples in zip(wins, views, strict=True):
            o0, o1 = own[w.ix]
            rows.append(
                {
                    "kind": "window",
                    "track_id": row["track_id"],
                    "uri": row["uri"],
                    "metadata_json": row.get("metadata_json"),
                    "content_version": row.get("content_version") or version,  # the catalog's, if stated
                    "duration_s": n / sr,
                    "sample_rate_in": facts.sample_rate_in,
                    "channels_in": facts.channels_in,
                    "num_windows": len(all_wins),
                    "warnings": warnings,
                    "window_ix": w.ix,
                    "start_s": w.start / sr,
                    "end_s": w.end / sr,
                    "own_start_s": o0 / sr,
                    "own_end_s": o1 / sr,
                    "audio": samples,
                    "decode_s": decode_s / len(wins),
                    "stage": None,
                    "error_type": None,
                    "message": None,
                    "chunk": row.get("chunk"),
                }
            )
        return rows

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        # Yield bounded blocks: a 2-hour track becomes many ~50 MB blocks, not one 700 MB block.
        for row in batch.to_pylist():
            for rows in self._guarded_blocks(row):
                table = _task_table(rows)
                del rows  # one block at a time: nothing here holds the previous one
                yield table
                del table


@dataclass(frozen=True)
class _TrackFacts:
    """What the rows of a track say about all of it."""

    num_samples: int  # at 24 kHz
    sample_rate_in: int
    channels_in: int
    warnings: list[str]


def trim_heap() -> bool:
    """Hand the free memory of this process's heap back to the OS (glibc ``malloc_trim``; the
    workers' allocator keeps it otherwise, see ``pipeline.flow.runtime.WORKER_MALLOC_TUNABLES``).
    False where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl, macOS: no malloc_trim
        return False
    trim(0)
    return True


def copy_windows(samples: np.ndarray, wins: Sequence[Any]) -> list[np.ndarray]:
    """The samples of every window of ``wins`` (float32), copied once into one buffer in order:
    one view of it per window, consecutive in memory."""
    flat = np.empty(sum(w.length for w in wins), dtype=np.float32)
    views = []
    at = 0
    for w in wins:
        flat[at : at + w.length] = samples[w.start : w.end]
        views.append(flat[at : at + w.length])
        at += w.length
    return views


_TASK_META_SCHEMA = pa.schema(list(schemas.TASK_BASE_FIELDS))


def _task_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows of :data:`schemas.TASK_SCHEMA` (``audio``: a float32 array, bytes or None) as a table
    whose ``audio`` column holds the samples' bytes without a per-row Python ``bytes`` object:
    the windows of one track are consecutive views of one buffer, which becomes the column's data
    buffer as it is (no copy); other inputs are joined into one buffer (one copy)."""
    meta = pa.Table.from_pylist(
        [{k: v for k, v in r.items() if k != "audio"} for r in rows], schema=_TASK_META_SCHEMA
    )
    return meta.append_column(schemas.TASK_SCHEMA.field("audio"), audio_array([r.get("audio") for r in rows]))


def audio_array(values: Sequence[np.ndarray | bytes | None]) -> pa.Array:
    """A ``large_binary`` array of the raw bytes of ``values`` (float32 arrays, bytes, or None)."""
    n = len(values)
    arrays = [None if v is None else np.frombuffer(v, np.uint8) if isinstance(v, bytes | bytearray)
              else np.asarray(v, np.float32).reshape(-1).view(np.uint8) for v in values]  # fmt: skip
    lengths = np.array([0 if a is None else a.nbytes for a in arrays], dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    present = [a for a in arrays if a is not None and a.nbytes]
    data = _contiguous(present)
    if data is None:
        data = np.concatenate(present) if present else np.zeros(0, np.uint8)
    validity = None
    nulls = sum(a is None for a in arrays)
    if nulls:
        validity = pa.array([a is not None for a in arrays], pa.bool_()).buffers()[1]
    return pa.Array.from_buffers(
        pa.large_binary(), n, [validity, pa.py_buffer(offsets), pa.py_buffer(data)], null_count=nulls
    )


def _contiguous(arrays: Sequence[np.ndarray]) -> np.ndarray | None:
    """One uint8 view spanning ``arrays`` when they follow each other in memory (views of one
    buffer, in order), else None."""
    if not arrays:
        return None
    if len(arrays) == 1:
        return arrays[0]
    first = arrays[0]
    start = first.__array_interface__["data"][0]
    at = start
    for a in arrays:
        if not a.flags.c_contiguous or a.__array_interface__["data"][0] != at:
            return None
        at += a.nbytes
    base = first
    while isinstance(base.base, np.ndarray):
        base = base.base
    lo = base.__array_interface__["data"][0]
    if not base.flags.c_contiguous or start < lo or at > lo + base.nbytes:
        return None
    return base.reshape(-1).view(np.uint8)[start - lo : at - lo]


def audio_views(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray | None]:
    """The float32 samples of each row of an ``audio`` (binary) column, as read-only views of the
    column's buffer (no copy); None for a null."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out: list[np.ndarray | None] = []
    for c in chunks:
        n = len(c)
        if not n:
            continue
        _validity, offs, data = c.buffers()
        width = 8 if pa.types.is_large_binary(c.type) else 4
        offsets = np.frombuffer(
            offs, dtype=np.int64 if width == 8 else np.int32, count=n + 1, offset=c.offset * width
        )
        valid = c.is_valid().to_numpy(zero_copy_only=False) if c.null_count else None
        for i in range(n):
            if valid is not None and not valid[i]:
                out.append(None)
                continue
            a, b = int(offsets[i]), int(offsets[i + 1])
            out.append(np.frombuffer(data, dtype=np.float32, count=(b - a) // 4, offset=a))
    return out
