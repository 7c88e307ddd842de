#!/usr/bin/env python
"""Build (or update) the cosine ANN indexes of an embedding store.

Examples (from the repo root)::

    python jobs/build_index.py --store demo_store
    python jobs/build_index.py --store s3://bucket/store --layer 12 --index-type IVF_PQ

``auto`` leaves tables below ``pipeline.search.index.exact_max_rows(D)`` rows (5,000 at 1024 dims)
without an index (exact search). Running it again on an indexed store adds the new rows to the
indexes incrementally; ``--replace`` retrains. Parameters and the index choice: ``pipeline/search/index.py``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.commands.search import build_index_main as main  # noqa: E402
from pipeline.commands.search import build_index_parser as build_parser  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
