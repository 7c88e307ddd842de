#!/usr/bin/env python
"""Embed a music catalog with MusicFM into a Lance (or Parquet) store.

python jobs/embed_catalog.py --catalog s3://bucket/catalog.csv --output s3://bucket/store
ray job submit --working-dir . -- python jobs/embed_catalog.py --catalog ... --output ...
python jobs/embed_catalog.py --demo          # offline demo: synthetic audio, random weights
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import OneLineParser, add_model_args, add_run_args, add_window_args, run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="embed_catalog", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def run(args: argparse.Namespace) -> int:
        if args.demo:
            from pipeline.demo import run_demo

            return run_demo(args)
        if not args.catalog or not args.output:
            parser.error("--catalog and --output are required (or use --demo)")
        from pipeline.embed import job_from_args, run_embed

        job = job_from_args(args)
        report = run_embed(job, progress=not args.no_progress)
        print(report.summary())
        if args.build_index and report.status == "ok":
            from pipeline.index import build_indexes

            for rep in build_indexes(job.output, storage_options=job.storage_options or None):
                print(f"  index    {rep}")
        return 0 if report.status == "ok" else 3

    return run_main(run, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
