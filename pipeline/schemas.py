"""Arrow schemas of every table in the embedding store, declared once.

Store layout under the store root (local path or ``s3://...``)::

    tracks.lance   one row per track (unique track_id), one vector column per layer
    windows.lance  one row per (track_id, window_ix)
    frames.lance   one row per (track_id, frame_ix), only when frame output was asked for
    errors.lance   one row per failed record (track_id, uri, stage, error_type, message)
    runs.lance     one row per job run (arguments, counts, timings, status)
    _refresh_lock.lance  the writers' lease (one row, :data:`LOCK_SCHEMA`)

Also declared here: the in-flight schemas of the Ray stages (task, embedded, chunk parts) and
the driver's lookup table of object versions.

Vector columns are named ``layer_{ix}`` and typed ``fixed_size_list<float32, D>``.
Catalog metadata columns (title, artist, ...) are carried into ``tracks`` as nullable strings.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

import pyarrow as pa

TABLES = ("tracks", "windows", "frames", "errors", "runs")

# Columns a catalog may not use for metadata (they are written by the pipeline).
RESERVED_COLUMNS = frozenset(
    {
        "track_id",
        "uri",
        "content_version",
        "duration_s",
        "sample_rate_in",
        "channels_in",
        "num_windows",
        "model_id",
        "settings_id",
        "run_id",
        "embedded_at",
        "window_ix",
        "start_s",
        "end_s",
        "frame_ix",
        "time_s",
        "stage",
        "error_type",
        "message",
        "warnings",
    }
)

TIMESTAMP = pa.timestamp("us", tz="UTC")

#: Columns of ``tracks`` the pipeline writes itself (besides the ``layer_{ix}`` vectors); every
#: other column of a tracks table is catalog metadata.
TRACK_FIXED_COLUMNS = frozenset(
    {
        "track_id", "uri", "content_version", "duration_s", "sample_rate_in", "channels_in", "num_windows",
        "warnings", "model_id", "settings_id", "run_id", "embedded_at",
    }
)  # fmt: skip


def utc_now() -> dt.datetime:
    """The current time for :data:`TIMESTAMP` columns (timezone-aware UTC)."""
    return dt.datetime.now(dt.timezone.utc)


def layer_column(ix: int) -> str:
    """Name of the vector column for hidden-state ``ix``."""
    return f"layer_{int(ix)}"


def parse_layer_column(name: str) -> int | None:
    """Inverse of :func:`layer_column`; ``None`` for a non-vector column."""
    if name.startswith("layer_") and name[6:].isdigit():
        return int(name[6:])
    return None


def vector_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), int(dim))


def _vector_fields(layers: Sequence[int], dim: int) -> list[pa.Field]:
    return [pa.field(layer_column(ix), vector_type(dim), nullable=False) for ix in layers]


def tracks_schema(layers: Sequence[int], dim: int, metadata: Iterable[str] = ()) -> pa.Schema:
    meta = [pa.field(m, pa.string()) for m in metadata]
    return pa.schema(
        [
            pa.field("track_id", pa.string(), nullable=False),
            pa.field("uri", pa.string(), nullable=False),
            pa.field("content_version", pa.string()),
            pa.field("duration_s", pa.float64()),
            pa.field("sample_rate_in", pa.int32()),
            pa.field("channels_in", pa.int32()),
            pa.field("num_windows", pa.int32()),
            *meta,
            *_vector_fields(layers, dim),
            pa.field("warnings", pa.string()),
            pa.field("model_id", pa.string(), nullable=False),
            pa.field("settings_id", pa.string(), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("embedded_at", TIMESTAMP),
        ]
    )


def windows_schema(layers: Sequence[int], dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("track_id", pa.string(), nullable=False),
            pa.field("window_ix", pa.int32(), nullable=False),
            pa.field("start_s", pa.float64()),
            pa.field("end_s", pa.float64()),
            *_vector_fields(layers, dim),
            pa.field("settings_id", pa.string(), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
        ]
    )


def frames_schema(layers: Sequence[int], dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("track_id", pa.string(), nullable=False),
            pa.field("frame_ix", pa.int32(), nullable=False),
            pa.field("time_s", pa.float64()),
            *_vector_fields(layers, dim),
            pa.field("settings_id", pa.string(), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
        ]
    )


ERRORS_SCHEMA = pa.schema(
    [
        pa.field("track_id", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("recorded_at", TIMESTAMP),
    ]
)

RUNS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # "embed" | "refresh"
        pa.field("status", pa.string(), nullable=False),  # "ok" | "failed" | "partial"
        pa.field("started_at", TIMESTAMP),
        pa.field("finished_at", TIMESTAMP),
        pa.field("args_json", pa.string()),  # arguments with secrets redacted
        pa.field("model_id", pa.string()),
        pa.field("settings_id", pa.string()),
        pa.field("tracks_ok", pa.int64()),
        pa.field("tracks_failed", pa.int64()),
        pa.field("windows", pa.int64()),
        pa.field("audio_hours", pa.float64()),
        pa.field("wall_s", pa.float64()),
        pa.field("x_realtime", pa.float64()),
        pa.field("stage_times_json", pa.string()),
        pa.field("report_json", pa.string()),  # free-form extra figures (plan counts, retries, versions)
    ]
)


# --------------------------------------------------------------------------- rows between stages
# Internal: the rows flowing between Ray Data stages (not stored). kind = "window" | "error".

TASK_BASE_FIELDS = (
    pa.field("kind", pa.string()),
    pa.field("track_id", pa.string()),
    pa.field("uri", pa.string()),
    pa.field("metadata_json", pa.string()),
    pa.field("content_version", pa.string()),
    pa.field("duration_s", pa.float64()),
    pa.field("sample_rate_in", pa.int32()),
    pa.field("channels_in", pa.int32()),
    pa.field("num_windows", pa.int32()),
    pa.field("warnings", pa.string()),
    pa.field("window_ix", pa.int32()),
    pa.field("start_s", pa.float64()),
    pa.field("end_s", pa.float64()),
    pa.field("own_start_s", pa.float64()),  # part of the window whose frames are kept (overlaps removed)
    pa.field("own_end_s", pa.float64()),
    pa.field("decode_s", pa.float64()),
    pa.field("stage", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("message", pa.string()),
    pa.field("chunk", pa.int32()),  # commit group of the track (refresh); null in the embed job
)

# Decode output: the window's mono float32 samples at 24 kHz as raw bytes.
TASK_SCHEMA = pa.schema([*TASK_BASE_FIELDS, pa.field("audio", pa.large_binary())])


def embedded_schema(layers: Sequence[int], dim: int, frames: bool = False) -> pa.Schema:
    """Model-stage output: pooled vector per layer (mean over the window's tokens), token count."""
    fields = [*TASK_BASE_FIELDS, pa.field("model_s", pa.float64()), pa.field("n_tokens", pa.int32())]
    fields += [pa.field(layer_column(ix), vector_type(dim)) for ix in layers]
    if frames:
        fields.append(pa.field("frame_times", pa.list_(pa.float64())))
        fields += [pa.field("frames_" + layer_column(ix), pa.list_(pa.float32())) for ix in layers]
    return pa.schema(fields)


# Output of the ChunkWriter stage: per chunk present in a block, its uncommitted data
# files (Lance FragmentMetadata.to_json, as JSON text) and its rows without frames (Arrow IPC bytes).
CHUNK_PART_SCHEMA = pa.schema(
    [
        pa.field("chunk", pa.int32(), nullable=False),
        pa.field("rows", pa.large_binary(), nullable=False),
        pa.field("windows_fragments", pa.large_string(), nullable=False),  # FragmentMetadata.to_json list
        pa.field("frames_fragments", pa.large_string()),
    ]
)


def metadata_columns(schema: pa.Schema) -> list[str]:
    """Catalog metadata columns of a ``tracks`` schema, in table order."""
    return [
        f.name
        for f in schema
        if f.name not in TRACK_FIXED_COLUMNS
        and parse_layer_column(f.name) is None
        and not is_derived_column(f.name)  # predictions / map: not catalog metadata
    ]


#: Name of the lease table (``_refresh_lock.lance``) and its one row.
LOCK_TABLE = "_refresh_lock"
LOCK_SCHEMA = pa.schema(
    [
        pa.field("state", pa.string(), nullable=False),  # "held" | "released"
        pa.field("holder", pa.string()),  # run_id of the holder
        pa.field("token", pa.string()),  # random per acquisition
        pa.field("host", pa.string()),
        pa.field("pid", pa.int64()),
        pa.field("proc_start", pa.string()),  # the holder process's start time (Linux /proc), pid reuse guard
        pa.field("ray_session", pa.string()),  # the Ray cluster session of the holder's driver
        pa.field("ray_job", pa.string()),  # the holder driver's Ray job id (hex)
        pa.field("acquired_at", TIMESTAMP),
        pa.field("heartbeat_at", TIMESTAMP),
        pa.field("expires_at", TIMESTAMP),
    ]
)

#: Object versions looked up for a refresh plan (one row per catalog row).
LOOKUP_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("content_version", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)


#: Catalog rows as the Ray plan reads them (:mod:`pipeline.flow.catalog_rows`): one per data row,
#: checked (URI policy, ids, row limit); a rejected row has ``error_type`` / ``message``.
#: ``row_key`` orders rows in catalog order (part << 40 | row) for the duplicate policy.
CATALOG_ROWS_SCHEMA = pa.schema(
    [
        ("row_key", pa.int64()),
        ("row", pa.int64()),
        ("track_id", pa.string()),
        ("uri", pa.string()),
        ("metadata_json", pa.string()),
        ("content_version", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)

#: One row per track of a refresh plan made by Ray (:mod:`pipeline.runs.ray_plan`): ``kind`` is a
#: :data:`pipeline.runs.plan.PLAN_KINDS` value; ``group`` / ``seq`` number the rows to embed
#: (per map call) so that the driver can cut them into chunks without holding them.
PLAN_ROWS_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("track_id", pa.string()),
        ("uri", pa.string()),
        ("metadata_json", pa.string()),
        ("content_version", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("group", pa.int64()),
        ("seq", pa.int64()),
    ]
)


# --------------------------------------------------------------------------- derived data (insights)
# Columns that jobs other than embed/refresh add to ``tracks`` (pipeline/insights): probe predictions
# ``tag_<name>...`` and the catalog map ``map_x`` / ``map_y``. They are not catalog metadata: a
# refresh leaves them as they are on unchanged tracks and writes nulls on new ones.
DERIVED_PREFIXES = ("tag_", "map_")


def is_derived_column(name: str) -> bool:
    """True for a column of ``tracks`` written by the insights jobs (predictions, map)."""
    return name.startswith(DERIVED_PREFIXES)


# duplicates.lance: one row per matched pair (an edge of a duplicate group), rewritten per run.
DUPLICATES_SCHEMA = pa.schema(
    [
        pa.field("group_id", pa.string(), nullable=False),  # smallest track_id of the group
        pa.field("track_id", pa.string(), nullable=False),
        pa.field("match_track_id", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),  # cosine (window level: mean over matched windows)
        pa.field("level", pa.string(), nullable=False),  # "track" | "window"
        pa.field("layer", pa.int32(), nullable=False),
        # the matching spans (seconds): window level, and track level when confirmed by alignment
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("match_start_s", pa.float64()),
        pa.field("match_end_s", pa.float64()),
        # track level (aligned): time in match_track_id = time in track_id + offset_s, track_id the
        # shorter track; window level: median(match window start - window start)
        pa.field("offset_s", pa.float64()),
        pa.field("windows", pa.int32()),  # windows of track_id compared (aligned) or matched (window level)
        pa.field("aligned", pa.bool_()),  # track level: confirmed by window alignment (null: not tried)
        pa.field("criterion", pa.string(), nullable=False),  # JSON of the criterion used
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("computed_at", TIMESTAMP, nullable=False),
    ]
)
