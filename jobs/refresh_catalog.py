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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.runs.commands import (  # noqa: E402,F401
    EXIT_ERROR_RATE,
    EXIT_LOCKED,
    EXIT_OK,
)
from pipeline.runs.commands import refresh_main as main  # noqa: E402
from pipeline.runs.commands import refresh_parser as build_parser  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
