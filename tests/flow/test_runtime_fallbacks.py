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
    """A child's CPU seconds stay in the tree's total after it exits (reaped: its parent's cutime).
    Measured in a fresh interpreter: the test process's own tree (a Ray cluster whose idle workers
    come and go, some reaped by no ancestor) is not a stable baseline."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = (
        "import subprocess, sys\n"
        "from pipeline.flow import runtime\n"
        "before = runtime.process_tree_cpu_s()\n"
        "subprocess.run([sys.executable, '-c', 'x = 0\\nfor i in range(3 * 10**7): x += i'], check=True)\n"
        "print(before, runtime.process_tree_cpu_s())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=300, check=True, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    before, after = (float(v) for v in out.stdout.split())
    assert after - before > 0.5
