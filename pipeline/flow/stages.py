"""Ray Data stages: small callable classes over pyarrow batches.

    catalog rows ──DecodeStage (CPU actors)──▶ window rows (audio) | error rows
                 ──EmbedStage (GPU actors)───▶ window rows (pooled vectors) | error rows
                 ──ChunkWriter (CPU actors)──▶ windows / frames data files per chunk (ToWindows,
                                               ToFrames; the pass is pipeline.flow.streaming)
    on the driver, per complete chunk: ToTrack ──▶ its ``tracks`` rows (token-weighted means)

Every stage turns a failure of one record into an error row (stage, error_type, message) and
keeps going; nothing is dropped silently. Rows between stages follow ``schemas.task_schema``.
:class:`DecodeStage` lives in :mod:`pipeline.flow.decode` (re-exported here); data files are
written and their fragments serialised through :mod:`pipeline.store.tables`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import schemas
from pipeline.engine.inference import EmbedSettings, WindowEmbedder, load_model, track_mean
from pipeline.flow.decode import DecodeStage, audio_array, audio_views, error_row
from pipeline.flow.guard import ModelGuard, check_finite_table
from pipeline.store.tables import fragments_from_json, fragments_to_json, write_fragments

#: Re-exported: the stages of the data path are named from here (``pipeline.flow.streaming``).
__all__ = ["ChunkWriter", "DecodeStage", "EmbedStage", "StageTimes", "ToFrames", "ToTrack", "ToWindows",
           "audio_array", "audio_views", "only_kind", "without_frames"]  # fmt: skip


class EmbedStage:
    """Window rows with audio -> window rows with per-layer pooled vectors (audio dropped).

    Loads the model once per actor (GPU when the actor has one, else CPU) and batches windows of
    equal length. Failures follow :mod:`pipeline.flow.guard`: a window that fails alone, or whose
    output is not finite, becomes an error row; a fault of the system stops the run.
    """

    def __init__(
        self,
        model_args: dict[str, Any],
        settings: EmbedSettings,
        batch_size: int | None,
        dim: int,
        cpu_threads: int | None = None,
    ) -> None:
        self.model = load_model(**model_args)
        if cpu_threads and self.model.device.type == "cpu":  # the CPUs this actor reserved, not all cores
            import torch

            torch.set_num_threads(cpu_threads)
        self.settings = settings
        self.embedder = WindowEmbedder(self.model, settings, max_batch=batch_size)
        self.guard = ModelGuard(self.embedder)
        self.dim = dim
        self.schema = schemas.embedded_schema(settings.layers, dim, frames=settings.frames_hz is not None)

    def __call__(self, batch: pa.Table) -> pa.Table:
        # the samples stay in the block's buffer (views, no copy); only the small columns become rows
        samples = audio_views(batch.column("audio"))
        rows = batch.drop_columns(["audio"]).to_pylist()
        todo = [i for i, r in enumerate(rows) if r["kind"] == "window"]
        t0 = self.embedder.model_seconds
        outcomes = self.guard.run([samples[i] for i in todo])
        results: dict[int, Any] = {}
        for i, res in zip(todo, outcomes, strict=True):
            if isinstance(res, BaseException):
                rows[i] = error_row(rows[i], "model", res)
            else:
                results[i] = res
        spent = (self.embedder.model_seconds - t0) / max(1, len(results))
        del samples
        return _embedded_table([self._fill(r, results.get(i), spent) for i, r in enumerate(rows)],
                               self.schema, self.settings.layers, self.dim)  # fmt: skip

    def _fill(self, r: dict[str, Any], res: Any, spent: float) -> dict[str, Any]:
        """Row ``r`` with the pooled vectors (and frames) of ``res``, or with nulls for none."""
        layers, frames = self.settings.layers, bool(self.settings.frames_hz)
        r.setdefault("model_s", None)
        if res is None:
            r["n_tokens"] = None
            for lay in layers:
                r[schemas.layer_column(lay)] = None
                if frames:
                    r["frames_" + schemas.layer_column(lay)] = None
            if frames:
                r["frame_times"] = None
            return r
        r["model_s"], r["n_tokens"] = spent, res.n_tokens
        for lay in layers:
            r[schemas.layer_column(lay)] = res.means[lay]
        if frames:
            t = res.frame_times + r["start_s"]
            keep = (t >= r["own_start_s"]) & (t < r["own_end_s"])
            r["frame_times"] = t[keep].tolist()
            for lay in layers:
                r["frames_" + schemas.layer_column(lay)] = res.frames[lay][keep].reshape(-1)
        return r


def _embedded_table(
    rows: list[dict[str, Any]], schema: pa.Schema, layers: Sequence[int], dim: int
) -> pa.Table:
    cols: dict[str, Any] = {}
    for f in schema:
        vals = [r.get(f.name) for r in rows]
        if f.name.startswith("layer_"):
            flat = (
                np.concatenate(
                    [np.asarray(v, np.float32) if v is not None else np.zeros(dim, np.float32) for v in vals]
                )
                if vals
                else np.zeros(0, np.float32)
            )
            arr = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
            mask = pa.array([v is None for v in vals])
            cols[f.name] = (
                pa.compute.if_else(mask, pa.scalar(None, f.type), arr)
                if any(v is None for v in vals)
                else arr
            )
        elif f.name.startswith("frames_layer_"):
            cols[f.name] = pa.array([None if v is None else np.asarray(v, np.float32) for v in vals], f.type)
        else:
            cols[f.name] = pa.array(vals, f.type)
    return pa.table(cols, schema=schema)


# --------------------------------------------------------------------------- splitting and writing


def only_kind(batch: pa.Table, kind: str) -> pa.Table:
    return batch.filter(pa.compute.equal(batch["kind"], kind))


class ToWindows:
    """Embedded window rows -> ``windows`` table rows."""

    def __init__(self, layers: Sequence[int], dim: int, settings_id: str, run_id: str) -> None:
        self.schema = schemas.windows_schema(layers, dim)
        self.settings_id, self.run_id = settings_id, run_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        b = only_kind(batch, "window")
        n = b.num_rows
        cols = {
            "track_id": b["track_id"],
            "window_ix": b["window_ix"],
            "start_s": b["start_s"],
            "end_s": b["end_s"],
            **{f.name: b[f.name] for f in self.schema if f.name.startswith("layer_")},
            "settings_id": pa.array([self.settings_id] * n, pa.string()),
            "run_id": pa.array([self.run_id] * n, pa.string()),
        }
        return pa.table(cols, schema=self.schema)


class ToFrames:
    """Embedded window rows -> ``frames`` rows (one per output frame; overlaps removed upstream)."""

    def __init__(
        self, layers: Sequence[int], dim: int, frames_hz: float, settings_id: str, run_id: str
    ) -> None:
        self.layers, self.dim, self.hz = list(layers), dim, frames_hz
        self.schema = schemas.frames_schema(layers, dim)
        self.settings_id, self.run_id = settings_id, run_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        b = only_kind(batch, "window").to_pylist()
        tid, fix, times = [], [], []
        vecs: dict[int, list[np.ndarray]] = {lay: [] for lay in self.layers}
        for r in b:
            t = np.asarray(r["frame_times"], np.float64)
            tid += [r["track_id"]] * len(t)
            # frame index of a centre time; the tolerance keeps 0.7999999 s at 5 Hz in frame 4, not 3
            fix += np.floor(t * self.hz + 1e-6).astype(np.int64).tolist()
            times += t.tolist()
            for lay in self.layers:
                vecs[lay].append(
                    np.asarray(r["frames_" + schemas.layer_column(lay)], np.float32).reshape(-1, self.dim)
                )
        n = len(tid)
        cols: dict[str, Any] = {
            "track_id": pa.array(tid, pa.string()),
            "frame_ix": pa.array(fix, pa.int32()),
            "time_s": pa.array(times, pa.float64()),
        }
        for lay in self.layers:
            flat = np.concatenate(vecs[lay]).reshape(-1) if vecs[lay] else np.zeros(0, np.float32)
            cols[schemas.layer_column(lay)] = pa.FixedSizeListArray.from_arrays(
                pa.array(flat, pa.float32()), self.dim
            )
        cols["settings_id"] = pa.array([self.settings_id] * n, pa.string())
        cols["run_id"] = pa.array([self.run_id] * n, pa.string())
        return pa.table(cols, schema=self.schema)


class ToTrack:
    """All embedded windows of one track (a group) -> one ``tracks`` row: token-weighted mean per layer."""

    def __init__(
        self,
        layers: Sequence[int],
        dim: int,
        metadata: Sequence[str],
        model_id: str,
        settings_id: str,
        run_id: str,
        embedded_at: Any,
    ) -> None:
        self.layers, self.dim, self.metadata = list(layers), dim, list(metadata)
        self.schema = schemas.tracks_schema(layers, dim, metadata)
        self.model_id, self.settings_id, self.run_id, self.embedded_at = (
            model_id,
            settings_id,
            run_id,
            embedded_at,
        )

    def as_function(self):
        """A plain function (``map_groups`` wants a named callable, not an instance)."""

        def to_track(group: pa.Table) -> pa.Table:
            return self(group)

        return to_track

    def __call__(self, group: pa.Table) -> pa.Table:
        g = only_kind(group, "window")
        if g.num_rows == 0:
            return self.schema.empty_table()
        rows = sorted(g.to_pylist(), key=lambda r: r["window_ix"])
        first = rows[0]
        meta = json.loads(first["metadata_json"] or "{}")
        out: dict[str, Any] = {
            "track_id": first["track_id"],
            "uri": first["uri"],
            "content_version": first["content_version"],
            "duration_s": first["duration_s"],
            "sample_rate_in": first["sample_rate_in"],
            "channels_in": first["channels_in"],
            "num_windows": len(rows),
            **{m: meta.get(m) for m in self.metadata},
            "warnings": first["warnings"],
            "model_id": self.model_id,
            "settings_id": self.settings_id,
            "run_id": self.run_id,
            "embedded_at": self.embedded_at,
        }
        tokens = [r["n_tokens"] for r in rows]
        for lay in self.layers:
            out[schemas.layer_column(lay)] = track_mean([r[schemas.layer_column(lay)] for r in rows], tokens)
        if len(rows) != first["num_windows"]:  # some windows failed in the model stage
            return self.schema.empty_table()
        cols = {}
        for f in self.schema:
            v = out[f.name]
            if f.name.startswith("layer_"):
                cols[f.name] = pa.FixedSizeListArray.from_arrays(
                    pa.array(np.asarray(v, np.float32)), self.dim
                )
            else:
                cols[f.name] = pa.array([v], f.type)
        return pa.table(cols, schema=self.schema)


class StageTimes:
    """Per-track totals used for the run report (decode and model seconds, audio seconds)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        b = only_kind(batch, "window")
        return pa.table(
            {
                "track_id": b["track_id"],
                "window_ix": b["window_ix"],
                "duration_s": b["duration_s"],
                "decode_s": b["decode_s"],
                "model_s": b["model_s"],
                "num_windows": b["num_windows"],
            }
        )


def without_frames(batch: pa.Table) -> pa.Table:
    """Embedded rows without the frame-level columns (what a track row is made of)."""
    return batch.select([n for n in batch.schema.names if n != "frame_times" and not n.startswith("frames_")])


class ChunkWriter:
    """Embedded rows -> the data files of their ``windows`` (and ``frames``) rows, written here in
    the worker per commit group (``chunk``), plus what the driver needs to commit them.

    Output: one row per chunk present in the block (:data:`schemas.CHUNK_PART_SCHEMA`): the
    fragment metadata of each table (Lance's ``FragmentMetadata.to_json``, as JSON text) (data files only, invisible until the driver commits
    them) and the block's rows of that chunk without frames (window rows with their pooled vectors,
    and error rows) as Arrow IPC bytes, from which the driver makes the ``tracks`` rows.
    """

    def __init__(
        self,
        windows_uri: str,
        frames_uri: str | None,
        layers: Sequence[int],
        dim: int,
        frames_hz: float | None,
        settings_id: str,
        run_id: str,
        storage_options: dict[str, str] | None,
    ) -> None:
        if (frames_uri is None) != (frames_hz is None):
            raise ValueError("frames_uri and frames_hz go together")
        self.windows_uri, self.frames_uri, self.storage_options = windows_uri, frames_uri, storage_options
        self.to_windows = ToWindows(layers, dim, settings_id, run_id)
        self.to_frames = ToFrames(layers, dim, frames_hz, settings_id, run_id) if frames_hz else None

    def _write(self, uri: str, tbl: pa.Table) -> str:
        if not tbl.num_rows:
            return "[]"
        check_finite_table(tbl, uri.rstrip("/").rsplit("/", 1)[-1])
        return fragments_to_json(write_fragments(uri, tbl, self.storage_options))

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for c in pa.compute.unique(batch["chunk"]).to_pylist():
            if c is None:
                raise ValueError("ChunkWriter got rows without a chunk")
            sub = batch.filter(pa.compute.equal(batch["chunk"], c))
            rows = without_frames(sub)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, rows.schema) as w:
                w.write_table(rows)
            out.append(
                {
                    "chunk": c,
                    "rows": sink.getvalue().to_pybytes(),
                    "windows_fragments": self._write(self.windows_uri, self.to_windows(sub)),
                    "frames_fragments": (
                        self._write(self.frames_uri, self.to_frames(sub)) if self.to_frames else None
                    ),
                }
            )
        return pa.Table.from_pylist(out, schema=schemas.CHUNK_PART_SCHEMA)

    @staticmethod
    def read_part(part: dict[str, Any]) -> tuple[pa.Table, list[Any], list[Any]]:
        """Driver side: (rows, windows fragments, frames fragments) of one output row."""
        rows = pa.ipc.open_stream(part["rows"]).read_all()
        return (
            rows,
            fragments_from_json(part["windows_fragments"]),
            fragments_from_json(part["frames_fragments"]),
        )
