#!/usr/bin/env python
"""HTTP similarity-search service on Ray Serve, and the catalog page at ``/``.

Run either way (from the repo root)::

    python jobs/serve_search.py --store demo_store [--host 127.0.0.1 --port 8000] [--checkpoint ...]
    serve run jobs.serve_search:app store=demo_store [checkpoint=... storage_options='{...}']

Flags, ``serve run`` keys, routes and capacity: :mod:`pipeline.commands.serve`. Bad arguments:
one line on stderr, exit 2.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.commands.serve import app  # noqa: E402,F401 - serve run jobs.serve_search:app
from pipeline.commands.serve import serve_main as main  # noqa: E402
from pipeline.commands.serve import serve_parser as build_parser  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
