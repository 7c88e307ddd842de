#!/usr/bin/env python
"""Bring an embedding store in line with a catalog: embed new and changed tracks, re-embed
tracks whose settings changed, delete tracks gone from the catalog, leave the rest untouched.

    python jobs/refresh_catalog.py --catalog s3://bucket/catalog.csv --store s3://bucket/store
    python jobs/refresh_catalog.py --catalog ... --store ... --dry-run      # plan only, writes nothing
    ray job submit --working-dir . -- python jobs/refresh_catalog.py --catalog ... --store ...

Commits every --chunk-size tracks (a rerun after a crash resumes where it stopped), holds a
lease on the store (a second concurrent refresh exits with code 4), then compacts, optimises
indices and removes versions older than --retention-days. See docs/refresh.md.

Exit codes: 0 ok; 1 error (the run stopped; rerun to resume); 2 bad flags; 3 more failed
tracks than --max-error-rate; 4 another refresh holds the store.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import (  # noqa: E402
    OneLineParser,
    add_model_args,
    add_run_args,
    add_window_args,
    fraction,
    non_negative,
    positive_int,
    run_main,
)

EXIT_OK, EXIT_ERROR_RATE, EXIT_LOCKED = 0, 3, 4


def build_parser() -> argparse.ArgumentParser:
    """The refresh job's flags: its own, plus the embed job's model/window/execution flags."""
    p = OneLineParser(
        prog="refresh_catalog", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--catalog", required=True, help="CSV / Parquet / JSON-lines catalog, or a directory/prefix of audio"
    )
    p.add_argument(
        "--store", required=True, help="store root (local path or s3://...), as written by embed_catalog"
    )
    g = p.add_argument_group("refresh")
    g.add_argument(
        "--dry-run", action="store_true", help="print the plan (counts and samples); write nothing"
    )
    miss = g.add_mutually_exclusive_group()
    miss.add_argument("--delete-missing", dest="delete_missing", action="store_true", default=True,
                      help="delete tracks that are no longer in the catalog (default)")  # fmt: skip
    miss.add_argument("--keep-missing", dest="delete_missing", action="store_false",
                      help="keep tracks that are no longer in the catalog")  # fmt: skip
    g.add_argument("--chunk-size", type=positive_int, default=1000,
                   help="tracks per commit; a rerun redoes at most one chunk (default 1000)")  # fmt: skip
    g.add_argument("--retention-days", type=non_negative, default=7.0,
                   help="remove table versions older than this after the refresh (default 7)")  # fmt: skip
    g.add_argument("--max-delete-fraction", type=fraction, default=0.5,
                   help="refuse a plan deleting more than this fraction of the stored tracks (default 0.5)")  # fmt: skip
    g.add_argument("--lock-ttl-s", type=non_negative, default=600.0,
                   help="lease length; a killed run's lease frees after this (default 600)")  # fmt: skip
    g.add_argument("--lock-wait-s", type=non_negative, default=0.0,
                   help="wait up to this long for another refresh to finish (default 0: fail at once)")  # fmt: skip
    g.add_argument("--lookup-threads", type=positive_int, default=32,
                   help="concurrent object-metadata lookups per process (default 32)")  # fmt: skip
    g.add_argument("--no-maintenance", action="store_true", help="skip compaction/cleanup after the refresh")
    g.add_argument("--probe", action="append", default=[], metavar="DIR",
                   help="after the refresh, predict the new and changed tracks with this probe (repeatable)")  # fmt: skip
    add_model_args(p)
    add_window_args(p)
    add_run_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the refresh job; returns the exit code (see the module docstring)."""
    parser = build_parser()

    def run(args: argparse.Namespace) -> int:
        from pipeline.embed import job_from_args
        from pipeline.refresh import RefreshJob, RefreshLocked, run_refresh

        if args.format != "lance":
            parser.error("--format: refresh works on Lance stores only")
        if args.lock_ttl_s <= 0:
            parser.error("--lock-ttl-s must be > 0")
        args.output = args.store
        job = RefreshJob(
            embed=job_from_args(args), dry_run=args.dry_run, delete_missing=args.delete_missing,
            chunk_size=args.chunk_size, retention_days=args.retention_days,
            max_delete_fraction=args.max_delete_fraction, lock_ttl_s=args.lock_ttl_s,
            lock_wait_s=args.lock_wait_s, lookup_threads=args.lookup_threads, maintenance=not args.no_maintenance,
        )  # fmt: skip
        probes = _load_probes(parser, args.probe)
        try:
            report = run_refresh(job, progress=not args.no_progress)
        except RefreshLocked as e:
            print(f"{parser.prog}: locked: {e}", file=sys.stderr)
            return EXIT_LOCKED
        print(report.summary())
        for probe in probes if not args.dry_run and report.tracks_ok else []:  # keep predictions current
            from pipeline.insights.predict import predict_store

            print(predict_store(args.store, probe, args.storage_options, run_id=report.run_id).summary())
        return EXIT_OK if report.status == "ok" else EXIT_ERROR_RATE

    return run_main(run, parser, argv)


def _load_probes(parser: argparse.ArgumentParser, dirs: list[str]) -> list:
    """The --probe directories, loaded before the refresh so a broken one fails fast (exit 2)."""
    from pipeline.insights.probes import Probe

    try:
        return [Probe.load(d) for d in dirs]
    except ValueError as e:
        parser.error(f"--probe: {e}")
        return []


if __name__ == "__main__":
    sys.exit(main())
