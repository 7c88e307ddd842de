"""Helpers of the reliability tests and the soak benchmark: synthetic audio, catalogs, store checks,
fault injection, process watchers. Importable by Ray workers (the session cluster and the soak
benchmark put the repository root on PYTHONPATH)."""

from __future__ import annotations

import csv
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.flow.stages import DecodeStage
from tools.testkit.paths import REPO, require_shared

GOLDEN = require_shared() / "golden"
CKPT, STATS = str(GOLDEN / "checkpoint.pt"), str(GOLDEN / "stats.json")
JOB = str(REPO / "jobs" / "embed_catalog.py")
LAYERS = (1, 3)


def tone(seconds: float, sr: int = 24000, channels: int = 1, seed: int = 0) -> np.ndarray:
    """(N, C) float32: a seeded chord plus noise, distinct per seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f = 110.0 * (1 + seed % 17)
    x = 0.2 * np.sin(2 * np.pi * f * t) + 0.1 * np.sin(2 * np.pi * 1.5 * f * t)
    x = x + 0.02 * rng.standard_normal(t.shape[0])
    return np.stack([x * (1 - 0.1 * c) for c in range(channels)], 1).astype(np.float32)


def write_tracks(
    d: Path, n: int, seconds: float = 2.0, prefix: str = "t", fmt: str = "wav", sr: int = 24000
) -> dict[str, str]:
    """Write ``n`` short files into ``d``; returns track_id -> file name."""
    import soundfile as sf

    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        name = f"{prefix}{i:05d}.{fmt}"
        sf.write(d / name, tone(seconds, sr, 1, seed=i), sr, format=fmt.upper() if fmt != "ogg" else "OGG")
        out[f"{prefix}{i:05d}"] = name
    return out


def write_catalog(path: Path, rows: Sequence[dict[str, Any]], fields: Sequence[str] | None = None) -> Path:
    fields = list(fields or ["track_id", "uri", "title"])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def job_kwargs(**kw: Any) -> dict[str, Any]:
    base = dict(
        checkpoint=CKPT,
        stats=STATS,
        layers=LAYERS,
        precision="fp32",
        window_s=1.0,
        hop_s=1.0,
        batch_size=8,
        decode_cpus=2,
    )
    base.update(kw)
    return base


# --------------------------------------------------------------------------- store invariants


def store_tables(root: str, storage_options: dict | None = None, version: dict | None = None) -> dict:
    """Every table of a Lance store as pyarrow tables (None when absent)."""
    from pipeline.schemas import TABLES
    from pipeline.store.tables import Store

    st = Store(root, storage_options)
    out = {}
    for t in TABLES:
        ds = st.open(t, (version or {}).get(t))
        out[t] = None if ds is None else ds.to_table()
    return out


def check_store(tables: dict, expect_tracks: Iterable[str] | None = None) -> dict[str, Any]:
    """Assert the invariants of a store; return a few figures.

    unique track ids; every track's windows present (0..num_windows-1, once each) and no windows of
    unknown tracks; finite vectors everywhere; the expected track set when given.
    """
    tracks, windows = tables["tracks"], tables["windows"]
    assert tracks is not None and windows is not None
    if "run_id" in tracks.column_names and "run_id" in windows.column_names:
        # what readers see: windows joined to tracks on (track_id, run_id); rows of a killed
        # run's uncommitted chunk are invisible to them (and swept by the next run)
        current = set(zip(tracks["track_id"].to_pylist(), tracks["run_id"].to_pylist(), strict=True))
        keys = zip(windows["track_id"].to_pylist(), windows["run_id"].to_pylist(), strict=True)
        windows = windows.filter(pa.array([k in current for k in keys], pa.bool_()))
    ids = tracks["track_id"].to_pylist()
    assert len(ids) == len(set(ids)), "duplicate track ids in tracks"
    if expect_tracks is not None:
        exp = set(expect_tracks)
        assert set(ids) == exp, (
            f"missing {sorted(exp - set(ids))[:10]}, unexpected {sorted(set(ids) - exp)[:10]}"
        )
    nwin = dict(zip(ids, tracks["num_windows"].to_pylist(), strict=True))
    seen: dict[str, list[int]] = {}
    for tid, ix in zip(windows["track_id"].to_pylist(), windows["window_ix"].to_pylist(), strict=True):
        seen.setdefault(tid, []).append(ix)
    assert set(seen) == set(ids), "windows of unknown tracks, or tracks without windows"
    for tid, ixs in seen.items():
        assert sorted(ixs) == list(range(nwin[tid])), f"{tid}: windows {sorted(ixs)} != 0..{nwin[tid] - 1}"
    for t in (tracks, windows):
        for name in t.column_names:
            if name.startswith("layer_"):
                flat = t[name].combine_chunks().flatten().to_numpy(zero_copy_only=False)
                assert np.isfinite(flat).all(), f"non-finite values in {name}"
    return {"tracks": len(ids), "windows": windows.num_rows}


def vectors_by_track(tables: dict, layer: int = LAYERS[-1]) -> dict[str, np.ndarray]:
    t = tables["tracks"]
    return {
        tid: np.asarray(v, np.float32)
        for tid, v in zip(t["track_id"].to_pylist(), t[f"layer_{layer}"].to_pylist(), strict=True)
    }


# --------------------------------------------------------------------------- fault injection


class CrashingDecodeStage(DecodeStage):
    """DecodeStage that kills its own process (SIGSEGV) on any uri containing ``POISON``, and
    takes at least 0.1 s per track (so that a test's actor killer finds the pool mid-work)."""

    def _one(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        if "POISON" in str(row.get("uri")):
            os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(30)  # never reached
        time.sleep(0.1)
        return super()._one(row)


def stage_actors(name: str) -> list[dict]:
    """Alive actors of this cluster whose class name contains ``name`` (GCS actor table)."""
    import ray._private.state

    return [
        a
        for a in ray._private.state.actors().values()
        if name in str(a.get("ActorClassName")) and a.get("State") == "ALIVE" and a.get("Pid")
    ]


class ActorKiller(threading.Thread):
    """Kills (SIGKILL) the first alive actor matching ``name`` once ``when()`` is true, ``times`` times."""

    def __init__(
        self, name: str, delay_s: float = 0.5, times: int = 1, when: Callable[[], bool] | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.name, self.delay_s, self.times, self.when = name, delay_s, times, when
        self.killed: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.time() + 300
        while len(self.killed) < self.times and not self.stop.is_set() and time.time() < deadline:
            acts = stage_actors(self.name)
            if acts and (self.when is None or self.when()):
                time.sleep(self.delay_s)
                pid = int(acts[0]["Pid"])
                if pid in self.killed:
                    time.sleep(0.2)
                    continue
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                except ProcessLookupError:
                    pass
                time.sleep(1.0)
            else:
                time.sleep(0.1)


def load_psutil() -> Any:
    """psutil: installed, or the copy Ray vendors (on sys.path once ``ray`` is imported)."""
    import importlib

    import ray  # noqa: F401

    return importlib.import_module("psutil")


class PeakRss(threading.Thread):
    """Samples the RSS of a process (and optionally its Ray worker processes) every ``period_s``.

    It never stops silently: an error while sampling ends the thread and :meth:`finish` raises it.
    ``samples`` counts the samples taken, ``worker_samples`` those that found Ray workers."""

    def __init__(self, pid: int | None = None, period_s: float = 0.2, workers: bool = False) -> None:
        super().__init__(daemon=True)
        psutil = load_psutil()
        self.proc = psutil.Process(pid or os.getpid())
        self.period_s, self.workers = period_s, workers
        self.peak = 0
        self.worker_peak = 0  # largest single worker
        self.workers_total_peak = 0  # sum over workers at one instant
        self.samples = 0
        self.worker_samples = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def _worker_rss(self) -> list[int]:
        """RSS of this cluster's Ray workers: descendants of the sampled process (the driver that
        started the cluster) titled ``ray::...`` or running ``default_worker.py``."""
        psutil = load_psutil()
        out = []
        for p in self.proc.children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
                if cmd.startswith("ray::") or "default_worker.py" in cmd:
                    out.append(p.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue  # a worker that exited between the listing and the read
        return out

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                self.peak = max(self.peak, self.proc.memory_info().rss)
                if self.workers:
                    rss = self._worker_rss()
                    if rss:
                        self.worker_peak = max(self.worker_peak, max(rss))
                        self.workers_total_peak = max(self.workers_total_peak, sum(rss))
                        self.worker_samples += 1
                self.samples += 1
                self._halt.wait(self.period_s)
        except BaseException as e:  # kept for finish(), which raises it
            self.error = e

    def finish(self) -> PeakRss:
        """Stops sampling; raises RuntimeError when the sampler failed or did not stop."""
        self._halt.set()
        self.join(5)
        if self.is_alive():
            raise RuntimeError("the RSS sampler did not stop within 5 s")
        if self.error is not None:
            raise RuntimeError(
                f"the RSS sampler failed after {self.samples} samples: {self.error!r}"
            ) from self.error
        return self


def grep_tree(root: Path, needles: Sequence[str], max_bytes: int = 50 * 1024**2) -> list[str]:
    """Files under ``root`` whose bytes contain any needle: ``["path: needle", ...]``."""
    hits = []
    bneedles = [n.encode() for n in needles]
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            try:
                if os.path.islink(p) or os.path.getsize(p) > max_bytes:
                    continue
                data = Path(p).read_bytes()
            except OSError:
                continue
            for n, b in zip(needles, bneedles, strict=True):
                if b in data:
                    hits.append(f"{p}: {n}")
    return hits
