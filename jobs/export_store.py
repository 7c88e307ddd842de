#!/usr/bin/env python
"""Export a store's committed Lance tables as Parquet.

python jobs/export_store.py --store s3://bucket/store [--out s3://bucket/export] [--tables tracks,windows]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.commands.runs import export_main as main  # noqa: E402
from pipeline.commands.runs import export_parser as build_parser  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
