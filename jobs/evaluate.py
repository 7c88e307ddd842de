#!/usr/bin/env python
"""Evaluate a model on a downstream task (beat, downbeat, chord, key, structure, tagging, genre):
features through the embed job, probes on every layer in one pass, mir_eval / scikit-learn scores.

python jobs/evaluate.py --task beat --dataset beatles --data-home ~/mir_datasets/beatles --checkpoint msd --output eval/beat
See docs/evaluate.md; the logic is in pipeline/evaluate/.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.commands.evaluate import evaluate_main as main  # noqa: E402
from pipeline.commands.evaluate import evaluate_parser as build_parser  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
