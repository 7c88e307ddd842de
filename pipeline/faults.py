"""Fault hooks at named points of a run, for tests that prove what a crash there leaves behind.

``MUSICFM_FAIL_AT=<step>[:<chunk>]`` raises :class:`pipeline.errors.InjectedFailure` at the step;
``MUSICFM_KILL_AT=<step>[:<chunk>]`` kills this process there with SIGKILL (a driver killed by the
OOM killer, a preempted head: no handler, no clean-up runs). Steps, in the order a refresh or an
embed run reaches them, are :data:`STEPS`; a step of a chunk matches ``step`` (every chunk) or
``step:k`` (chunk k only). Neither variable is set outside tests.
"""

from __future__ import annotations

import os
import signal

from pipeline.errors import InjectedFailure

FAIL_ENV = "MUSICFM_FAIL_AT"
KILL_ENV = "MUSICFM_KILL_AT"

#: Named points, in the order a run reaches them.
STEPS = (
    "lock_acquired",  # lease taken, nothing read yet
    "planned",  # plan made, nothing written
    "tracks_deleted",  # removed tracks' rows deleted from tracks, their windows/frames not yet
    "metadata_updated",  # metadata-only track rows updated (per chunk)
    "chunk_written",  # chunk's data files written by the workers, nothing of it committed (per chunk)
    "windows_appended",  # chunk's windows committed, frames/tracks not yet (per chunk)
    "frames_appended",  # chunk's frames committed, tracks not yet (per chunk)
    "tracks_merged",  # chunk's tracks merged, superseded windows/frames not yet deleted (per chunk)
    "chunk_done",  # chunk fully committed, next chunk not started (per chunk)
    "swept",  # orphan windows/frames deleted, maintenance not yet done
    "maintenance_compacted",  # during maintenance: one table compacted, the others not yet
    "maintained",  # maintenance done, run row not yet written
)


def _matches(want: str, step: str, chunk: int | None) -> bool:
    name, _, at = want.strip().partition(":")
    if not name or name != step:
        return False
    return not at or (chunk is not None and int(at) == chunk)


def failpoint(step: str, chunk: int | None = None) -> None:
    """Raise, or kill this process, when ``MUSICFM_FAIL_AT`` / ``MUSICFM_KILL_AT`` names ``step``."""
    if _matches(os.environ.get(KILL_ENV, ""), step, chunk):
        os.kill(os.getpid(), signal.SIGKILL)
    want = os.environ.get(FAIL_ENV, "")
    if _matches(want, step, chunk):
        raise InjectedFailure(f"injected failure at {want.strip()}")
