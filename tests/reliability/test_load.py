"""Load: many tiny files go through with flat driver memory and no object-store spilling.

CI: 2,000 files of 0.25 s; --run-slow: 10,000. A short warm-up run (the first 8 rows, via
--limit) pays the driver's one-time costs (Ray Data, model probe) first, so the figure checked is
what the big run adds. Peak RSS of the driver and of this cluster's workers is sampled (psutil)
and printed for docs/reliability.md.
"""

from __future__ import annotations

import re
import time

import pytest

from pipeline.runs.embed import run_embed
from pipeline.runs.settings import EmbedJob
from tools.testkit.reliability import PeakRss, job_kwargs, write_catalog, write_tracks

DRIVER_GROWTH_MAX = 96 * 1024**2


def _spilled_bytes(ray) -> int:
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Spilled (\d+) MiB", text)
    return int(m.group(1)) * 1024**2 if m else 0


def _load(ray, tmp_path, n: int) -> None:
    d = tmp_path / "cat"
    good = write_tracks(d, n, seconds=0.25, sr=16000)
    catalog = write_catalog(d / "catalog.csv", [{"track_id": k, "uri": v} for k, v in good.items()])
    kw = job_kwargs(batch_size=64)
    run_embed(EmbedJob(catalog=str(catalog), output=str(tmp_path / "warm"), limit=8, **kw), progress=False)
    spilled0 = _spilled_bytes(ray)
    mon = PeakRss(workers=True, period_s=0.25)
    mon.start()
    time.sleep(0.3)
    base = mon.proc.memory_info().rss
    t0 = time.perf_counter()
    report = run_embed(EmbedJob(catalog=str(catalog), output=str(tmp_path / "store"), **kw), progress=False)
    wall = time.perf_counter() - t0
    mon.finish()
    spilled = _spilled_bytes(ray) - spilled0
    mb = 1024**2
    print(
        f"load {n}: {wall:.1f} s, driver {base / mb:.0f} -> peak {mon.peak / mb:.0f} MB "
        f"(+{(mon.peak - base) / mb:.0f}), largest worker {mon.worker_peak / mb:.0f} MB, "
        f"all workers {mon.workers_total_peak / mb:.0f} MB, spilled {spilled / mb:.0f} MB, {report.stage_s}"
    )
    assert report.status == "ok" and report.tracks_ok == n and report.tracks_failed == 0
    assert report.windows == n
    # it sampled all along (a tenth of the periods at least, on a loaded machine), workers included
    assert mon.samples >= max(2, wall / mon.period_s / 10) and mon.worker_samples >= 1, (
        mon.samples,
        mon.worker_samples,
        wall,
    )
    assert mon.peak - base < DRIVER_GROWTH_MAX, (base, mon.peak)
    assert spilled == 0


def test_2000_tiny_files(ray_cluster, tmp_path) -> None:
    _load(ray_cluster, tmp_path, 2000)


@pytest.mark.slow
def test_10000_tiny_files(ray_cluster, tmp_path) -> None:
    _load(ray_cluster, tmp_path, 10_000)
