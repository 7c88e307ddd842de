"""The jobs' settings: :class:`EmbedJob` and :class:`RefreshJob` (frozen dataclasses built from
the command line by :func:`embed_job_from_args` and :func:`pipeline.commands.runs.refresh_main`).

Each field's default here is the knob's one default: the flags (:mod:`pipeline.commands.run_flags`) take
theirs from these fields, and the validation of the values is in the ``__post_init__``."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.exits import DEFAULT_MAX_ERROR_RATE, KEEP_PREVIOUS_RUNS
from pipeline.io.audio import TARGET_SR, AudioLimits
from pipeline.io.catalog import MAX_ROW_CHARS
from pipeline.io.objects import redacted
from pipeline.schemas import TABLES
from pipeline.store.lease import LEASE_TTL_S


@dataclass(frozen=True)
class EmbedJob:
    """Everything one run needs; built from the command line by ``pipeline.cli``."""

    catalog: str
    output: str
    checkpoint: str = "msd"
    stats: str | None = None
    model_config: str | None = None
    layers: tuple[int, ...] = (7, 12)
    window_s: float = 30.0
    hop_s: float = 30.0
    frames_hz: float | None = None
    loudness_target_db: float | None = None
    precision: str = "auto"
    # windows per model call; None: pipeline.flow.device.auto_batch_size (8 on CPU, from GPU memory on CUDA)
    batch_size: int | None = None
    compile: bool = False  # torch.compile the model in each model actor (not part of settings_id)
    gpu_actors: int | None = None  # model actors (the pool's maximum); None: one per GPU, or 1
    decode_cpus: int | None = 2  # decode actors (the pool's maximum); None: from the cluster
    gpu_actors_min: int | None = None  # set (< gpu_actors): the model pool autoscales from here
    decode_cpus_min: int | None = None  # set (< decode_cpus): the decode pool autoscales from here
    format: str = "lance"
    limit: int | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    allowed_prefixes: tuple[str, ...] = ()
    limits: AudioLimits = AudioLimits()
    decode_timeout_s: float | None = 600.0
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE  # see pipeline.exits for the reason
    max_row_chars: int = MAX_ROW_CHARS
    run_id: str | None = None

    def __post_init__(self) -> None:
        if self.format not in ("lance", "parquet"):
            raise ValueError(f"--format must be lance or parquet, got {self.format!r}")
        if (
            (self.batch_size is not None and self.batch_size < 1)
            or (self.decode_cpus is not None and self.decode_cpus < 1)
            or (self.gpu_actors is not None and self.gpu_actors < 1)
        ):
            raise ValueError("--batch-size, --decode-cpus and --gpu-actors must be >= 1")
        for lo, hi, name in ((self.decode_cpus_min, self.decode_cpus, "--decode-cpus"),
                             (self.gpu_actors_min, self.gpu_actors, "--gpu-actors")):  # fmt: skip
            if lo is not None and (lo < 1 or (hi is not None and lo > hi)):
                raise ValueError(f"{name}: MIN must be within 1..MAX")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be >= 1")
        if self.max_row_chars < 1:
            raise ValueError("--max-row-chars must be >= 1")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError("--max-error-rate must be within [0, 1]")

    def public_args(self) -> dict[str, Any]:
        """Arguments as stored in ``runs.lance`` (secrets redacted)."""
        d = asdict(self)
        d["storage_options"] = redacted(self.storage_options)
        d["limits"] = asdict(self.limits)
        return d


#: Catalogs with at least this many rows have their object metadata read by a Ray map.
LOOKUP_RAY_MIN_ROWS = 20_000


@dataclass(frozen=True)
class RefreshJob:
    """A refresh: what to embed and how (``embed``, whose ``output`` is the store) plus the
    refresh's own settings."""

    embed: EmbedJob
    dry_run: bool = False
    delete_missing: bool = True
    chunk_size: int = 1000
    retention_days: float = 7.0
    max_delete_fraction: float = 0.5
    lock_ttl_s: float = LEASE_TTL_S
    lock_wait_s: float = 0.0
    lookup_threads: int = 32
    lookup_ray_min_rows: int = LOOKUP_RAY_MIN_ROWS
    maintenance: bool = True
    sample: int = 5
    break_lease: bool = False
    kind: str = "refresh"  # "embed" when the embed job runs on this engine (runs.lance kind, report)
    planner: str = "auto"  # "driver", "ray" (a distributed join: pipeline.runs.ray_plan) or "auto"
    keep_previous: int = KEEP_PREVIOUS_RUNS  # earlier ok runs kept queryable/restorable (store.snapshots)

    def __post_init__(self) -> None:
        if self.embed.format != "lance":
            raise ValueError("refresh works on Lance stores only (--format lance)")
        if self.chunk_size < 1:
            raise ValueError("--chunk-size must be >= 1")
        if self.retention_days < 0:
            raise ValueError("--retention-days must be >= 0")
        if not 0.0 <= self.max_delete_fraction <= 1.0:
            raise ValueError("--max-delete-fraction must be within [0, 1]")
        if self.lock_ttl_s <= 0 or self.lock_wait_s < 0:
            raise ValueError("--lock-ttl-s must be > 0 and --lock-wait-s >= 0")
        if self.lookup_threads < 1:
            raise ValueError("--lookup-threads must be >= 1")
        if self.keep_previous < 0:
            raise ValueError("--keep-previous must be >= 0")
        if self.planner not in ("auto", "driver", "ray"):
            raise ValueError(f"--planner must be auto, driver or ray, got {self.planner!r}")

    @property
    def store(self) -> str:
        return self.embed.output

    def public_args(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "embed"}
        return d


def window_settings(args: Any) -> tuple[float, float, float | None]:
    """(window_s, hop_s, frames_hz) from --window-s/--hop-s/--frames-hz or --profile; the window
    is :attr:`EmbedJob.window_s` when neither gives one, the hop the window."""
    from musicfm.profiles import PROFILES

    window_s, hop_s, frames_hz = args.window_s, args.hop_s, args.frames_hz
    if args.profile:
        prof = PROFILES[args.profile]
        window_s = window_s or prof.window_s
        frames_hz = frames_hz if frames_hz is not None else prof.frames_hz
    window_s = window_s or EmbedJob.window_s
    hop_s = hop_s or window_s
    return window_s, hop_s, frames_hz


def embed_job_from_args(args: Any) -> EmbedJob:
    """Build an :class:`EmbedJob` from parsed ``embed_catalog`` flags (ValueError on bad combinations)."""
    window_s, hop_s, frames_hz = window_settings(args)
    return EmbedJob(
        catalog=args.catalog,
        output=args.output,
        checkpoint=args.checkpoint,
        stats=args.stats,
        model_config=args.model_config,
        layers=tuple(args.layers),
        window_s=window_s,
        hop_s=hop_s,
        frames_hz=frames_hz,
        loudness_target_db=getattr(args, "loudness_target_db", None),
        precision=args.precision,
        batch_size=args.batch_size,
        compile=bool(getattr(args, "compile", False)),
        gpu_actors=args.gpu_actors[1] if args.gpu_actors else None,
        gpu_actors_min=args.gpu_actors[0] if args.gpu_actors else None,
        decode_cpus=args.decode_cpus[1] if args.decode_cpus else None,
        decode_cpus_min=args.decode_cpus[0] if args.decode_cpus else None,
        format=args.format,
        limit=args.limit,
        storage_options=dict(args.storage_options or {}),
        allowed_prefixes=tuple(args.allowed_prefixes),
        limits=AudioLimits(
            max_bytes=int(args.max_file_mb * 1024 * 1024),
            max_duration_s=args.max_duration_s,
            max_channels=args.max_channels,
            min_samples=max(
                AudioLimits.min_samples, round((getattr(args, "min_duration_s", None) or 0) * TARGET_SR)
            ),
        ),
        decode_timeout_s=args.decode_timeout_s,
        max_error_rate=args.max_error_rate,
        max_row_chars=getattr(args, "max_row_chars", EmbedJob.max_row_chars),
    )


@dataclass(frozen=True)
class ExportSettings:
    """The export job's settings (``export_store``): which committed tables become Parquet."""

    tables: tuple[str, ...] = TABLES
