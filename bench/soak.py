#!/usr/bin/env python
"""Soak test (not in CI): embed and refresh runs, over and over, with injected faults, checking the
store's invariants after every cycle.

    python bench/soak.py --duration-s 1800 --tracks 60 --workdir /tmp/soak
    python bench/soak.py --duration-s 600 --s3 --json /tmp/soak.json   # store + audio on S3 (moto)

Each cycle (a fresh seed per cycle, all from --seed):

1. the catalog changes a little: a few tracks added, removed, or rewritten (new content);
2. one run: the embed job (full rewrite) or, when ``jobs/refresh_catalog.py`` is present, the
   refresh job (incremental), alternating;
3. faults during the run: one decode and/or one model actor SIGKILLed at a random moment, a
   poison file that segfaults its decode worker every time (it must end as an error row), and
   with --s3 ~``--fault-rate`` transient S3 faults (500 / 503 / resets / cut responses / slow);
4. the invariants, on the store as committed:
   * unique track ids in ``tracks``;
   * every track's windows present exactly once (``window_ix`` 0..num_windows-1), no orphans;
   * every vector finite;
   * tracks = catalog rows minus this cycle's expected failures (the poison file), i.e. row counts
     = catalog minus errors; the poison file is an error row of the run.

Any violation is printed, recorded in the JSON summary, and makes the exit code 1. The run uses a
local Ray cluster (4 logical CPUs, one declared GPU, like the tests) and the small golden model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory
    sys.path.insert(0, str(REPO))

import soundfile as sf  # noqa: E402

from tools.testkit.reliability import (  # noqa: E402
    CKPT,
    STATS,
    ActorKiller,
    CrashingDecodeStage,
    check_store,
    store_tables,
    tone,
)

POISON = "POISON_track"


class Catalog:
    """A local (or S3-mirrored) catalog of short tracks that drifts from cycle to cycle."""

    def __init__(self, root: Path, n: int, rng: random.Random, s3=None) -> None:
        self.root, self.rng, self.s3 = root, rng, s3
        self.audio = root / "audio"
        self.audio.mkdir(parents=True, exist_ok=True)
        self.tracks: dict[str, int] = {}  # track id -> content seed
        self.next_id = 0
        for _ in range(n):
            self.add()
        self._write_file(POISON, 0)

    def _write_file(self, tid: str, seed: int) -> None:
        seconds = 1.0 + (seed % 5) * 0.5
        sf.write(self.audio / f"{tid}.wav", tone(seconds, 24000, 1, seed=seed), 24000)
        if self.s3 is not None:
            client, bucket = self.s3
            client.upload_file(str(self.audio / f"{tid}.wav"), bucket, f"cat/audio/{tid}.wav")

    def add(self) -> None:
        tid = f"t{self.next_id:05d}"
        self.next_id += 1
        self.tracks[tid] = self.rng.randrange(1 << 20)
        self._write_file(tid, self.tracks[tid])

    def drift(self, k: int) -> dict[str, int]:
        changes = {"added": 0, "removed": 0, "rewritten": 0}
        for _ in range(k):
            what = self.rng.choice(("added", "removed", "rewritten"))
            if what != "added" and len(self.tracks) > 3:
                tid = self.rng.choice(sorted(self.tracks))
                if what == "removed":
                    del self.tracks[tid]
                else:
                    self.tracks[tid] = self.rng.randrange(1 << 20)
                    self._write_file(tid, self.tracks[tid])
            else:
                what = "added"
                self.add()
            changes[what] += 1
        return changes

    def write(self) -> str:
        lines = ["track_id,uri"] + [f"{t},audio/{t}.wav" for t in sorted(self.tracks)]
        lines.append(f"{POISON},audio/{POISON}.wav")
        text = "\n".join(lines) + "\n"
        (self.root / "catalog.csv").write_text(text)
        if self.s3 is not None:
            client, bucket = self.s3
            client.put_object(Bucket=bucket, Key="cat/catalog.csv", Body=text.encode())
            return f"s3://{bucket}/cat/catalog.csv"
        return str(self.root / "catalog.csv")


def _run_cycle(kind: str, catalog_uri: str, store: str, so: dict | None, rng: random.Random) -> dict:
    import pipeline.flow.stages
    from pipeline.runs.embed import run_embed
    from pipeline.runs.settings import EmbedJob

    job = EmbedJob(
        catalog=catalog_uri,
        output=store,
        checkpoint=CKPT,
        stats=STATS,
        layers=(1, 3),
        precision="fp32",
        window_s=1.0,
        hop_s=1.0,
        batch_size=16,
        decode_cpus=2,
        storage_options=so or {},
    )
    killers = []
    if rng.random() < 0.8:
        killers.append(ActorKiller("DecodeStage", delay_s=rng.uniform(0.1, 2.0)))
    if rng.random() < 0.5:
        killers.append(ActorKiller("EmbedStage", delay_s=rng.uniform(0.5, 3.0)))
    original = pipeline.flow.stages.DecodeStage
    pipeline.flow.stages.DecodeStage = CrashingDecodeStage  # the poison file segfaults its worker
    for k in killers:
        k.start()
    t0 = time.perf_counter()
    try:
        if kind == "refresh":
            from pipeline.runs.refresh import run_refresh
            from pipeline.runs.settings import RefreshJob

            report = run_refresh(RefreshJob(embed=job, chunk_size=16, retention_days=0.0), progress=False)
        else:
            report = run_embed(job, progress=False)
    finally:
        pipeline.flow.stages.DecodeStage = original
        for k in killers:
            k.stop.set()
            k.join(5)
    return {
        "kind": kind,
        "run_id": report.run_id,
        "status": report.status,
        "wall_s": round(time.perf_counter() - t0, 1),
        "tracks_ok": report.tracks_ok,
        "tracks_failed": report.tracks_failed,
        "killed": {k.name: len(k.killed) for k in killers},
        "restarts": report.extra.get("actor_restarts", {}),
    }


def _check(store: str, so: dict | None, expected: set[str], run_id: str) -> list[str]:
    problems = []
    try:
        tables = store_tables(store, so)
        check_store(tables, expect_tracks=expected)
        errs = [e for e in tables["errors"].to_pylist() if e["run_id"] == run_id]
        poison = [e for e in errs if e["track_id"] == POISON]
        if not poison or poison[0]["error_type"] != "WorkerCrashed":
            problems.append(f"poison file is not a WorkerCrashed error row of run {run_id}: {poison}")
        unexpected = [e for e in errs if e["track_id"] != POISON]
        if unexpected:
            problems.append(f"unexpected error rows: {unexpected[:5]}")
    except AssertionError as e:
        problems.append(f"invariant: {e}")
    except Exception as e:
        problems.append(f"check failed: {type(e).__name__}: {e}")
    return problems


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--tracks", type=int, default=40)
    p.add_argument("--drift", type=int, default=4, help="catalog changes per cycle")
    p.add_argument("--workdir", default="/tmp/musicfm-soak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--s3", action="store_true", help="catalog, audio and store on S3 (moto) behind the fault proxy"
    )
    p.add_argument("--fault-rate", type=float, default=0.1, help="transient S3 fault rate with --s3")
    p.add_argument("--no-refresh", action="store_true", help="embed runs only")
    p.add_argument("--json", help="write the summary here")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)

    import ray

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = random.Random(args.seed)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=4,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    s3 = proxy = moto = None
    so: dict | None = None
    store = str(work / "store")
    if args.s3:
        from tools.fault_proxy import FaultConfig, FaultProxy
        from tools.testkit.s3 import moto_server

        moto = moto_server()
        endpoint = moto.__enter__()  # an S3Server: the endpoint URL, plus a client
        client = endpoint.client()
        client.create_bucket(Bucket="soak")
        s3 = (client, "soak")
        rate = args.fault_rate
        proxy = FaultProxy(
            endpoint,
            FaultConfig(
                rates={"get": rate, "list": rate, "put": rate},
                kinds=("500", "503", "reset", "cut", "lost", "slow"),
                slow_s=0.3,
                seed=args.seed,
            ),
        ).start()
        so = endpoint.options("s3fs", endpoint=proxy.url)
        store = "s3://soak/store"
    cat = Catalog(work / "catalog", args.tracks, rng, s3)
    can_refresh = (REPO / "jobs" / "refresh_catalog.py").exists() and not args.no_refresh
    cycles, failures = [], 0
    t_end = time.time() + args.duration_s
    n = 0
    while time.time() < t_end:
        n += 1
        changes = cat.drift(args.drift) if n > 1 else {}
        uri = cat.write()
        kind = "refresh" if can_refresh and n % 2 == 0 else "embed"
        rec: dict = {"cycle": n, "changes": changes, "catalog_tracks": len(cat.tracks)}
        try:
            rec.update(_run_cycle(kind, uri, store, so, random.Random(rng.random())))
            rec["problems"] = _check(store, so, set(cat.tracks), rec["run_id"])
        except Exception as e:
            rec["problems"] = [f"run failed: {type(e).__name__}: {str(e)[:500]}"]
            traceback.print_exc()
        if proxy is not None:
            rec["proxy"] = proxy.snapshot()
        failures += bool(rec["problems"])
        cycles.append(rec)
        print(json.dumps(rec, default=str), flush=True)
    summary = {
        "cycles": len(cycles),
        "failed_cycles": failures,
        "tracks_lost": sum(1 for c in cycles for pr in c["problems"] if pr.startswith("invariant")),
        "kills": sum(sum(c.get("killed", {}).values()) for c in cycles),
        "restarts": [c.get("restarts") for c in cycles],
        "kinds": sorted({c.get("kind", "?") for c in cycles}),
        "s3": args.s3,
    }
    print(json.dumps(summary, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "cycles": cycles}, indent=1, default=str))
    if proxy is not None:
        proxy.stop()
    if moto is not None:
        moto.__exit__(None, None, None)
    ray.shutdown()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
