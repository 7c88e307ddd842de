"""Benchmark: end-to-end embed pipeline vs the model alone, and the CPU data plane alone.

Usage (from the repo root)::

    python bench/pipeline_bench.py                         # small model, 60 tracks x 30 s
    python bench/pipeline_bench.py --model full            # full-size model, 8 tracks x 30 s (minutes on CPU)
    python bench/pipeline_bench.py --quick --json out.json # smoke test: 4 x 10 s, small model, ~1 min
    python bench/pipeline_bench.py --quick --model mid     # smoke test at a mid size (4 layers x 512)

Everything is measured in ONE run, on the same synthetic audio, on the same machine:

(a) **pipeline vs model-only** (goal: ratio >= 0.9)

    * model-only: :class:`pipeline.engine.inference.WindowEmbedder` in this process on the pre-decoded
      windows of the same audio, same batch size and precision (one untimed warm-up window);
      x realtime = audio seconds / wall seconds.
    * pipeline: :func:`pipeline.runs.embed.run_embed` on a catalog of the same files (it loads the
      model on the driver, decodes in CPU actors, embeds in a model actor and writes the Lance
      store). The benchmark starts the local Ray cluster itself just before (``address="local"``,
      so it never joins a cluster left by ``ray start``) and adds that time to the ``RunReport``'s
      wall: x realtime = audio seconds / (RunReport wall + Ray start); and, with the fixed
      start-up cost taken out, audio seconds / (that wall - Ray start - model load).

(b) **data plane alone** (goal: >= 500x realtime per CPU core): fetch + decode + downmix +
    resample to 24 kHz + window + pool + write, with MusicFM replaced by a pooling-only stage (the
    mean of each window's samples reshaped to D dims):

    * in-process: one process, one loop over the files (``decode_audio`` as the stage calls it);
      per-core rate = audio seconds / CPU seconds of the process (``time.process_time``);
    * Ray: the embed job's own streaming path (``pipeline.flow.streaming.stream_chunks``: ``DecodeStage``
      actor pool -> a ``PoolOnlyStage`` actor that shares ``EmbedStage``'s row handling -> writer
      tasks -> tracks rows and commits on the driver); per-core rate = x realtime / Ray CPUs.
      It runs over the catalog repeated ``--dp-scale`` times so that fixed Ray costs are amortised.

Every row also gives the CPU seconds of the work (for Ray: the driver and every process of the local
cluster, sampled from ``/proc``) and ``other``: the cores that processes *outside* the benchmark kept
busy meanwhile. On a shared machine wall-clock figures (and so the ratios) are only meaningful when
``other`` is near 0; the CPU seconds are much less sensitive to it. The pipeline row also reports the
model's own rate inside its actor (sum of its model-call seconds), which separates the actor's
environment (torch threads) from the pipeline around the model.

Audio: ``--tracks`` synthetic music-like tracks of ``--track-s`` seconds (chords of harmonic tones,
kick / hi-hat beats, noise; 44.1 kHz stereo, so decoding downmixes and resamples), written as a
FLAC / Ogg Vorbis / WAV mix and cached under ``--audio-dir``. Models have random weights:
``--model small`` is ``shared/golden/config.json`` (D=48, 3 layers), ``--model mid`` 4 layers x 512
(128 conv channels; between the two, so that a pool-shape rule tuned on one end is seen at
another), ``--model full`` the released size (D=1024, 12 layers). The pipeline row gives the pool
shape the job chose for the model (model actors x torch threads, decode actors, the memory each
declares) and the cores it kept busy (CPU s ÷ wall of its decode+model pass).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from bench.procstat import machine_busy_s, tree_cpu  # noqa: E402
from pipeline import schemas  # noqa: E402
from pipeline.engine.inference import EmbedSettings, WindowResult  # noqa: E402
from pipeline.flow.guard import ModelGuard  # noqa: E402
from pipeline.flow.stages import EmbedStage  # noqa: E402
from pipeline.io.audio import AudioLimits, decode_audio  # noqa: E402
from pipeline.io.objects import fetch_bytes  # noqa: E402
from pipeline.io.windows import plan_windows  # noqa: E402
from tools.testkit.paths import find_shared  # noqa: E402

SR_IN = 44100
FORMATS = (("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS"), ("wav", "WAV", "PCM_16"))
GOAL_RATIO = 0.9
GOAL_DP_PER_CORE = 500.0
GOAL_DP_RAY_VS_INPROCESS = 0.9  # Ray data plane per core / in-process per core
RAY_NICENESS_ENV = "RAY_worker_niceness"  # Ray config read from the environment (lower-case on purpose)
DP_TARGET_AUDIO_S = 3 * 3600.0  # audio of the Ray data-plane run (amortises Ray's fixed costs)
DP_STEADY_CHUNKS = 8
#: ``--model mid``: 4 layers x 512 wide, 128 conv channels (3.1 GFLOP per audio second).
MID_CONFIG = {
    "encoder_dim": 512,
    "encoder_depth": 4,
    "conv_dim": 128,
    "num_heads": 8,
    "ffn_dim": 2048,
}  # chunks of the Ray data-plane run (its steady-state rate: chunks 2..n)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Meter:
    """Wall time, CPU seconds of this work, and the load of *other* processes while it ran.

    ``tree=False``: CPU of this process (``time.process_time``). ``tree=True``: CPU (user + system)
    of this process and all its descendants (the local Ray cluster and its workers), sampled from
    ``/proc`` every ``interval_s`` (a process that exits between samples loses at most one
    interval). ``other_cores``: average number of cores busy with processes outside this work
    (from ``/proc/stat``) -- on a shared machine, wall-time figures are only comparable when it is
    near 0. CPU figures are None where ``/proc`` is missing.
    """

    def __init__(self, tree: bool = False, interval_s: float = 0.25) -> None:
        self.tree, self.interval_s = tree, interval_s
        self.wall_s = 0.0
        self.cpu_s: float | None = None
        self.other_cores: float | None = None
        self._seen: dict[tuple[int, int], float] = {}
        self._base: dict[tuple[int, int], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _tree() -> dict[tuple[int, int], float]:
        """(pid, start time) -> CPU seconds, for this process and its descendants."""
        return tree_cpu(os.getpid())

    def _update(self) -> None:
        for k, v in self._tree().items():
            self._seen[k] = max(v, self._seen.get(k, 0.0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._update()

    def __enter__(self) -> Meter:
        self._proc = os.path.isdir("/proc")
        self._busy0 = machine_busy_s()
        self._c0 = time.process_time()
        if self.tree and self._proc:
            self._base = self._tree()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        self._w0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._w0
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._update()
            self.cpu_s = sum(v - self._base.get(k, 0.0) for k, v in self._seen.items())
        elif not self.tree:
            self.cpu_s = time.process_time() - self._c0
        busy1 = machine_busy_s()
        if self._busy0 is not None and busy1 is not None and self.cpu_s is not None and self.wall_s > 0:
            self.other_cores = max(0.0, busy1 - self._busy0 - self.cpu_s) / self.wall_s

    def as_dict(self) -> dict[str, float | None]:
        return {"wall_s": self.wall_s, "cpu_s": self.cpu_s, "other_cores": self.other_cores}


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --------------------------------------------------------------------------- synthetic audio


def synth_track(seed: int, seconds: float, sr: int = SR_IN) -> np.ndarray:
    """Music-like stereo audio (N, 2) float32: a chord progression of 3 harmonic voices with
    per-beat envelopes, a kick and a hi-hat on the beat grid, and a little noise."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n, dtype=np.float64) / sr
    beat = 60.0 / rng.uniform(80, 160)
    beat_ix = (t / beat).astype(np.int64)
    in_beat = t - beat_ix * beat  # seconds since the last beat
    n_beats = int(beat_ix[-1]) + 1 if n else 1
    scale = np.array([0, 2, 3, 5, 7, 8, 10])  # natural minor
    root = 110.0 * 2 ** (rng.integers(0, 12) / 12)
    bars = rng.integers(0, 7, size=n_beats // 4 + 1)  # one chord per 4 beats
    env = np.exp(-3.0 * in_beat / beat)
    left = np.zeros(n)
    right = np.zeros(n)
    for v, step in enumerate((0, 2, 4)):  # triad on the scale degree of the bar
        deg = bars[beat_ix // 4] + step
        semis = scale[deg % 7] + 12 * (deg // 7) + 12 * (v == 2)
        freq = root * 2 ** (semis / 12) * (1 + 0.002 * rng.standard_normal())
        phase = 2 * np.pi * np.cumsum(freq) / sr
        tone = sum(np.sin(h * phase) / h**1.5 for h in range(1, 7))
        pan = (v + 1) / 4
        left += (1 - pan) * tone * env
        right += pan * tone * env
    kick = np.sin(2 * np.pi * 50 * in_beat * (1 + 2 * np.exp(-in_beat * 40))) * np.exp(-in_beat * 12)
    half = t - (t / (beat / 2)).astype(np.int64) * (beat / 2)
    hat = rng.standard_normal(n) * np.exp(-half * 80)
    hat = np.diff(hat, prepend=0.0)  # crude high-pass
    noise = 0.02 * rng.standard_normal((n, 2))
    mix = (
        np.stack([0.25 * left + 0.6 * kick + 0.08 * hat, 0.25 * right + 0.6 * kick + 0.1 * hat], axis=1)
        + noise
    )
    mix *= 0.9 / max(1e-9, float(np.abs(mix).max()))
    return mix.astype(np.float32)


def make_audio(audio_dir: Path, tracks: int, track_s: float, seed: int) -> tuple[list[Path], float]:
    """Write (or reuse) the synthetic tracks and ``catalog.csv``; returns (paths, seconds spent)."""
    import soundfile as sf

    t0 = time.perf_counter()
    audio_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(tracks):
        ext, fmt, subtype = FORMATS[i % len(FORMATS)]
        p = audio_dir / f"track{i:05d}.{ext}"
        if not p.exists():
            tmp = p.with_name(f".{p.stem}.partial.{ext}")
            sf.write(str(tmp), synth_track(seed * 1_000_003 + i, track_s), SR_IN, format=fmt, subtype=subtype)
            os.replace(tmp, p)
        paths.append(p)
    return paths, time.perf_counter() - t0


def write_catalog(path: Path, files: Sequence[Path], repeat: int = 1) -> Path:
    """A catalog CSV listing every file ``repeat`` times (distinct track ids)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["track_id", "uri", "title"])
        for r in range(repeat):
            for p in files:
                w.writerow([f"{p.stem}-r{r}", str(p), f"synthetic {p.stem}"])
    return path


# --------------------------------------------------------------------------- pooling-only "model"


def pool_window(x: np.ndarray, dim: int) -> np.ndarray:
    """(N,) samples -> (dim,): mean of the samples reshaped to (-1, dim) (tail dropped)."""
    k = (x.shape[0] // dim) * dim
    if k == 0:
        return np.zeros(dim, np.float32)
    return x[:k].reshape(-1, dim).mean(axis=0, dtype=np.float32)


class PoolEmbedder:
    """Stands in for :class:`WindowEmbedder`: same ``embed`` / ``model_seconds`` interface, no model."""

    def __init__(self, settings: EmbedSettings, dim: int) -> None:
        from musicfm import MusicFMConfig

        self.settings, self.dim = settings, dim
        self.cfg = MusicFMConfig()
        self.model_seconds = 0.0

    def embed(self, audio: Sequence[np.ndarray]) -> list[WindowResult]:
        t0 = time.perf_counter()
        out = []
        for a in audio:
            v = pool_window(a, self.dim)
            out.append(
                WindowResult(
                    means={lay: v * (k + 1) for k, lay in enumerate(self.settings.layers)},
                    n_tokens=self.cfg.num_tokens(int(a.shape[0])),
                )
            )
        self.model_seconds += time.perf_counter() - t0
        return out


class PoolOnlyStage(EmbedStage):
    """:class:`EmbedStage` with the model replaced by :class:`PoolEmbedder` (same row handling)."""

    def __init__(  # EmbedStage's constructor; no model is loaded
        self,
        model_args: dict[str, Any],  # noqa: ARG002
        settings: EmbedSettings,
        batch_size: int,  # noqa: ARG002
        dim: int,
        cpu_threads: int | None = None,  # noqa: ARG002
    ) -> None:
        if settings.frames_hz:
            raise ValueError("the pooling-only stage does not produce frames")
        self.settings = settings
        self.embedder = PoolEmbedder(settings, dim)
        self.guard = ModelGuard(self.embedder)  # the same failure rules as the real stage
        self.dim = dim
        self.schema = schemas.embedded_schema(settings.layers, dim, frames=False)


# --------------------------------------------------------------------------- (b) in-process data plane


def dataplane_inprocess(
    files: Sequence[Path], settings: EmbedSettings, dim: int, workdir: Path, keep_windows: bool
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Loop over the files in this process: read, decode+resample, window (as bytes, like
    ``DecodeStage``), pool, then write a ``windows`` table with Lance. Returns figures and the
    windows (float32 arrays) for the model-only run."""
    import lance

    spec = settings.window_spec()
    limits = AudioLimits()
    parts = dict(read=0.0, decode_resample=0.0, window=0.0, pool=0.0, write=0.0)
    per_fmt: dict[str, list[float]] = {}
    windows: list[np.ndarray] = []
    tid, wix, starts, ends, vecs = [], [], [], [], []
    audio_s = 0.0
    meter = Meter().__enter__()
    for p in files:
        t0 = time.perf_counter()
        c_file = time.process_time()
        data, _version = fetch_bytes(str(p), None, max_bytes=limits.max_bytes)
        t1 = time.perf_counter()
        audio = decode_audio(data, limits)
        del data
        t2 = time.perf_counter()
        wins = plan_windows(audio.samples.shape[0], spec)
        blobs = [audio.samples[w.start : w.end].tobytes() for w in wins]  # what DecodeStage ships
        arrs = [np.frombuffer(b, dtype=np.float32) for b in blobs]
        t3 = time.perf_counter()
        for w, a in zip(wins, arrs, strict=True):
            tid.append(p.stem)
            wix.append(w.ix)
            starts.append(w.start / spec.sample_rate)
            ends.append(w.end / spec.sample_rate)
            vecs.append(pool_window(a, dim))
        t4 = time.perf_counter()
        if keep_windows:
            windows.extend(arrs)
        audio_s += audio.duration_s
        parts["read"] += t1 - t0
        parts["decode_resample"] += t2 - t1
        parts["window"] += t3 - t2
        parts["pool"] += t4 - t3
        fmt = p.suffix.lstrip(".")
        acc = per_fmt.setdefault(fmt, [0.0, 0.0])
        acc[0] += audio.duration_s
        acc[1] += time.process_time() - c_file
    t0 = time.perf_counter()
    n = len(tid)
    flat = np.concatenate(vecs) if vecs else np.zeros(0, np.float32)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
    schema = schemas.windows_schema(settings.layers, dim)
    cols: dict[str, Any] = {
        "track_id": pa.array(tid, pa.string()),
        "window_ix": pa.array(wix, pa.int32()),
        "start_s": pa.array(starts, pa.float64()),
        "end_s": pa.array(ends, pa.float64()),
    }
    for lay in settings.layers:
        cols[schemas.layer_column(lay)] = vec
    cols["settings_id"] = pa.array(["pool-only"] * n, pa.string())
    cols["run_id"] = pa.array(["bench"] * n, pa.string())
    lance.write_dataset(
        pa.table(cols, schema=schema), str(workdir / "inprocess_windows.lance"), mode="overwrite"
    )
    parts["write"] = time.perf_counter() - t0
    meter.__exit__(None, None, None)
    wall_s, cpu_s = meter.wall_s, meter.cpu_s or 0.0
    res = {
        "files": len(files),
        "windows": n,
        "audio_s": audio_s,
        **meter.as_dict(),
        "x_realtime_wall": audio_s / wall_s if wall_s > 0 else 0.0,
        "x_realtime_per_core": audio_s / cpu_s if cpu_s > 0 else 0.0,
        "parts_s": parts,
        "per_format_x_realtime_per_core": {
            f: (a / c if c > 0 else 0.0) for f, (a, c) in sorted(per_fmt.items())
        },
    }
    return res, windows


# --------------------------------------------------------------------------- (a) model only


def model_only(
    windows: Sequence[np.ndarray],
    audio_s: float,
    model_config: str | None,
    settings: EmbedSettings,
    batch_size: int,
) -> dict[str, Any]:
    """WindowEmbedder in this process, batch by batch as ``EmbedStage`` calls it."""
    import torch

    from pipeline.engine.inference import WindowEmbedder, load_model

    t0 = time.perf_counter()
    model = load_model("random", None, model_config, device="cpu")
    load_s = time.perf_counter() - t0
    emb = WindowEmbedder(model, settings, max_batch=batch_size)
    emb.embed(list(windows[:1]))  # warm-up, one window (untimed)
    with Meter() as m:
        for s in range(0, len(windows), batch_size):
            emb.embed(list(windows[s : s + batch_size]))
    return {
        "windows": len(windows),
        "audio_s": audio_s,
        **m.as_dict(),
        "x_realtime": audio_s / m.wall_s if m.wall_s > 0 else 0.0,
        "model_load_s": load_s,
        "torch_threads": torch.get_num_threads(),
        "model_id": model.model_id,
        "dim": model.config.encoder_dim,
        "depth": model.config.encoder_depth,
    }


# --------------------------------------------------------------------------- (a) the pipeline


def start_ray() -> float:
    """Start a fresh local Ray cluster as ``pipeline.flow.runtime.ensure_ray`` does (or join ``RAY_ADDRESS``);
    returns the seconds it took. ``address="local"``: a plain ``ray.init()`` would join a cluster
    left by ``ray start`` on this machine, which would not measure this machine's pipeline."""
    import ray

    os.environ.setdefault("LANCE_LOG", "error")
    kwargs: dict[str, Any] = {
        "configure_logging": True,
        "logging_level": logging.WARNING,
        "log_to_driver": True,
    }
    t0 = time.perf_counter()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        ray.init(address="local", include_dashboard=False, **kwargs)
    return time.perf_counter() - t0


def pipeline_run(
    catalog: Path, out: Path, args: argparse.Namespace, model_config: str | None
) -> dict[str, Any]:
    """``run_embed`` with Ray started just before it (by :func:`start_ray`, timed, counted as start-up)."""
    from pipeline.runs.embed import run_embed
    from pipeline.runs.settings import EmbedJob

    job = EmbedJob(
        catalog=str(catalog),
        output=str(out),
        checkpoint="random",
        model_config=model_config,
        layers=tuple(args.layers),
        precision=args.precision,
        batch_size=args.batch_size,
        decode_cpus=args.decode_cpus,
    )
    with Meter(tree=True) as m:
        ray_start_s = start_ray()
        rep = run_embed(job, progress=False)
    pool = pool_shape(job, rep)
    ray_init = ray_start_s + rep.stage_s.get("ray_init", 0.0)
    model_load = rep.stage_s.get("model_probe", 0.0)  # the driver's one model load
    wall = rep.wall_s + ray_start_s  # the RunReport's wall plus the Ray start it did not see
    net = wall - ray_init - model_load
    return {
        "status": rep.status,
        "tracks_ok": rep.tracks_ok,
        "tracks_failed": rep.tracks_failed,
        "windows": rep.windows,
        "audio_s": rep.audio_s,
        "wall_s": wall,
        "report_wall_s": rep.wall_s,
        "report_x_realtime": rep.x_realtime,
        "cpu_s": m.cpu_s,
        "other_cores": m.other_cores,
        "ray_init_s": ray_init,
        "model_load_s": model_load,
        "x_realtime": rep.audio_s / wall if wall > 0 else 0.0,
        "x_realtime_net": rep.audio_s / net if net > 0 else 0.0,
        "stage_s": {**rep.stage_s, "ray_init": ray_init},
        "model_id": rep.model_id,
        # the model's own rate inside its actor (sum of model-call seconds): separates what the
        # actor's environment (threads) costs from what the pipeline around the model costs
        "model_worker_x_realtime": rep.audio_s / mws if (mws := rep.stage_s.get("model_worker")) else 0.0,
        "busy_cores": rep.busy_cores,
        "pool": pool,
    }


def pool_shape(job: Any, rep: Any) -> dict[str, Any]:
    """The pools the job chose for this model on this cluster (Ray still up after the run): actors
    started, torch threads per model actor, the memory each actor declared, and the rule's inputs."""
    from pipeline.flow.runtime import cpu_model_plan, model_cost, threads_per_model_actor
    from pipeline.flow.streaming import size_pools
    from pipeline.runs.model_info import probe_model

    info = probe_model(job, 0)
    model, decode, pools = size_pools(job, info, rep.tracks_total)
    cost = model_cost(info.config, info.settings.window_s, info.settings.precision)
    plan = cpu_model_plan(decode[1], model[1])
    return {
        "model_actors": model[1],
        "decode_actors": decode[1],
        "threads_per_model_actor": plan.threads,
        "decode_niceness": plan.decode_niceness,
        "rule_threads_per_actor": threads_per_model_actor(cost),
        "gflop_per_audio_s": cost.gflop_per_audio_s,
        "model_memory": pools.model_memory if pools else None,
        "decode_memory": pools.decode_memory if pools else None,
        "batch_size": pools.batch_size if pools else job.batch_size,
        "actors_started": rep.extra.get("actors", {}),
    }


# --------------------------------------------------------------------------- (b) Ray data plane


def dataplane_ray(catalog: Path, out: Path, args: argparse.Namespace, dim: int) -> dict[str, Any]:
    import ray

    from pipeline.engine.model_info import ModelInfo
    from pipeline.flow.streaming import stream_chunks
    from pipeline.runs.plan import catalog_rows
    from pipeline.runs.report import audio_seconds
    from pipeline.runs.settings import EmbedJob
    from pipeline.store.tables import Store

    job = EmbedJob(
        catalog=str(catalog),
        output=str(out),
        checkpoint="random",
        layers=tuple(args.layers),
        precision="fp32",
        batch_size=args.batch_size,
        decode_cpus=args.dp_decode_cpus,
        gpu_actors=1,  # one pooling actor (the job's default without GPUs is one model actor per core)
    )
    settings = EmbedSettings(layers=job.layers, window_s=job.window_s, hop_s=job.hop_s, precision="fp32")
    info = ModelInfo(
        model_id="pool-only",
        dim=dim,
        depth=max(job.layers),
        settings=settings,
        settings_id=settings.settings_id("pool-only"),
        gpus=0,
    )
    stage_s: dict[str, float] = {}
    meter = Meter(tree=True).__enter__()
    rows, _rejected, meta_cols = catalog_rows(job)
    store = Store(job.output)
    counts = {"tracks_ok": 0, "windows": 0, "errors": 0}

    done_at: list[tuple[float, float]] = []  # (perf_counter, audio seconds) per finished chunk

    def on_chunk(out: Any) -> None:  # the job's own pass; data files written, commits left out
        counts["tracks_ok"] += out.tracks.num_rows
        counts["windows"] += out.times.num_rows
        counts["errors"] += len(out.error_rows)
        done_at.append((time.perf_counter(), audio_seconds(out.times)))

    # several chunks, so that the rate between the first and the last one (the steady state: actor
    # start and pipeline fill excluded) can be measured beside the whole pass's
    chunk_size = max(1, -(-len(rows) // DP_STEADY_CHUNKS))
    res = stream_chunks(
        rows, job, info, store, "bench", meta_cols, chunk_size, on_chunk, stage_s, model_stage=PoolOnlyStage
    )
    meter.__exit__(None, None, None)
    wall = meter.wall_s
    audio_s = audio_seconds(res.times)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    x_rt = audio_s / wall if wall > 0 else 0.0
    dec = stage_s.get("decode_worker", 0.0)
    return {
        "tracks": len(rows),
        "tracks_ok": counts["tracks_ok"],
        "windows": counts["windows"],
        "errors": counts["errors"],
        "audio_s": audio_s,
        **meter.as_dict(),
        "ray_cpus": cpus,
        "x_realtime": x_rt,
        "x_realtime_per_core": x_rt / cpus,
        **steady_state(done_at, cpus),
        "stage_s": stage_s,
        "x_realtime_per_cpu_s": audio_s / meter.cpu_s if meter.cpu_s else None,
        "x_realtime_decode_stage": audio_s / stage_s["decode+model"] if stage_s.get("decode+model") else 0.0,
        "decode_worker_x_realtime": audio_s / dec if dec > 0 else 0.0,
    }


def steady_state(done_at: list[tuple[float, float]], cpus: float) -> dict[str, Any]:
    """x realtime per core between the first and the last finished chunk: the audio of chunks
    2..n over the time between their ends. This leaves out the pass's fixed costs (actors
    starting, the pipeline filling) that a catalog of 10M tracks amortises; the Ray daemons and
    every per-block cost stay in."""
    if len(done_at) < 3:
        return {"steady_chunks": len(done_at), "steady_x_realtime_per_core": None}
    done_at = sorted(done_at)
    t0 = done_at[0][0]
    span = done_at[-1][0] - done_at[0][0]
    audio = sum(a for _, a in done_at[1:])
    return {
        "steady_chunks": len(done_at) - 1,
        "steady_s": span,
        "steady_audio_s": audio,
        "steady_x_realtime_per_core": audio / span / cpus if span > 0 else None,
        "chunk_done_s": [round(t - t0, 2) for t, _ in done_at],  # from the first chunk's end
    }


# --------------------------------------------------------------------------- report


def _f(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def _met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def _row(
    label: str,
    audio_s: float,
    wall_s: float | None,
    cpu_s: float | None,
    other: float | None,
    x_rt: float,
    per_core: float | None = None,
    nd: int = 2,
) -> str:
    return (
        f"{label:54s}{_f(audio_s, 0):>8s}{_f(wall_s):>8s}{_f(cpu_s):>8s}{_f(other, 2):>7s}"
        f"{_f(x_rt, nd):>11s}{_f(per_core, 0):>10s}"
    )


def render(r: dict[str, Any]) -> str:
    c, mo, pl = r["config"], r["model_only"], r["pipeline"]
    dpi, dpr, g = r["dataplane_inprocess"], r["dataplane_ray"], r["goals"]
    head = f"D={mo['dim']}, depth {mo['depth']}, " if mo else ""
    lines = [
        f"MusicFM pipeline benchmark: model {c['model']} (random weights, {head}"
        f"layers {','.join(map(str, c['layers']))}), {c['precision']}, batch {c['batch_size']}, "
        f"{c['cpus']} CPUs, load avg {c['loadavg_start']} -> {c['loadavg_end']}",
        f"audio: {c['tracks']} tracks x {c['track_s']:g} s (flac/ogg/wav, 44.1 kHz stereo) = "
        f"{r['audio']['audio_s']:.0f} s",
        "",
        f"{'':54s}{'audio s':>8s}{'wall s':>8s}{'cpu s':>8s}{'other':>7s}{'x realtime':>11s}{'per core':>10s}",
    ]
    if mo:
        fixed = pl["ray_init_s"] + pl["model_load_s"]
        lines += [
            _row(
                f"(a) model only: WindowEmbedder, {mo['torch_threads']} torch threads",
                mo["audio_s"],
                mo["wall_s"],
                mo["cpu_s"],
                mo["other_cores"],
                mo["x_realtime"],
            ),
            _row(
                f"(a) pipeline run_embed, {c['decode_cpus']} decode actors (+ Ray start)",
                pl["audio_s"],
                pl["wall_s"],
                pl["cpu_s"],
                pl["other_cores"],
                pl["x_realtime"],
            ),
            _row(
                f"    excl. ray start {pl['ray_init_s']:.1f} s + model load {pl['model_load_s']:.1f} s",
                pl["audio_s"],
                pl["wall_s"] - fixed,
                None,
                None,
                pl["x_realtime_net"],
            ),
            "    stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in pl["stage_s"].items()),
            f"    model calls inside the model actor: {pl['model_worker_x_realtime']:.2f}x realtime "
            f"(= {g['actor_vs_model_only']['value']:.2f} x model-only)",
            f"    pool: {pl['pool']['model_actors']} model actor(s) x {pl['pool']['threads_per_model_actor']} "
            f"torch threads ({pl['pool']['gflop_per_audio_s']:.1f} GFLOP per audio s), "
            f"{pl['pool']['decode_actors']} decode actor(s) at nice {pl['pool']['decode_niceness']}; "
            f"memory declared {_f((pl['pool']['model_memory'] or 0) / 2**30, 2)} GiB per model actor, "
            f"{_f((pl['pool']['decode_memory'] or 0) / 2**30, 2)} GiB per decoder; "
            f"busy cores {_f(pl['busy_cores'], 2)} of {c['cpus']}",
        ]
    lines += [
        _row(
            "(b) data plane in-process: read+decode+window+pool+write",
            dpi["audio_s"],
            dpi["wall_s"],
            dpi["cpu_s"],
            dpi["other_cores"],
            dpi["x_realtime_wall"],
            dpi["x_realtime_per_core"],
            0,
        ),
        "    parts (wall s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in dpi["parts_s"].items())
        + "; x realtime per core by format: "
        + ", ".join(f"{k} {v:,.0f}" for k, v in dpi["per_format_x_realtime_per_core"].items()),
        _row(
            f"(b) data plane Ray: catalog x{c['dp_scale']}, {c['dp_decode_cpus']} decode actors",
            dpr["audio_s"],
            dpr["wall_s"],
            dpr["cpu_s"],
            dpr["other_cores"],
            dpr["x_realtime"],
            dpr["x_realtime_per_core"],
            0,
        ),
        "    stages: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in dpr["stage_s"].items())
        + f"; streaming pass (decode+pool+write) alone {dpr['x_realtime_decode_stage']:,.0f}x realtime"
        + f"; per busy decode worker {dpr['decode_worker_x_realtime']:,.0f}x"
        + f"; per CPU second of all Ray processes {_f(dpr['x_realtime_per_cpu_s'], 0)}x",
        f"    steady state (chunks 2..{dpr['steady_chunks'] + 1}, after actor start and pipeline fill): "
        f"{_f(dpr['steady_x_realtime_per_core'], 0)}x realtime per core",
        "    (other = cores busy with processes outside the benchmark; wall figures assume it is ~0;",
        "     per core = x realtime per CPU second of the loop (in-process) or x realtime / Ray CPUs)",
        "",
    ]
    if mo:
        lines += [
            f"(a) pipeline / model-only: {g['ratio_report']['value']:.3f} with start-up, "
            f"{g['ratio_net']['value']:.3f} without; goal >= {GOAL_RATIO}: "
            f"{_met(g['ratio_report']['met'])} / {_met(g['ratio_net']['met'])}",
            f"    CPU seconds for the same audio: model-only {_f(mo['cpu_s'])}, pipeline {_f(pl['cpu_s'])} "
            f"(driver + Ray processes) = x{g['cpu_overhead']['value']:.2f}",
        ]
    lines += [
        f"(b) data plane per core: {g['dp_inprocess']['value']:,.0f}x in-process, "
        f"{g['dp_ray']['value']:,.0f}x Ray; goal >= {GOAL_DP_PER_CORE:g}x: "
        f"{_met(g['dp_inprocess']['met'])} / {_met(g['dp_ray']['met'])}",
        f"(b) Ray / in-process per core: {g['dp_ray_vs_inprocess']['value']:.2f} "
        f"(per CPU second of all Ray processes: {g['dp_ray_vs_inprocess_cpu']['value']:.2f}); "
        f"goal >= {GOAL_DP_RAY_VS_INPROCESS}: {_met(g['dp_ray_vs_inprocess']['met'])}",
        f"(b) Ray / in-process per core in the steady state: {_f(g['dp_ray_vs_inprocess_steady']['value'], 2)} "
        f"(a whole pass's fixed costs left out); goal >= {GOAL_DP_RAY_VS_INPROCESS}: "
        f"{_met(g['dp_ray_vs_inprocess_steady']['met'])}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bench/pipeline_bench.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--model",
        choices=["small", "mid", "full"],
        default="small",
        help="small: shared/golden/config.json sizes; mid: 4 x 512; full: released sizes (random weights)",
    )
    ap.add_argument("--model-config", default=None, help="MusicFMConfig JSON (overrides --model's sizes)")
    ap.add_argument("--layers", default=None, help="layers to store (default: small 1,3; full 7,12)")
    ap.add_argument("--tracks", type=int, default=None, help="synthetic tracks (default: small 60, full 8)")
    ap.add_argument("--track-s", type=float, default=None, help="seconds per track (default 30)")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per model call (default 8)")
    ap.add_argument(
        "--decode-cpus",
        type=int,
        default=None,
        help="decode actors (default: CPUs - 1, at least 1, so they fit beside the model actor)",
    )
    ap.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="model precision (default fp32)"
    )
    ap.add_argument(
        "--dp-scale",
        type=int,
        default=None,
        help="the Ray data-plane run lists the catalog this many times (default: enough for "
        ">= 3 h of audio; 1 with --quick)",
    )
    ap.add_argument(
        "--dp-decode-cpus",
        type=int,
        default=None,
        help="decode actors of the Ray data-plane run (default: all CPUs)",
    )
    ap.add_argument(
        "--audio-dir",
        type=Path,
        default=None,
        help="where the synthetic audio is cached (default: $TMPDIR/musicfm-bench-audio/...)",
    )
    ap.add_argument(
        "--ray-worker-niceness",
        type=int,
        default=0,
        help="nice value of the Ray workers of the local cluster (Ray's own default is 15, which on a "
        "machine shared with other work starves the pipeline against the in-process baseline; on a "
        "dedicated machine it changes nothing) (default 0)",
    )
    ap.add_argument(
        "--parts",
        default="a,b",
        help="a,b: everything (default); b: the data plane alone",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 4 tracks x 10 s, small model, batch 4, data-plane Ray run x1 with 1 decode actor",
    )
    ap.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="write all figures to this JSON file"
    )
    return ap


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    args.parts = [p.strip() for p in str(args.parts).split(",") if p.strip()]
    if "b" not in args.parts or set(args.parts) - {"a", "b"}:
        raise SystemExit("--parts: a,b (everything) or b (the data plane alone)")
    if args.quick:
        args.model = "mid" if args.model == "mid" else "small"
        args.tracks = args.tracks or 4
        args.track_s = args.track_s or 10.0
        args.batch_size = min(args.batch_size, 4)
        args.dp_scale = args.dp_scale or 1
        args.dp_decode_cpus = args.dp_decode_cpus or 1  # one worker process fewer to start
    args.tracks = args.tracks or (60 if args.model == "small" else 8)
    args.track_s = args.track_s or 30.0
    if args.layers is None:
        args.layers = {"small": "1,3", "mid": "2,4"}.get(args.model, "7,12")
    args.layers = [int(x) for x in str(args.layers).split(",") if x.strip()]
    if args.decode_cpus is None:
        args.decode_cpus = max(1, cpu_count() - 1)
    if args.dp_decode_cpus is None:
        args.dp_decode_cpus = cpu_count()
    if args.model_config is None and args.model == "small":
        shared = find_shared()
        if shared is None:
            raise SystemExit("cannot find shared/golden/config.json for --model small; set MUSICFM_SHARED")
        args.model_config = str(shared / "golden" / "config.json")
    if args.model_config is None and args.model == "mid":
        path = Path(tempfile.gettempdir()) / "musicfm-bench-mid-config.json"
        path.write_text(json.dumps(MID_CONFIG))
        args.model_config = str(path)
    if args.tracks < 1 or args.track_s <= 0 or args.batch_size < 1 or args.decode_cpus < 1:
        raise SystemExit("--tracks, --track-s, --batch-size and --decode-cpus must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = resolve_args(build_parser().parse_args(argv))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.ray_worker_niceness is not None:  # read by the raylet the benchmark starts
        os.environ[RAY_NICENESS_ENV] = str(args.ray_worker_niceness)
    os.environ.setdefault("RAY_ACCEPT_CLUSTER_SPAWN", "1")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    load0 = loadavg()
    tag = hashlib.sha256(f"{args.tracks}|{args.track_s}|{args.seed}|v1".encode()).hexdigest()[:10]
    audio_dir = args.audio_dir or Path(tempfile.gettempdir()) / "musicfm-bench-audio" / (
        f"{args.tracks}x{args.track_s:g}s-{tag}"
    )
    files, gen_s = make_audio(audio_dir, args.tracks, args.track_s, args.seed)
    print(f"audio: {len(files)} files in {audio_dir} ({gen_s:.1f} s to prepare)", file=sys.stderr)

    settings = EmbedSettings(layers=tuple(args.layers), precision=args.precision)
    work = Path(tempfile.mkdtemp(prefix="musicfm-bench-"))
    try:
        from musicfm import MusicFMConfig

        cfg = MusicFMConfig.from_json(args.model_config) if args.model_config else MusicFMConfig()
        bad = [i for i in args.layers if i > cfg.encoder_depth]
        if bad:
            raise SystemExit(f"--layers {bad} exceed the model depth {cfg.encoder_depth}")

        part_a = "a" in args.parts
        print("(b) data plane, in-process ...", file=sys.stderr)
        dpi, windows = dataplane_inprocess(files, settings, cfg.encoder_dim, work, keep_windows=part_a)
        import ray

        ray.data.DataContext.get_current().print_on_execution_start = False
        mo: dict[str, Any] = {}
        pl: dict[str, Any] = {}
        if part_a:
            print("(a) model only ...", file=sys.stderr)
            mo = model_only(windows, dpi["audio_s"], args.model_config, settings, args.batch_size)
            del windows
            catalog = write_catalog(audio_dir / "catalog.csv", files)
            print("(a) pipeline (run_embed) ...", file=sys.stderr)
            pl = pipeline_run(catalog, work / "store", args, args.model_config)
        else:
            start_ray()  # not timed: the data-plane figures start after it

        scale = args.dp_scale or max(1, math.ceil(DP_TARGET_AUDIO_S / max(dpi["audio_s"], 1e-9)))
        dp_catalog = write_catalog(audio_dir / f"catalog_x{scale}.csv", files, repeat=scale)
        print(f"(b) data plane, Ray (catalog x{scale}) ...", file=sys.stderr)
        dpr = dataplane_ray(dp_catalog, work / "dp_store", args, cfg.encoder_dim)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratio_report = pl["x_realtime"] / mo["x_realtime"] if mo and mo["x_realtime"] > 0 else 0.0
    ratio_net = pl["x_realtime_net"] / mo["x_realtime"] if mo and mo["x_realtime"] > 0 else 0.0
    dp_ratio = dpr["x_realtime_per_core"] / dpi["x_realtime_per_core"] if dpi["x_realtime_per_core"] else 0.0
    dp_cpu_ratio = (
        (dpr["x_realtime_per_cpu_s"] or 0.0) / dpi["x_realtime_per_core"]
        if dpi["x_realtime_per_core"]
        else 0.0
    )
    steady = dpr.get("steady_x_realtime_per_core")
    dp_steady = steady / dpi["x_realtime_per_core"] if steady and dpi["x_realtime_per_core"] else None
    result: dict[str, Any] = {
        "config": {
            "model": args.model,
            "model_config": args.model_config,
            "layers": args.layers,
            "tracks": args.tracks,
            "track_s": args.track_s,
            "batch_size": args.batch_size,
            "decode_cpus": args.decode_cpus,
            "dp_decode_cpus": args.dp_decode_cpus,
            "ray_worker_niceness": args.ray_worker_niceness,
            "precision": args.precision,
            "dp_scale": scale,
            "quick": args.quick,
            "parts": args.parts,
            "cpus": cpu_count(),
            "loadavg_start": load0,
            "loadavg_end": loadavg(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "audio": {"dir": str(audio_dir), "files": len(files), "audio_s": dpi["audio_s"], "prepare_s": gen_s},
        "model_only": mo,
        "pipeline": pl,
        "dataplane_inprocess": dpi,
        "dataplane_ray": dpr,
        "goals": {
            "ratio_report": {"value": ratio_report, "goal": GOAL_RATIO, "met": ratio_report >= GOAL_RATIO},
            "ratio_net": {"value": ratio_net, "goal": GOAL_RATIO, "met": ratio_net >= GOAL_RATIO},
            "actor_vs_model_only": {
                "value": pl["model_worker_x_realtime"] / mo["x_realtime"]
                if mo and mo["x_realtime"] > 0
                else 0.0
            },
            "cpu_overhead": {"value": (pl["cpu_s"] or 0.0) / mo["cpu_s"] if mo and mo["cpu_s"] > 0 else 0.0},
            # the Ray data plane against the in-process one, per core (x realtime / Ray CPUs, over
            # the whole pass) and per CPU second of every process of the cluster
            "dp_ray_vs_inprocess": {
                "value": dp_ratio,
                "goal": GOAL_DP_RAY_VS_INPROCESS,
                "met": dp_ratio >= GOAL_DP_RAY_VS_INPROCESS,
            },  # fmt: skip
            "dp_ray_vs_inprocess_cpu": {
                "value": dp_cpu_ratio,
                "goal": GOAL_DP_RAY_VS_INPROCESS,
                "met": dp_cpu_ratio >= GOAL_DP_RAY_VS_INPROCESS,
            },  # fmt: skip
            "dp_ray_vs_inprocess_steady": {
                "value": dp_steady,
                "goal": GOAL_DP_RAY_VS_INPROCESS,
                "met": dp_steady is not None and dp_steady >= GOAL_DP_RAY_VS_INPROCESS,
            },
            "dp_inprocess": {
                "value": dpi["x_realtime_per_core"],
                "goal": GOAL_DP_PER_CORE,
                "met": dpi["x_realtime_per_core"] >= GOAL_DP_PER_CORE,
            },
            "dp_ray": {
                "value": dpr["x_realtime_per_core"],
                "goal": GOAL_DP_PER_CORE,
                "met": dpr["x_realtime_per_core"] >= GOAL_DP_PER_CORE,
            },
        },
    }
    print(render(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
