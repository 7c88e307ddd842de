"""The flags of the embed and refresh jobs (model, windows, execution), each taking its default
from the settings field it sets (:class:`~pipeline.runs.settings.EmbedJob`,
:class:`~pipeline.runs.settings.RefreshJob`, :class:`~pipeline.io.audio.AudioLimits`)."""

from __future__ import annotations

import argparse
from typing import Any

from musicfm.profiles import PROFILES
from pipeline.cli import (
    add_setting,
    fraction,
    layers_arg,
    non_negative,
    non_negative_int,
    number_arg,
    pool_size,
    positive_float,
    positive_int,
    storage_options_arg,
)
from pipeline.io.audio import AudioLimits
from pipeline.runs.settings import EmbedJob, RefreshJob

MIB = 1024 * 1024


def _prefixes(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    add_setting(g, "--checkpoint", settings=EmbedJob,
                help="msd | fma (released weights, cached by huggingface_hub), a .pt/.safetensors path or "
                "s3:// URI, or random[:SEED] (random weights, for demos/tests)")  # fmt: skip
    g.add_argument("--stats", help="stats JSON for a .pt checkpoint (e.g. msd_stats.json)")
    g.add_argument("--model-config", help="MusicFMConfig JSON for non-default sizes")
    add_setting(g, "--layers", settings=EmbedJob, type=layers_arg, help="hidden states to store, e.g. 7,12")
    add_setting(g, "--precision", settings=EmbedJob, choices=["auto", "fp32", "bf16", "fp16"],
                help="auto: bf16 when the cluster has GPUs, fp32 on CPU (bf16 there is opt-in)")  # fmt: skip
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model in each model actor (same vectors within float rounding; "
        "not part of settings_id; the first call of each window length compiles)",
    )


def add_window_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("windows")
    # None unless given: --profile may set it (window_settings), else the field's default applies
    add_setting(g, "--window-s", settings=EmbedJob, type=positive_float, default=None,
                help="window length in seconds")  # fmt: skip
    g.add_argument("--hop-s", type=positive_float, help="hop between windows in seconds (default: = window)")
    g.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        help="task preset from the MusicFM paper: sets window length and frame rate",
    )
    g.add_argument("--frames-hz", type=positive_float, help="also store frame-level vectors at this rate")
    add_setting(g, "--loudness-target-db", settings=EmbedJob, stated=False,
                type=number_arg(float, lambda v: -80.0 <= v <= 0.0, "a level in dBFS within [-80, 0]"),
                help="scale each window to this RMS level (dBFS, e.g. -20) before the model, so louder and "
                "quieter masters embed alike (recorded in settings_id; default: off)")  # fmt: skip


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    add_setting(g, "--batch-size", settings=EmbedJob, type=positive_int, stated=False,
                help="windows per model call (default: 8 on CPU; on a GPU as many as fit in 80 %% of its "
                "free memory)")  # fmt: skip
    g.add_argument(
        "--gpu-actors",
        type=pool_size,
        help="model actors: N, or MIN:MAX to autoscale with the work (default: one per GPU; without "
        "GPUs one per core of the largest node, at most 4, each with its share of the cores as torch threads)",
    )
    g.add_argument(
        "--decode-cpus",
        type=pool_size,
        help="decode actors, one CPU each: N, or MIN:MAX to autoscale (default: 1 to the cluster's "
        "CPUs less one per model actor with GPUs; 1:2 without GPUs)",
    )
    add_setting(g, "--chunk-size", settings=RefreshJob, type=positive_int,
                help="tracks per commit; a rerun after a crash redoes at most the chunks in flight")  # fmt: skip
    add_setting(g, "--planner", settings=RefreshJob, choices=["auto", "driver", "ray"],
                help="where the plan is made: on the driver, or as a distributed join in Ray (catalog rows "
                "never on the driver); auto: Ray for catalogs of 32 MiB or more, or listings with 8+ "
                "sub-prefixes")  # fmt: skip
    add_setting(g, "--keep-previous", settings=RefreshJob, type=non_negative_int,
                help="earlier ok runs whose store versions stay queryable (search --model) and restorable "
                "(rollback_store) besides the newest")  # fmt: skip
    add_setting(g, "--break-lease", settings=RefreshJob, action="store_true", stated=False,
                help="take over the store's lease even if its holder is not proven gone (only when you know "
                "that run is dead: two writers at once corrupt nothing but waste work)")  # fmt: skip
    add_setting(g, "--format", settings=EmbedJob, choices=["lance", "parquet"], help="store format")
    add_setting(g, "--limit", settings=EmbedJob, type=positive_int, stated=False,
                help="only the first N catalog rows")  # fmt: skip
    g.add_argument(
        "--storage-options",
        type=storage_options_arg,
        default=None,
        help='JSON of s3fs-style options, e.g. {"endpoint_url": "...", "region": "..."} (Lance aws_* '
        "keys also accepted); credentials are best left to the AWS environment",
    )
    add_setting(g, "--allowed-prefixes", settings=EmbedJob, type=_prefixes, stated=False,
                help="comma-separated URI prefixes audio may be read from (default: the catalog's location)")  # fmt: skip
    add_execution_limits(g)
    g.add_argument("--log-format", choices=["text", "json"], default="text", help="log lines as text or JSON")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.add_argument("--debug", action="store_true", help="print tracebacks on failure")


def add_execution_limits(g: Any) -> None:
    """The per-file and per-run limits (AudioLimits and the EmbedJob's own)."""
    add_setting(g, "--max-file-mb", settings=AudioLimits, field="max_bytes", type=positive_float,
                scale=lambda b: b / MIB, help="largest audio file")  # fmt: skip
    add_setting(g, "--max-duration-s", settings=AudioLimits, type=positive_float, scale=float,
                help="longest audio accepted")  # fmt: skip
    add_setting(g, "--max-channels", settings=AudioLimits, type=positive_int, help="most channels accepted")
    g.add_argument(
        "--min-duration-s",
        type=non_negative,
        default=None,
        help="shorter audio becomes an error row (default: one STFT frame, 0.043 s, the floor)",
    )
    add_setting(g, "--max-row-chars", settings=EmbedJob, type=positive_int,
                help="longest catalog row (characters, names + values); longer rows become error rows")  # fmt: skip
    add_setting(
        g, "--decode-timeout-s", settings=EmbedJob, type=positive_float, help="per-file decode budget"
    )
    add_setting(g, "--max-error-rate", settings=EmbedJob, type=fraction,
                help="exit 3 when failed/total tracks exceeds this, or when every track failed "
                "(nightly jobs: e.g. 0.01)")  # fmt: skip


def add_refresh_args(p: argparse.ArgumentParser) -> None:
    """The refresh job's own flags (RefreshJob's fields)."""
    g = p.add_argument_group("refresh")
    add_setting(g, "--dry-run", settings=RefreshJob, action="store_true", stated=False,
                help="print the plan (counts and samples); write nothing")  # fmt: skip
    miss = g.add_mutually_exclusive_group()
    add_setting(miss, "--delete-missing", settings=RefreshJob, action="store_true", stated=False,
                help="delete tracks that are no longer in the catalog (default)")  # fmt: skip
    miss.add_argument("--keep-missing", dest="delete_missing", action="store_false", default=argparse.SUPPRESS,
                      help="keep tracks that are no longer in the catalog")  # fmt: skip
    add_setting(g, "--retention-days", settings=RefreshJob, type=non_negative,
                help="remove table versions older than this after the refresh")  # fmt: skip
    add_setting(g, "--max-delete-fraction", settings=RefreshJob, type=fraction,
                help="refuse a plan deleting more than this fraction of the stored tracks")  # fmt: skip
    add_setting(g, "--lock-ttl-s", settings=RefreshJob, type=non_negative,
                help="lease length; a killed run's lease frees after this")  # fmt: skip
    add_setting(g, "--lock-wait-s", settings=RefreshJob, type=non_negative,
                help="wait up to this long for another refresh to finish (0: fail at once)")  # fmt: skip
    add_setting(g, "--lookup-threads", settings=RefreshJob, type=positive_int,
                help="concurrent object-metadata lookups per process")  # fmt: skip
    g.add_argument("--no-maintenance", action="store_true", help="skip compaction/cleanup after the refresh")
    g.add_argument("--probe", action="append", default=[], metavar="DIR",
                   help="after the refresh, predict the new and changed tracks with this probe (repeatable)")  # fmt: skip
