#!/usr/bin/env python
"""Compare two models (checkpoints or stores) on the same dataset and task: per layer, which is
better and by how much, with a paired bootstrap interval over the test tracks.

python jobs/compare_models.py --task key --dataset giantsteps_key --data-home ... --a msd --b ft.safetensors --output eval/cmp
See docs/evaluate.md; the logic is in pipeline/evaluate/.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.commands.evaluate import compare_main as main  # noqa: E402
from pipeline.commands.evaluate import compare_parser as build_parser  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
