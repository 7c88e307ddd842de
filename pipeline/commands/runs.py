"""The embed, refresh and export commands: flags, and the run with one-line errors and exit
codes. ``jobs/embed_catalog.py``, ``jobs/refresh_catalog.py`` and ``jobs/export_store.py`` (for
``ray job submit``) and the ``musicfm-*`` console scripts call these."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from pipeline.cli import OneLineParser, add_setting, add_store_args, run_main
from pipeline.commands.run_flags import add_model_args, add_refresh_args, add_run_args, add_window_args
from pipeline.exits import EXIT_LOCKED, exit_codes_help
from pipeline.io.audio import AudioLimits
from pipeline.runs.settings import EmbedJob, ExportSettings, RefreshJob

EMBED_DOC = """Embed a music catalog with MusicFM into a Lance (or Parquet) store.

python jobs/embed_catalog.py --catalog s3://bucket/catalog.csv --output s3://bucket/store
ray job submit --working-dir . -- python jobs/embed_catalog.py --catalog ... --output ...
python jobs/embed_catalog.py --demo          # offline demo: synthetic audio, random weights
"""

REFRESH_DOC = """Bring an embedding store in line with a catalog: embed new and changed tracks, re-embed
tracks whose settings changed, delete tracks gone from the catalog, leave the rest untouched.

    python jobs/refresh_catalog.py --catalog s3://bucket/catalog.csv --store s3://bucket/store
    python jobs/refresh_catalog.py --catalog ... --store ... --dry-run      # plan only, writes nothing
    ray job submit --working-dir . -- python jobs/refresh_catalog.py --catalog ... --store ...

Commits every --chunk-size tracks (a rerun after a crash resumes where it stopped), holds a
lease on the store (a second concurrent refresh exits with code 4), then compacts, optimises
indices and removes versions older than --retention-days. See docs/refresh.md.
"""

# --------------------------------------------------------------------------- SIGTERM


def stop_gracefully(
    prog: str, run: Callable[[argparse.Namespace], int]
) -> Callable[[argparse.Namespace], int]:
    """``run`` with SIGTERM as a graceful stop (:mod:`pipeline.signals`): the commit in flight
    finishes, committed chunks stay, the lease is released, one line on stderr, and the exit code
    is :data:`pipeline.signals.EXIT_TERMINATED` (143)."""
    from pipeline.signals import EXIT_TERMINATED, Terminated, stop_on_sigterm

    def wrapped(args: argparse.Namespace) -> int:
        try:
            with stop_on_sigterm():
                return run(args)
        except Terminated:
            print(f"{prog}: stopped by SIGTERM (committed chunks are kept; the same command resumes)",
                  file=sys.stderr)  # fmt: skip
            return EXIT_TERMINATED

    return wrapped


# --------------------------------------------------------------------------- precision


def check_cpu_precision(parser: argparse.ArgumentParser, precision: str) -> None:
    """``--precision bf16`` where the model runs on this machine's CPU (a local cluster, no CUDA)
    and that CPU has no bf16 units: refused with one line (exit 2) before anything starts. On a
    cluster (``RAY_ADDRESS``) each CPU model actor checks its own CPU when it starts
    (:func:`pipeline.engine.device.require_cpu_bf16`); GPU actors run bf16 on the GPU."""
    if precision != "bf16" or os.environ.get("RAY_ADDRESS"):
        return
    from pipeline.engine.device import CPU_BF16_REFUSAL, cpu_bf16_units

    if cpu_bf16_units():
        return
    import torch

    if not torch.cuda.is_available():
        parser.error(CPU_BF16_REFUSAL)


# --------------------------------------------------------------------------- embed


def embed_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="embed_catalog",
        settings=(EmbedJob, RefreshJob, AudioLimits),
        description=EMBED_DOC,
        epilog=exit_codes_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--catalog",
        help="CSV / Parquet / JSON-lines file with a `uri` column, or a directory/prefix "
        "of audio files (local, s3://, gs://)",
    )
    p.add_argument("--output", help="store root (local path or s3://...)")
    p.add_argument(
        "--demo",
        action="store_true",
        help="offline demo: generate a small catalog and a random-weight model, embed into ./demo_store",
    )
    p.add_argument("--demo-dir", default="demo_store", help="where --demo writes (default ./demo_store)")
    p.add_argument("--build-index", action="store_true", help="build ANN indexes after embedding")
    add_model_args(p)
    add_window_args(p)
    add_run_args(p)
    return p


def embed_main(argv: list[str] | None = None) -> int:
    parser = embed_parser()

    def run(args: argparse.Namespace) -> int:
        if args.demo:
            from pipeline.runs.demo import run_demo

            return run_demo(args)
        if not args.catalog or not args.output:
            parser.error("--catalog and --output are required (or use --demo)")
        check_cpu_precision(parser, args.precision)
        from pipeline.errors import RefreshLocked
        from pipeline.runs.embed import run_embed
        from pipeline.runs.settings import embed_job_from_args

        job = embed_job_from_args(args)
        try:
            report = run_embed(job, progress=not args.no_progress, chunk_size=args.chunk_size,
                               break_lease=args.break_lease, planner=args.planner,
                               keep_previous=args.keep_previous)  # fmt: skip
        except RefreshLocked as e:
            print(f"{parser.prog}: locked: {e}", file=sys.stderr)
            return EXIT_LOCKED
        print(report.summary())
        if args.build_index and report.status == "ok":
            from pipeline.search.index import build_indexes

            for rep in build_indexes(job.output, storage_options=job.storage_options or None):
                print(f"  index    {rep}")
        return report.exit_code

    return run_main(stop_gracefully(parser.prog, run), parser, argv)


# --------------------------------------------------------------------------- refresh


def refresh_parser() -> argparse.ArgumentParser:
    """The refresh job's flags: its own, plus the embed job's model/window/execution flags."""
    p = OneLineParser(
        prog="refresh_catalog",
        settings=(RefreshJob, EmbedJob, AudioLimits),
        description=REFRESH_DOC,
        epilog=exit_codes_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--catalog", required=True, help="CSV / Parquet / JSON-lines catalog, or a directory/prefix of audio"
    )
    p.add_argument(
        "--store", required=True, help="store root (local path or s3://...), as written by embed_catalog"
    )
    add_refresh_args(p)
    add_model_args(p)
    add_window_args(p)
    add_run_args(p)
    return p


def refresh_main(argv: list[str] | None = None) -> int:
    """Run the refresh job; returns the exit code (see the module docstring)."""
    parser = refresh_parser()

    def run(args: argparse.Namespace) -> int:
        from pipeline.errors import RefreshLocked
        from pipeline.runs.refresh import run_refresh
        from pipeline.runs.settings import embed_job_from_args

        args.output = args.store
        embed = embed_job_from_args(args)
        try:  # RefreshJob's own checks (Lance only, --lock-ttl-s > 0...) are bad flags: exit 2
            job = RefreshJob(
                embed=embed, dry_run=args.dry_run, delete_missing=args.delete_missing,
                chunk_size=args.chunk_size, retention_days=args.retention_days,
                max_delete_fraction=args.max_delete_fraction, lock_ttl_s=args.lock_ttl_s,
                lock_wait_s=args.lock_wait_s, lookup_threads=args.lookup_threads,
                maintenance=not args.no_maintenance, break_lease=args.break_lease, planner=args.planner,
                keep_previous=args.keep_previous,
            )  # fmt: skip
        except ValueError as e:
            parser.error(str(e))
        check_cpu_precision(parser, args.precision)
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
        return report.exit_code

    return run_main(stop_gracefully(parser.prog, run), parser, argv)


def _load_probes(parser: argparse.ArgumentParser, dirs: list[str]) -> list:
    """The --probe directories, loaded before the refresh so a broken one fails fast (exit 2)."""
    from pipeline.insights.probes import Probe

    try:
        return [Probe.load(d) for d in dirs]
    except ValueError as e:
        parser.error(f"--probe: {e}")
        return []


# --------------------------------------------------------------------------- export


def rollback_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="rollback_store",
        settings=(),
        description="Return a store's tracks/windows/frames to an earlier ok run's state (the run "
        "before the newest by default; refresh and embed keep --keep-previous of them). Search "
        "switches in one commit; runs.lance records the rollback.",
    )
    add_store_args(p)
    p.add_argument(
        "--to", default=None, metavar="RUN_ID", help="the run to return to (default: the previous one)"
    )
    return p


def rollback_main(argv: list[str] | None = None) -> int:
    parser = rollback_parser()

    def run(args: argparse.Namespace) -> int:
        from pipeline.errors import RefreshLocked
        from pipeline.runs.rollback import run_rollback

        try:
            res = run_rollback(args.store, args.to, args.storage_options)
        except RefreshLocked as e:
            print(f"{parser.prog}: locked: {e}", file=sys.stderr)
            return EXIT_LOCKED
        print(f"rollback {res.run_id}: the store is back at run {res.to_run} (model {res.model_id}); "
              + ", ".join(f"{k} v{v}" for k, v in sorted(res.versions.items())))  # fmt: skip
        return 0

    return run_main(run, parser, argv)


def export_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="export_store",
        description="Export a store's committed Lance tables as Parquet ({TABLE}.parquet/ directories).",
        settings=(ExportSettings,),
    )
    add_store_args(p)
    p.add_argument("--out", default=None, help="where to write (default: the store root itself)")
    add_setting(p, "--tables", settings=ExportSettings, type=_tables, help="comma-separated tables")
    return p


def _tables(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def export_main(argv: list[str] | None = None) -> int:
    parser = export_parser()

    def run(args: argparse.Namespace) -> int:
        from pipeline.runs.export import export_parquet

        done = export_parquet(
            args.store,
            args.storage_options,
            out=args.out,
            tables=list(ExportSettings(tables=args.tables).tables),
        )
        for name, uri in done.items():
            print(f"  {name:<8} {uri}")
        if not done:
            print(f"{parser.prog}: error: no tables to export at {args.store}", file=sys.stderr)
            return 2
        return 0

    return run_main(run, parser, argv)
