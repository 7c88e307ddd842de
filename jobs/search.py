#!/usr/bin/env python
"""Similarity search over an embedding store.

Examples (from the repo root)::

    python jobs/search.py --store demo_store --track-id hw_city -k 5
    python jobs/search.py --store s3://bucket/store --audio query.flac --where "genre = 'jazz'" --json
    python jobs/search.py --store demo_store --vector-file q.npy --level window

Prints a table (rank, score, track_id, title/artist when present, window time) or, with
``--json``, one JSON object. Bad arguments: one line on stderr, exit 2.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.commands.search import search_main as main  # noqa: E402
from pipeline.commands.search import search_parser as build_parser  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
