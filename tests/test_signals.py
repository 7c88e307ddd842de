"""pipeline.signals: SIGTERM as a graceful stop, in this (main) thread, with a real signal."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipeline import signals
from pipeline.signals import EXIT_TERMINATED, Terminated, commit_section, stop_on_sigterm


def _term() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)  # the handler runs in this thread at the next bytecode


def test_outside_a_commit_sigterm_stops_at_once_and_the_handler_is_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    done = []
    with pytest.raises(Terminated), stop_on_sigterm():
        _term()
        done.append("after")  # never reached
    assert not done and signal.getsignal(signal.SIGTERM) is before
    assert not isinstance(Terminated(), Exception)  # no `except Exception` swallows a stop
    assert EXIT_TERMINATED == 143


def test_a_commit_in_flight_finishes_before_the_stop() -> None:
    steps = []
    with pytest.raises(Terminated), stop_on_sigterm():
        with commit_section():
            steps.append("windows")
            _term()
            steps.append("tracks")  # the rest of the commit still runs
        steps.append("next chunk")  # never reached
    assert steps == ["windows", "tracks"]


def test_a_second_sigterm_stops_even_inside_a_commit() -> None:
    steps = []
    with pytest.raises(Terminated), stop_on_sigterm(), commit_section():
        _term()
        steps.append("still committing")
        _term()
        steps.append("never")
    assert steps == ["still committing"]


def test_reassert_puts_the_handler_back_only_while_active() -> None:
    with stop_on_sigterm():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as ray.init does with its own handler
        signals.reassert()
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        with pytest.raises(Terminated):
            _term()
    mine = signal.getsignal(signal.SIGTERM)
    signals.reassert()  # inactive: changes nothing
    assert signal.getsignal(signal.SIGTERM) is mine
