"""Benchmark: the embed job (``jobs/embed_catalog.py``) against a plain in-process loop, same tracks.

Usage (from the repo root)::

    python bench/job_vs_loop.py                    # 32 real tracks, ~1.3 h of audio, golden model
    python bench/job_vs_loop.py --hours 2 --json out.json
    python bench/job_vs_loop.py --hours 1.3,4          # two sizes: the steady-state ratio, fitted
    python bench/job_vs_loop.py --quick            # smoke test: 4 tracks x ~60 s
    python bench/job_vs_loop.py --only job         # the job alone (profiling)

Catalog: the shared real clips (``shared/audio/clips``: Ogg Vorbis, Opus, FLAC 16/24-bit, WAV
PCM16/float, MP3; 22.05-48 kHz, mono and stereo) each looped to a track of 1.5-4 minutes and
written in the clip's own format, sample rate and channels (soundfile), until the catalog holds
``--hours`` of audio. Files are cached under ``$TMPDIR/musicfm-bench-real/``.

Model: the golden small model (``shared/golden``: ``checkpoint.pt`` + ``stats.json`` +
``config.json``, D=48, 3 layers), fp32, layers ``--layers`` (default 1,3), 30 s windows.

Measured in one run, back to back on the same files:

* **loop**: this process, ``torch.set_num_threads(2)``, the model loaded once (untimed, as is
  the import of torch), then for every catalog row ``pipeline.engine.inference.embed_uri`` (fetch,
  decode, resample, window, model, pool): wall seconds of the loop. Its start-up (imports and
  model load) is printed beside it but NOT counted, so the comparison is the strict one.
* **job**: ``python jobs/embed_catalog.py --catalog ... --output ...`` as a subprocess with the
  same model and settings into a fresh store; wall seconds from the fork to the exit, so Python
  start-up, imports, Ray start, model probe, actor start, the streaming pass, commits, sweep,
  maintenance and the run row are all included.

It prints both, the ratio loop / job (goal >= 1.3), the CPU seconds of each (the job's: the whole
process tree, sampled from ``/proc``), the job's own stage times, and the load of the machine.
The vectors of the two are compared (track vectors of every track, max abs difference).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.procstat import machine_busy_s, tree_cpu  # noqa: E402
from tools.testkit.paths import find_shared  # noqa: E402

GOAL_RATIO = 1.3
#: Track lengths (seconds) cycled through when building the catalog (real tracks are 1.5-4 min).
TRACK_LENGTHS_S = (150.0, 187.5, 132.0, 215.0, 171.0, 98.5, 240.0, 160.0)


def loadavg() -> tuple[float, float, float] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None


# --------------------------------------------------------------------------- catalog


def _write_like(src: Path, dst: Path, seconds: float) -> float:
    """``src`` looped to ``seconds`` and written to ``dst`` in the same format, rate and channels."""
    import soundfile as sf

    info = sf.info(str(src))
    data, sr = sf.read(str(src), dtype="float32", always_2d=True)
    n = int(round(seconds * sr))
    reps = -(-n // data.shape[0])
    out = np.tile(data, (reps, 1))[:n]
    fmt, subtype = info.format, info.subtype
    tmp = dst.with_name(f".{dst.stem}.partial{dst.suffix}")
    # block by block: libsndfile's Vorbis encoder crashes on one very large write
    with sf.SoundFile(str(tmp), "w", sr, out.shape[1], subtype=subtype, format=fmt) as f:
        for a in range(0, n, 1 << 15):
            f.write(out[a : a + (1 << 15)])
    os.replace(tmp, dst)
    return n / sr


def build_catalog(
    shared: Path, hours: float, out_dir: Path, max_tracks: int | None = None
) -> tuple[Path, float, int]:
    """Write (or reuse) the looped tracks and ``catalog.csv``; returns (catalog, audio seconds, tracks)."""
    import soundfile as sf

    clips = sorted((shared / "audio" / "clips").iterdir())
    clips = [c for c in clips if c.suffix in (".ogg", ".opus", ".flac", ".wav", ".mp3")]
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, total, i = [], 0.0, 0
    while total < hours * 3600.0 and (max_tracks is None or i < max_tracks):
        src = clips[i % len(clips)]
        secs = TRACK_LENGTHS_S[i % len(TRACK_LENGTHS_S)]
        dst = out_dir / f"t{i:04d}_{src.stem}{src.suffix}"
        if not dst.exists():
            _write_like(src, dst, secs)
        total += sf.info(str(dst)).duration
        rows.append((f"t{i:04d}_{src.stem}", str(dst), src.stem))
        i += 1
    catalog = out_dir / f"catalog_{len(rows)}.csv"
    with open(catalog, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["track_id", "uri", "title"])
        w.writerows(rows)
    return catalog, total, len(rows)


def read_catalog(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- loop


def run_loop(
    rows: list[dict[str, str]], model_args: dict[str, Any], layers: tuple[int, ...], threads: int
) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch

    from pipeline.engine.inference import embed_uri, load_model

    torch.set_num_threads(threads)
    model = load_model(**model_args, device="cpu")
    startup = time.perf_counter() - t0
    out: dict[str, dict[int, np.ndarray]] = {}
    audio_s = 0.0
    busy0, c0, w0 = machine_busy_s(), time.process_time(), time.perf_counter()
    for r in rows:
        emb = embed_uri(r["uri"], model, layers, precision="fp32")
        out[r["track_id"]] = emb.track
        audio_s += emb.duration_s
    wall = time.perf_counter() - w0
    cpu = time.process_time() - c0
    busy1 = machine_busy_s()
    other = None if busy0 is None or busy1 is None else max(0.0, busy1 - busy0 - cpu) / wall
    return {"wall_s": wall, "cpu_s": cpu, "other_cores": other, "startup_s": startup, "audio_s": audio_s,
            "threads": threads, "tracks": len(out), "vectors": out}  # fmt: skip


# --------------------------------------------------------------------------- job


def cluster_daemons() -> list[int]:
    """Pids of the Ray daemons of a running local cluster (GCS, raylet): their descendants are
    the cluster's workers, which a job run with ``RAY_ADDRESS`` does not own."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() in ("raylet", "gcs_server"):
                        out.append(int(d))
            except OSError:
                continue
    return out


RAY_CLI = str(Path(sys.executable).with_name("ray"))  # the venv's, beside this Python


def start_cluster(env: dict[str, str]) -> None:
    """A local Ray head (``ray start --head``, untimed), as a cluster that jobs are submitted to."""
    stop_cluster(env)  # a head left over from an interrupted run
    cpus = str(os.cpu_count() or 1)
    cmd = [RAY_CLI, "start", "--head", "--num-cpus", cpus, "--num-gpus", "0", "--include-dashboard=false",
           "--disable-usage-stats"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"ray start failed: {r.stdout[-400:]} {r.stderr[-400:]}")


def stop_cluster(env: dict[str, str]) -> None:
    subprocess.run([RAY_CLI, "stop", "--force"], env=env, capture_output=True, check=False)


def run_job(
    catalog: Path, store: Path, model_argv: list[str], extra: list[str], env: dict[str, str],
    daemons: list[int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The job as a subprocess: wall from fork to exit, CPU of its process tree and of the trees of
    ``daemons`` (a running cluster's GCS and raylet, whose workers run the job's actors)."""
    cmd = [sys.executable, str(REPO / "jobs" / "embed_catalog.py"), "--catalog", str(catalog),
           "--output", str(store), *model_argv, "--no-progress", *extra]  # fmt: skip
    names: dict[tuple[int, int], str] = {}
    base: dict[tuple[int, int], float] = {}
    for pid in daemons or []:
        base.update(tree_cpu(pid, names))
    busy0 = machine_busy_s()
    w0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen: dict[tuple[int, int], float] = {}
    lines: list[str] = []
    import threading

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    th = threading.Thread(target=drain, daemon=True)
    th.start()
    while proc.poll() is None:
        for root in [proc.pid, *(daemons or [])]:
            for k, v in tree_cpu(root, names).items():
                seen[k] = max(v, seen.get(k, 0.0))
        time.sleep(0.2)
    wall = time.perf_counter() - w0
    th.join()
    busy1 = machine_busy_s()
    seen = {k: v - base.get(k, 0.0) for k, v in seen.items()}
    cpu = sum(seen.values())  # lower bound: processes that ended between samples lose <= 0.2 s
    other = None if busy0 is None or busy1 is None else max(0.0, busy1 - busy0 - cpu) / wall
    procs: dict[str, float] = {}
    for k, v in seen.items():
        procs[names.get(k, "?")] = procs.get(names.get(k, "?"), 0.0) + v
    return {"wall_s": wall, "cpu_s": cpu, "other_cores": other, "rc": proc.returncode, "output": "".join(lines),
            "cmd": cmd, "cpu_by_process": dict(sorted(procs.items(), key=lambda kv: -kv[1]))}  # fmt: skip


def job_report(store: Path) -> dict[str, Any]:
    import lance

    runs = lance.dataset(str(store / "runs.lance")).to_table().to_pylist()
    run = runs[-1]
    out = {
        k: run.get(k) for k in ("status", "tracks_ok", "tracks_failed", "windows", "audio_hours", "wall_s")
    }
    out["stage_s"] = json.loads(run.get("stage_times_json") or "{}")
    extra = json.loads(run.get("report_json") or "{}")
    out["actors"] = extra.get("actors")
    out["actor_restarts"] = extra.get("actor_restarts")
    return out


def job_vectors(store: Path, layers: tuple[int, ...]) -> dict[str, dict[int, np.ndarray]]:
    import lance

    from pipeline import schemas

    cols = [schemas.layer_column(lay) for lay in layers]
    t = lance.dataset(str(store / "tracks.lance")).to_table(columns=["track_id", *cols]).to_pydict()
    return {tid: {lay: np.asarray(t[c][i], np.float32) for lay, c in zip(layers, cols, strict=True)}
            for i, tid in enumerate(t["track_id"])}  # fmt: skip


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/job_vs_loop.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--hours", default="1.3",
                    help="audio in the catalog (default 1.3 h); several sizes, e.g. 1.3,4: each is run and "
                         "the marginal (steady-state) ratio is fitted across them")  # fmt: skip
    ap.add_argument("--max-tracks", type=int, default=None, help="at most this many tracks")
    ap.add_argument("--layers", default="1,3", help="layers stored (default 1,3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the loop (default 2)")
    ap.add_argument("--only", choices=["loop", "job"], default=None, help="run one side only")
    ap.add_argument("--cluster", choices=["local", "running"], default="local",
                    help="local: the job starts and stops its own Ray (default); running: a head started "
                         "before (untimed) with `ray start --head`, the job connecting through RAY_ADDRESS "
                         "as under `ray job submit`")  # fmt: skip
    ap.add_argument("--job-args", default="", help="extra flags for jobs/embed_catalog.py (one string)")
    ap.add_argument("--audio-dir", type=Path, default=None, help="where the tracks are cached")
    ap.add_argument("--keep-store", type=Path, default=None, help="write the job's store here and keep it")
    ap.add_argument("--quick", action="store_true", help="smoke test: 4 tracks")
    ap.add_argument("--json", type=Path, default=None, metavar="OUT", help="write all figures here")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    shared = find_shared()
    if shared is None:
        raise SystemExit("cannot find shared/ (golden model, audio clips); set MUSICFM_SHARED")
    try:
        sizes = [float(h) for h in str(args.hours).split(",") if h.strip()]
    except ValueError:
        raise SystemExit(f"--hours: expected hours like 1.3 or 1.3,4, got {args.hours!r}") from None
    if not sizes or min(sizes) <= 0:
        raise SystemExit(f"--hours: expected positive hours, got {args.hours!r}")
    if args.quick:
        args.max_tracks, sizes = 4, [0.2]
    results = [run_size(shared, hours, args) for hours in sizes]
    out: dict[str, Any] = results[0] if len(results) == 1 else {"sizes": results}
    if len(results) > 1 and args.only is None:
        out["fit"] = fit_sizes(results)
        print(render_fit(out["fit"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return out


def run_size(shared: Path, hours: float, args: argparse.Namespace) -> dict[str, Any]:
    """Loop and job over one catalog of ``hours`` of audio; prints and returns the figures."""
    layers = tuple(int(x) for x in args.layers.split(","))
    golden = shared / "golden"
    model_args = {"checkpoint": str(golden / "checkpoint.pt"), "stats": str(golden / "stats.json"),
                  "model_config": str(golden / "config.json")}  # fmt: skip
    model_argv = ["--checkpoint", model_args["checkpoint"], "--stats", model_args["stats"], "--model-config",
                  model_args["model_config"], "--layers", args.layers, "--precision", "fp32"]  # fmt: skip
    audio_dir = args.audio_dir or Path(tempfile.gettempdir()) / "musicfm-bench-real"
    t0 = time.perf_counter()
    catalog, audio_s, n = build_catalog(shared, hours, audio_dir, args.max_tracks)
    print(f"catalog: {n} tracks, {audio_s:.0f} s = {audio_s / 3600:.2f} h of audio, {catalog} "
          f"({time.perf_counter() - t0:.1f} s to prepare)", file=sys.stderr)  # fmt: skip
    rows = read_catalog(catalog)
    env = dict(os.environ)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    result: dict[str, Any] = {"catalog": {"path": str(catalog), "tracks": n, "audio_s": audio_s}, "cluster": args.cluster,
                              "load_start": loadavg(), "model": model_args, "layers": list(layers),
                              "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}  # fmt: skip
    loop = job = None
    if args.only in (None, "loop"):
        print("loop (embed_uri in-process) ...", file=sys.stderr)
        loop = run_loop(rows, model_args, layers, args.threads)
        result["loop"] = {k: v for k, v in loop.items() if k != "vectors"}
        result["load_after_loop"] = loadavg()
    if args.only in (None, "job"):
        print("job (jobs/embed_catalog.py subprocess) ...", file=sys.stderr)
        work = Path(tempfile.mkdtemp(prefix="musicfm-jvl-"))
        store = args.keep_store or work / "store"
        if store.exists():
            shutil.rmtree(store)
        daemons = None
        if args.cluster == "running":
            env = {**env, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "auto"}
            start_cluster(env)
            daemons = cluster_daemons()
        try:
            job = run_job(catalog, store, model_argv, args.job_args.split(), env, daemons)
            if job["rc"] != 0:
                print(job["output"], file=sys.stderr)
                raise SystemExit(f"the job failed (exit {job['rc']})")
            job["report"] = job_report(store)
            vecs = job_vectors(store, layers)
        finally:
            if daemons is not None:
                stop_cluster(env)
            if args.keep_store is None:
                shutil.rmtree(work, ignore_errors=True)
        result["job"] = {k: v for k, v in job.items() if k != "output"}
        result["load_end"] = loadavg()
        if loop is not None:
            diffs = [float(np.max(np.abs(vecs[t][lay] - loop["vectors"][t][lay])))
                     for t in loop["vectors"] for lay in layers]  # fmt: skip
            result["max_abs_diff"] = max(diffs) if diffs else None
            result["tracks_compared"] = len(loop["vectors"])
    print(render(result))
    return result


def fit_sizes(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Least-squares lines wall = fixed + rate x audio hours for the loop and the job over the
    sizes run: the ratio of the rates is the steady-state (marginal) loop / job ratio, what a
    catalog large enough to amortise the job's fixed start-up gets; also the audio hours at which
    the whole-run ratio reaches the goal, when the marginal ratio is above it."""
    h = np.array([r["catalog"]["audio_s"] / 3600 for r in results])
    loop = np.array([r["loop"]["wall_s"] for r in results])
    job = np.array([r["job"]["wall_s"] for r in results])
    (l1, l0), (j1, j0) = np.polyfit(h, loop, 1), np.polyfit(h, job, 1)
    marginal = float(l1 / j1) if j1 > 0 else float("inf")
    reach = None
    if marginal > GOAL_RATIO:  # (l0 + l1 x) / (j0 + j1 x) = goal
        reach = max(0.0, float((GOAL_RATIO * j0 - l0) / (l1 - GOAL_RATIO * j1)))
    return {
        "hours": h.round(3).tolist(),
        "loop_s_per_h": float(l1),
        "loop_fixed_s": float(l0),
        "job_s_per_h": float(j1),
        "job_fixed_s": float(j0),
        "marginal_ratio": marginal,
        "hours_to_goal": reach,
        "ratios": (loop / job).round(3).tolist(),
    }


def render_fit(f: dict[str, Any]) -> str:
    reach = f["hours_to_goal"]
    return (
        f"fit over {', '.join(f'{x:.2f}' for x in f['hours'])} h: loop {f['loop_s_per_h']:.1f} s per hour of audio "
        f"(+{f['loop_fixed_s']:.1f} s), job {f['job_s_per_h']:.1f} s per hour (+{f['job_fixed_s']:.1f} s fixed: "
        f"start-up, Ray, actors, commits)\n"
        f"  steady-state loop / job = {f['marginal_ratio']:.2f}x; whole-run ratios "
        f"{', '.join(f'{x:.2f}' for x in f['ratios'])}; the whole run reaches {GOAL_RATIO}x "
        + (
            f"at about {reach:.1f} h of audio"
            if reach is not None
            else "at no size (marginal ratio below it)"
        )
    )


def render(r: dict[str, Any]) -> str:
    c = r["catalog"]
    lines = [f"job vs loop: {c['tracks']} real tracks, {c['audio_s']:.0f} s ({c['audio_s'] / 3600:.2f} h) of audio, "
             f"golden model, layers {','.join(map(str, r['layers']))}, fp32; load avg {r['load_start']}"]  # fmt: skip
    lo, jo = r.get("loop"), r.get("job")
    if lo:
        lines.append(f"  loop  embed_uri, {lo['threads']} torch threads: {lo['wall_s']:7.2f} s wall, "
                     f"{lo['cpu_s']:6.1f} CPU s, other {lo['other_cores'] or 0:.2f} cores, "
                     f"{lo['audio_s'] / lo['wall_s']:.0f}x realtime (start-up {lo['startup_s']:.1f} s not counted)")  # fmt: skip
    if jo:
        rep = jo.get("report") or {}
        on = " (running cluster)" if r.get("cluster") == "running" else ""
        lines.append(f"  job   jobs/embed_catalog.py{on}:  {jo['wall_s']:7.2f} s wall, {jo['cpu_s']:6.1f} CPU s, "
                     f"other {jo['other_cores'] or 0:.2f} cores, {c['audio_s'] / jo['wall_s']:.0f}x realtime "
                     f"(run report wall {rep.get('wall_s') or 0:.1f} s, status {rep.get('status')}, "
                     f"{rep.get('tracks_ok')} tracks, {rep.get('windows')} windows)")  # fmt: skip
        st = rep.get("stage_s") or {}
        if st:
            lines.append("        stages: " + ", ".join(f"{k} {v:.2f}" for k, v in st.items()))
        by = jo.get("cpu_by_process") or {}
        if by:
            lines.append(
                "        CPU s by process: " + "; ".join(f"{k} {v:.1f}" for k, v in list(by.items())[:8])
            )
    if lo and jo:
        ratio = lo["wall_s"] / jo["wall_s"]
        lines.append(f"  loop / job = {ratio:.2f}x (goal >= {GOAL_RATIO}: {'MET' if ratio >= GOAL_RATIO else 'NOT MET'}); "
                     f"track vectors max |diff| {r.get('max_abs_diff')} over {r.get('tracks_compared')} tracks")  # fmt: skip
        r["ratio"] = ratio
    lines.append(f"  load avg: start {r['load_start']}, end {r.get('load_end') or r.get('load_after_loop')}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
