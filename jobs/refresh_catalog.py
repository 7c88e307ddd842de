#!/usr/bin/env python
"""Refresh a store from its catalog (thin entry script: the job is ``pipeline.commands.runs.refresh_main``;
``--help`` prints what it does, its flags and exit codes).

    python jobs/refresh_catalog.py --catalog s3://bucket/catalog.csv --store s3://bucket/store [--dry-run]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.commands.runs import refresh_main as main  # noqa: E402
from pipeline.commands.runs import refresh_parser as build_parser  # noqa: E402,F401
from pipeline.exits import EXIT_ERROR_RATE, EXIT_LOCKED, EXIT_OK  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
