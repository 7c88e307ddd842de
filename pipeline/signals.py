"""Graceful stops on SIGTERM (how Kubernetes, ``ray job stop`` and most schedulers stop a process).

Inside :func:`stop_on_sigterm` a SIGTERM raises :class:`Terminated` in the main thread, at once,
unless a :func:`commit_section` is running: then the section (one chunk's commit) finishes first
and :class:`Terminated` is raised as it ends. A second SIGTERM raises at once wherever it lands.
:class:`Terminated` derives from ``BaseException`` (as ``KeyboardInterrupt``), so no
``except Exception`` turns a stop into an error row or a retry.

* The embed and refresh jobs leave committed chunks as they are, abandon the chunks in flight
  (the rerun's orphan sweep removes any rows they wrote), record the run as failed with the
  reason, release the store's lease and exit with :data:`EXIT_TERMINATED`.
* The search service (``jobs/serve_search.py``) stops taking new requests, finishes the ones in
  flight within its grace period (``--grace-s``) and exits 0.

``ray.init`` installs its own SIGTERM handlers (a Python one that exits, and a C++ one that prints
a stack dump first); :func:`reassert` puts this one back after Ray has started.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

from pipeline.exits import EXIT_TERMINATED  # 128 + 15; re-exported (pipeline.exits has the table)

__all__ = ["EXIT_TERMINATED", "Terminated", "commit_section", "reassert", "stop_on_sigterm"]

log = logging.getLogger("musicfm.signals")


class Terminated(BaseException):
    """A SIGTERM asked this process to stop (raised in the main thread at a safe point)."""


class _State:
    def __init__(self) -> None:
        self.installed = False
        self.sections = 0  # commit sections running
        self.pending = False  # a SIGTERM arrived during a section
        self.received = 0


_STATE = _State()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _handler(signum: int, frame: Any) -> None:
    _STATE.received += 1
    if _STATE.sections and _STATE.received == 1:
        _STATE.pending = True
        log.warning("SIGTERM: finishing the commit in flight, then stopping")
        return
    raise Terminated("stopped by SIGTERM")


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread (see the module doc);
    the previous handler comes back on the way out. Off the main thread it changes nothing."""
    if not _main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    _STATE.installed, _STATE.pending, _STATE.received, _STATE.sections = True, False, 0, 0
    signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        _STATE.installed = False
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def reassert() -> None:
    """Put this module's handler back (``ray.init`` replaced it) when :func:`stop_on_sigterm` is
    active and this is the main thread; otherwise do nothing."""
    if _STATE.installed and _main_thread():
        signal.signal(signal.SIGTERM, _handler)


@contextlib.contextmanager
def commit_section() -> Iterator[None]:
    """A step that must not be cut in the middle (one chunk's commit): a first SIGTERM during it
    raises :class:`Terminated` only once it has finished."""
    _STATE.sections += 1
    try:
        yield
    finally:
        _STATE.sections -= 1
    if not _STATE.sections and _STATE.pending:
        _STATE.pending = False
        raise Terminated("stopped by SIGTERM (after the commit in flight)")
