"""The RSS sampler of the load and memory tests (tools.testkit.reliability.PeakRss) counts its
samples and never stops silently: an error while sampling is raised by ``finish()``."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tools.testkit.reliability import PeakRss


def test_sampler_samples_until_finished() -> None:
    mon = PeakRss(period_s=0.02)
    mon.start()
    time.sleep(0.3)
    mon.finish()
    assert mon.samples >= 2 and mon.peak > 0 and mon.error is None
    assert not mon.is_alive()


def test_sampler_raises_what_stopped_it() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    mon = PeakRss(pid=child.pid, period_s=0.02)
    mon.start()
    child.wait()
    deadline = time.time() + 10
    while mon.is_alive() and time.time() < deadline:  # the next sample finds the process gone
        time.sleep(0.05)
    with pytest.raises(
        RuntimeError, match="the RSS sampler failed after [1-9][0-9]* samples: .*NoSuchProcess"
    ):
        mon.finish()
