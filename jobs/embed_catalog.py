#!/usr/bin/env python
"""Embed a music catalog with MusicFM into a Lance (or Parquet) store.

python jobs/embed_catalog.py --catalog s3://bucket/catalog.csv --output s3://bucket/store
ray job submit --working-dir . -- python jobs/embed_catalog.py --catalog ... --output ...
python jobs/embed_catalog.py --demo          # offline demo: synthetic audio, random weights
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.commands.runs import embed_main as main  # noqa: E402
from pipeline.commands.runs import embed_parser as build_parser  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
