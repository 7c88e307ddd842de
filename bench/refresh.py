#!/usr/bin/env python
"""Benchmark of the nightly refresh against a full embed, measured in one process.

    python bench/refresh.py                 # 200 synthetic tracks of 4-8 s, golden model
    python bench/refresh.py --n 1000 --seconds 20

1. writes ``--n`` synthetic tracks (wav / flac / ogg, with soundfile) and a catalog;
2. full embed of the catalog with the embed job (``run_embed``): wall time ``T_full``;
3. changes 1 % of the catalog (at least 3 tracks), in equal parts new / modified / removed,
   and refreshes: wall time ``T_refresh``; goal ``T_refresh / T_full <= 5 %``;
4. refreshes again with nothing changed: wall time ``T_same``; goal: no model work at all
   (asserted: zero windows embedded, no decode/model stage), seconds.

Ray is started (or joined, with ``RAY_ADDRESS``) once before the timings, and a throwaway embed
and refresh of a 3-track catalog run first (``--no-warmup`` skips them), so neither side pays the
cluster start, the first imports (Lance, torch, Ray Data) or Ray's first worker processes. Each run pays one fixed cost for its streaming pass (the decode and model actor
pools start and load the model, about 4-5 s on a 2-core machine, whatever the number of chunks)
that the ratio only amortises when the full embed is long (N >= 5000 with the golden model).
The figures include that fixed cost; ``refresh_stream_s`` and ``refresh_worker_s`` (decode + model
seconds in the workers) in ``--json`` show how much of the refresh it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from tools.testkit.stores import CKPT, STATS, write_catalog  # noqa: E402

FORMATS = ("wav", "flac", "ogg")


def write_tracks(
    audio: Path, ids: list[str], seconds: tuple[float, float], seed: int, paths: list[str] | None = None
) -> list[tuple[str, str, str]]:
    """Synthetic tracks (a few partials with a slow vibrato), one file per id, round-robin formats
    (or at the given ``paths``, overwriting them)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, tid in enumerate(ids):
        sr = int(rng.choice([16000, 22050, 44100]))
        dur = float(rng.uniform(*seconds))
        t = np.arange(int(sr * dur)) / sr
        f0 = float(rng.uniform(110, 880))
        x = sum(
            0.2 / (k + 1) * np.sin(2 * np.pi * f0 * (k + 1) * t + 0.3 * np.sin(2 * np.pi * 0.5 * t))
            for k in range(4)
        )
        x = (x + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)
        path = Path(paths[i]) if paths else audio / f"{tid}.{FORMATS[i % len(FORMATS)]}"
        sf.write(str(path), x, sr)
        rows.append((tid, str(path), f"Track {tid}"))
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="catalog size (default 200)")
    p.add_argument(
        "--seconds", type=float, nargs=2, default=(4.0, 8.0), help="track length range (default 4 8)"
    )
    p.add_argument(
        "--change", type=float, default=0.01, help="fraction changed (default 0.01, at least 3 tracks)"
    )
    p.add_argument("--checkpoint", default=CKPT, help="model (default: golden small)")
    p.add_argument("--stats", default=STATS)
    p.add_argument("--layers", default="1,3")
    p.add_argument("--window-s", type=float, default=5.0)
    p.add_argument("--decode-cpus", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=1000)
    p.add_argument("--workdir", help="keep files here (default: a temporary directory, removed)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--no-warmup", action="store_true", help="skip the throwaway embed + refresh")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_ACCEPT_CLUSTER_SPAWN", "1")
    from pipeline.flow.runtime import ensure_ray
    from pipeline.runs.embed import run_embed
    from pipeline.runs.refresh import run_refresh
    from pipeline.runs.settings import EmbedJob, RefreshJob

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-refresh-"))
    audio = work / "audio"
    shutil.rmtree(work / "store", ignore_errors=True)
    audio.mkdir(parents=True, exist_ok=True)
    ids = [f"t{i:06d}" for i in range(args.n)]
    rows = write_tracks(audio, ids, tuple(args.seconds), seed=1)
    cat0 = write_catalog(work / "catalog0.csv", rows)

    layers = tuple(int(x) for x in args.layers.split(","))
    common = dict(checkpoint=args.checkpoint, stats=args.stats, layers=layers, window_s=args.window_s,
                  hop_s=args.window_s, precision="fp32", decode_cpus=args.decode_cpus, batch_size=8)  # fmt: skip
    store = str(work / "store")
    t0 = time.perf_counter()
    ensure_ray()  # once, outside the timings
    t_ray = time.perf_counter() - t0
    t_warm = 0.0
    if not args.no_warmup:  # imports and Ray's first workers, on both sides, outside the timings
        t0 = time.perf_counter()
        (work / "warm").mkdir(exist_ok=True)
        wrows = write_tracks(work / "warm", ["w0", "w1", "w2"], tuple(args.seconds), seed=9)
        wcat = write_catalog(work / "warm_catalog0.csv", wrows[:2])
        warm = run_embed(EmbedJob(catalog=wcat, output=str(work / "warm_store"), **common), progress=False)
        assert warm.status == "ok", warm.summary()
        wcat1 = write_catalog(work / "warm_catalog1.csv", wrows[1:])
        wjob = RefreshJob(
            embed=EmbedJob(catalog=wcat1, output=str(work / "warm_store"), **common),
            chunk_size=args.chunk_size,
        )
        assert run_refresh(wjob).status == "ok"
        t_warm = time.perf_counter() - t0

    t0 = time.perf_counter()
    full = run_embed(EmbedJob(catalog=cat0, output=store, **common), progress=False)
    t_full = time.perf_counter() - t0
    assert full.status == "ok" and full.tracks_ok == args.n, full.summary()

    # 1 % of the catalog, in equal parts removed / modified (same path, new content) / new
    k = max(1, round(args.n * args.change / 3))
    removed = {r[0] for r in rows[:k]}
    modified = rows[k : 2 * k]
    time.sleep(0.01)
    write_tracks(audio, [r[0] for r in modified], tuple(args.seconds), seed=2, paths=[r[1] for r in modified])
    added = write_tracks(audio, [f"n{i:06d}" for i in range(k)], tuple(args.seconds), seed=3)
    cat1 = write_catalog(work / "catalog1.csv", [r for r in rows if r[0] not in removed] + added)

    def refresh(cat: str):
        job = RefreshJob(embed=EmbedJob(catalog=cat, output=store, **common), chunk_size=args.chunk_size)
        t = time.perf_counter()
        rep = run_refresh(job)
        return rep, time.perf_counter() - t

    rep, t_refresh = refresh(cat1)
    assert rep.status == "ok", rep.summary()
    assert (rep.plan["new"], rep.plan["changed"], rep.deleted) == (k, k, k), rep.plan
    same, t_same = refresh(cat1)
    assert same.windows == 0 and same.tracks_ok == 0 and "decode+model" not in same.stage_s, same.summary()

    stream = rep.stage_s.get("decode+model", 0.0)
    busy = rep.stage_s.get("decode_worker", 0.0) + rep.stage_s.get("model_worker", 0.0)
    figures = {
        "n": args.n, "changed": 3 * k, "audio_h": round(full.audio_s / 3600, 3),
        "full_embed_s": round(t_full, 2), "refresh_s": round(t_refresh, 2),
        "refresh_over_full": round(t_refresh / t_full, 4), "no_change_s": round(t_same, 2),
        "no_change_windows_embedded": same.windows, "refresh_stage_s": {k2: round(v, 2) for k2, v in rep.stage_s.items()},
        "full_stage_s": {k2: round(v, 2) for k2, v in full.stage_s.items()},
        "refresh_stream_s": round(stream, 2), "refresh_worker_s": round(busy, 2), "chunks": rep.chunks,
        "ray_start_s": round(t_ray, 2), "warmup_s": round(t_warm, 2), "warmed": not args.no_warmup,
    }  # fmt: skip
    print(rep.summary())
    print(same.summary())
    print(
        f"\nray start {t_ray:.1f} s, warm-up (3-track embed + refresh) {t_warm:.1f} s: outside the timings"
        + (" (skipped: --no-warmup)" if args.no_warmup else "")
    )
    print(
        f"full embed  {args.n} tracks ({full.audio_s / 3600:.2f} h audio): {t_full:.1f} s\n"
        f"refresh     {3 * k} changed ({k} new, {k} modified, {k} removed): {t_refresh:.1f} s "
        f"= {100 * t_refresh / t_full:.1f} % of the full embed (goal <= 5 %); one streaming pass of "
        f"{stream:.1f} s for {rep.chunks} chunk(s), workers busy {busy:.1f} s\n"
        f"no change   {t_same:.1f} s, {same.windows} windows embedded (goal: no model work)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
