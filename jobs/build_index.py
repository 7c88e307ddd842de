"""Build (or update) the cosine ANN indexes of an embedding store.

Examples (from the repo root)::

    python jobs/build_index.py --store demo_store
    python jobs/build_index.py --store s3://bucket/store --layer 12 --index-type IVF_PQ

``auto`` leaves tables below ``pipeline.index.exact_max_rows(D)`` rows (5,000 at 1024 dims)
without an index (exact search). Running it again on an indexed store adds the new rows to the
indexes incrementally; ``--replace`` retrains. Parameters and the index choice: ``pipeline/index.py``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.index import INDEX_TYPES  # noqa: E402
from pipeline.query.cli import OneLineArgumentParser, run_build_index, storage_options_arg  # noqa: E402


def _index_type(text: str) -> str:
    v = text.strip().upper()
    if v not in ("AUTO", *INDEX_TYPES):
        raise argparse.ArgumentTypeError(f"expected auto, {', '.join(INDEX_TYPES)}; got {text!r}")
    return v.lower() if v == "AUTO" else v


def _min_rows(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="build_index", description="Build cosine ANN indexes over the store's vectors."
    )
    p.add_argument("--store", required=True, help="store root: local directory or s3://bucket/prefix")
    p.add_argument(
        "--layer",
        type=int,
        action="append",
        default=None,
        help="layer to index (repeatable; default: every layer)",
    )
    p.add_argument(
        "--index-type", type=_index_type, default="auto", help=f"auto (default), {' or '.join(INDEX_TYPES)}"
    )
    p.add_argument(
        "--tables",
        nargs="+",
        choices=("tracks", "windows"),
        default=["tracks", "windows"],
        help="tables to index (default: both)",
    )
    p.add_argument(
        "--min-rows",
        type=_min_rows,
        default=None,
        help="build no index below this many rows (default: exact-search threshold for auto)",
    )
    p.add_argument("--replace", action="store_true", help="retrain existing indexes instead of updating them")
    p.add_argument(
        "--storage-options",
        type=storage_options_arg,
        default=None,
        help="JSON object of storage options (s3fs-style or Lance aws_* keys)",
    )
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_build_index(args, prog="build_index")


if __name__ == "__main__":
    sys.exit(main())
