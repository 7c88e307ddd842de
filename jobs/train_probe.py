"""Train a probe (MARBLE-style) on a store's layer vectors.

See docs/insights.md for examples; the logic is in pipeline/insights/. Bad arguments: one line on
stderr, exit 2.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.commands.insights import probe_parser as build_parser  # noqa: E402,F401
from pipeline.commands.insights import train_probe_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return train_probe_main(argv)


if __name__ == "__main__":
    sys.exit(main())
