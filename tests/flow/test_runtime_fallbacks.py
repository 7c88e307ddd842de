"""The runtime's reads of Ray's internal tables never fail silently: when the actor table cannot
be read, each caller logs a warning with the reason and says what is then unknown."""

from __future__ import annotations

import logging

import pytest

from pipeline.flow import runtime


@pytest.fixture
def no_actor_table(monkeypatch):
    import ray._private.state

    def broken():
        raise ConnectionError("GCS unreachable")

    monkeypatch.setattr(ray._private.state, "actors", broken)


def test_unreadable_actor_table_is_a_warning_with_its_reason(no_actor_table, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.flow.runtime"):
        assert runtime.actor_ids() == set()
        assert runtime.actor_restarts(set()) == {}
        assert runtime.actors_started(set()) == {}
        assert runtime.stop_stage_actors(set()) == 0
    text = [r.getMessage() for r in caplog.records]
    assert sum("ConnectionError: GCS unreachable" in t for t in text) == 4, text
    assert any("restarts of this run are unknown" in t for t in text)
    assert any("actors this run started are unknown" in t for t in text)
    assert any("cannot stop this run's stage actors" in t for t in text)
    assert any("other runs may be counted" in t for t in text)


def test_process_tree_cpu_counts_children_that_ended() -> None:
    """A child's CPU seconds stay in the tree's total after it exits (reaped: its parent's cutime)."""
    import subprocess
    import sys

    before = runtime.process_tree_cpu_s()
    subprocess.run([sys.executable, "-c", "x = 0\nfor i in range(3 * 10**7): x += i"], check=True)
    after = runtime.process_tree_cpu_s()
    assert before is not None and after is not None and after - before > 0.5
