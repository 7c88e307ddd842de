"""The repository root and the project's ``shared/`` folder (golden model, real audio clips)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def find_shared() -> Path | None:
    """The ``shared/`` folder: ``$MUSICFM_SHARED``, or ``shared/`` in or beside the repository;
    None when there is none."""
    for cand in (os.environ.get("MUSICFM_SHARED"), REPO / "shared", REPO.parent / "shared"):
        if cand and (Path(cand) / "golden").is_dir():
            return Path(cand)
    return None


def require_shared() -> Path:
    """The ``shared/`` folder, or a RuntimeError that says how to point at it."""
    found = find_shared()
    if found is None:
        raise RuntimeError("cannot find the shared/ folder (golden data, audio clips); set MUSICFM_SHARED")
    return found
