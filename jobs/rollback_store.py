#!/usr/bin/env python
"""Return a store to an earlier run's state (thin entry script: ``pipeline.commands.runs.rollback_main``).

python jobs/rollback_store.py --store s3://bucket/store [--to RUN_ID]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.commands.runs import rollback_main as main  # noqa: E402
from pipeline.commands.runs import rollback_parser as build_parser  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
