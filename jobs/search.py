"""Similarity search over an embedding store.

Examples (from the repo root)::

    python jobs/search.py --store demo_store --track-id hw_city -k 5
    python jobs/search.py --store s3://bucket/store --audio query.flac --where "genre = 'jazz'" --json
    python jobs/search.py --store demo_store --vector-file q.npy --level window

Prints a table (rank, score, track_id, title/artist when present, window time) or, with
``--json``, one JSON object. Bad arguments: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.query.cli import OneLineArgumentParser, k_arg, positive_int, run_search, storage_options_arg  # noqa: E402
from pipeline.search import LEVELS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="search",
        description="Find the tracks most similar to a track, an audio file or a vector.",
    )
    p.add_argument("--store", required=True, help="store root: local directory or s3://bucket/prefix")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--track-id", help="query by a track of the store (left out of the results)")
    q.add_argument("--audio", help="query by an audio file path or URI (embedded with the store's model)")
    q.add_argument("--vector-file", help="query by a vector saved with numpy.save (.npy, shape (D,))")
    p.add_argument("--layer", type=int, default=None, help="layer to compare (default: the store's highest)")
    p.add_argument("-k", type=k_arg, default=10, help="number of results (1..1000, default 10)")
    p.add_argument(
        "--where", default=None, help="SQL predicate on the store's columns, applied before the search"
    )
    p.add_argument("--level", choices=LEVELS, default="track", help="compare track vectors or window vectors")
    p.add_argument(
        "--nprobes", type=positive_int, default=None, help="IVF partitions to probe (a minimum with --where)"
    )
    p.add_argument("--refine-factor", type=positive_int, default=None, help="re-rank k*F candidates exactly")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--storage-options",
        type=storage_options_arg,
        default=None,
        help="JSON object of storage options (s3fs-style or Lance aws_* keys)",
    )
    p.add_argument(
        "--checkpoint", default=None, help="model for --audio (default: the one in the store's run records)"
    )
    p.add_argument("--stats", default=None, help="stats JSON of the --checkpoint")
    p.add_argument("--model-config", default=None, help="model config JSON of the --checkpoint")
    p.add_argument("--device", default=None, help="device for the audio model (default: cuda if available)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_search(args, prog="search")


if __name__ == "__main__":
    sys.exit(main())
