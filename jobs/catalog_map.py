"""A 2-D map of the catalog (PCA + UMAP), as tracks columns, HTML and PNG.

See docs/insights.md for examples; the logic is in pipeline/insights/. Bad arguments: one line on
stderr, exit 2.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.commands.insights import catalog_map_main  # noqa: E402
from pipeline.commands.insights import map_parser as build_parser  # noqa: E402,F401


def main(argv: list[str] | None = None) -> int:
    return catalog_map_main(argv)


if __name__ == "__main__":
    sys.exit(main())
