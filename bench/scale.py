#!/usr/bin/env python
"""Catalog scale: driver memory, wall time and object-store requests of a refresh (not in CI).

    python bench/scale.py                                  # 100k and 1M rows
    python bench/scale.py --sizes 100000 1000000 10000000 --files-max 1000000

For each size N it builds, under ``--workdir``:

* a store of N tracks written through the project's writer (``lance.fragment.write_fragments``
  + :meth:`pipeline.store.tables.Store.commit`, as the embed job does), whose settings
  fingerprint, layers and vector size are the small golden model's (vectors of its dimension),
  so that a refresh with that model finds nothing to do;
* N empty audio "files" under 4 prefixes (only for N <= ``--files-max``: a listing needs real
  objects) whose ``size-mtime_ns`` versions are the stored ``content_version``;
* two Parquet catalogs of the same tracks: ``versioned.parquet`` (``track_id``, ``uri``,
  ``content_version``) and ``plain.parquet`` (``track_id``, ``uri``: versions come from listing
  the prefixes).

Then it runs ``jobs/refresh_catalog.py`` as a user would, each in a fresh process, for
``--dry-run`` and for a real (no-change) refresh, with each catalog, and prints the driver's
peak RSS (``VmHWM`` of that process), its wall time and the object-store requests the refresh
reports (local files: LIST pages + HEADs as an object store would count them). The goals of
issue 13: RSS growth <= 100 MB from 100k to 10M rows; a no-change refresh of 10M rows <= 15 min
on a 2-core machine; zero requests with a version column, <= rows / 500 without one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory
    sys.path.insert(0, str(REPO))

PREFIXES = ("label-a", "label-b", "label-c", "label-d")
BATCH = 1_000_000  # rows per data file written (Lance's default max rows per file)

MEASURE = """
import runpy, sys, time
t0 = time.perf_counter()
sys.argv = ["refresh_catalog", *sys.argv[1:]]
try:
    runpy.run_path({job!r}, run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
finally:
    wall = time.perf_counter() - t0
    hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0].split()[1]
    print(f"MEASURE rc={{code}} wall_s={{wall:.2f}} peak_rss_kb={{hwm}}", flush=True)
"""


def refresh_args(catalog: Path, store: Path) -> list[str]:
    from tools.testkit.stores import CKPT, LAYERS, STATS

    return [
        "--catalog", str(catalog), "--store", str(store), "--checkpoint", CKPT, "--stats", STATS,
        "--layers", ",".join(map(str, LAYERS)), "--precision", "fp32", "--window-s", "1", "--hop-s", "1",
        "--frames-hz", "5", "--batch-size", "8", "--no-progress", "--keep-missing",
    ]  # fmt: skip


def model_settings(catalog: Path, store: Path) -> tuple[str, str, tuple[int, ...], int]:
    """model_id, settings_id, layers and vector size of the golden model with these settings."""
    from tools.testkit.stores import embed_job
    from tools.testkit.stores import model_settings as settings_of

    return settings_of(embed_job(str(catalog), str(store)))


def build(root: Path, n: int, files: bool) -> dict[str, float]:
    """Audio files (when ``files``), both catalogs and the store for ``n`` tracks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tools.testkit.stores import synthetic_tracks

    t: dict[str, float] = {}
    root.mkdir(parents=True, exist_ok=True)
    lib = root / "lib"
    ids = [f"t{i:08d}" for i in range(n)]
    uris = [str(lib / PREFIXES[i % len(PREFIXES)] / f"{ids[i]}.flac") for i in range(n)]
    t0 = time.perf_counter()
    if files:
        for p in PREFIXES:
            (lib / p).mkdir(parents=True, exist_ok=True)
        for u in uris:
            with open(u, "wb"):
                pass
        versions = []
        for u in uris:
            st = os.stat(u)
            versions.append(f"{st.st_size}-{st.st_mtime_ns}")
    else:
        versions = ["v1"] * n
    t["files_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pq.write_table(
        pa.table({"track_id": ids, "uri": uris, "content_version": versions}), root / "versioned.parquet"
    )
    pq.write_table(pa.table({"track_id": ids, "uri": uris}), root / "plain.parquet")
    t["catalogs_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = model_settings(root / "plain.parquet", root / "store")
    synthetic_tracks(str(root / "store"), ids, uris, versions, model, batch=BATCH)
    t["store_s"] = time.perf_counter() - t0
    return t


def measure(catalog: Path, store: Path, dry: bool, planner: str = "auto") -> dict:
    args = refresh_args(catalog, store) + (["--dry-run"] if dry else []) + ["--planner", planner]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    code = MEASURE.format(job=str(REPO / "jobs" / "refresh_catalog.py"))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    m = re.search(r"MEASURE rc=(\S+) wall_s=(\S+) peak_rss_kb=(\d+)", p.stdout)
    if m is None or m.group(1) not in ("0", "None"):
        raise SystemExit(f"refresh failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    req = re.search(r"lookups\s+(\d+) object-store requests", p.stdout)
    plan = re.search(r"plan\s+(.*)", p.stdout)
    return {
        "peak_rss_mb": int(m.group(3)) / 1024,
        "job_wall_s": float(m.group(2)),
        "process_wall_s": wall,
        "object_requests": int(req.group(1)) if req else None,
        "plan": plan.group(1).strip() if plan else None,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument(
        "--files-max", type=int, default=1_000_000, help="largest N with real files (listing path)"
    )
    p.add_argument("--planners", nargs="+", default=["driver", "ray"], choices=["driver", "ray", "auto"],
                   help="--planner values measured side by side (default: driver ray)")  # fmt: skip
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed afterwards")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line too")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="scale-bench-"))
    results = []
    try:
        for n in a.sizes:
            root = work / f"n{n}"
            files = n <= a.files_max
            built = build(root, n, files)
            print(f"N={n:,}: built in " + ", ".join(f"{k} {v:.1f}" for k, v in built.items()), flush=True)
            catalogs = ["versioned"] + (["plain"] if files else [])
            for planner in a.planners:
                for cat in catalogs:
                    for dry in (True, False):
                        r = measure(root / f"{cat}.parquet", root / "store", dry, planner)
                        r.update(n=n, catalog=cat, mode="dry-run" if dry else "no-change", planner=planner)
                        results.append(r)
                        print(
                            f"  {planner:<6} {r['mode']:<9} {cat:<9} peak RSS {r['peak_rss_mb']:7.0f} MB"
                            f"  wall {r['job_wall_s']:7.1f} s  requests {r['object_requests']}  ({r['plan']})",
                            flush=True,
                        )
            if not a.workdir:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    sizes = sorted({r["n"] for r in results})
    if len(sizes) > 1:
        for planner in a.planners:
            for mode in ("dry-run", "no-change"):

                def pick(n: int, planner: str = planner, mode: str = mode) -> list[dict]:
                    return [r for r in results if r["n"] == n and r["mode"] == mode and r["planner"] == planner
                            and r["catalog"] == "versioned"]  # fmt: skip

                lo, hi = pick(sizes[0]), pick(sizes[-1])
                if lo and hi:
                    grow = hi[0]["peak_rss_mb"] - lo[0]["peak_rss_mb"]
                    print(f"RSS growth {sizes[0]:,} -> {sizes[-1]:,} rows ({planner}, {mode}, version column): "
                          f"{grow:.0f} MB ({grow * 1024 * 1024 / (sizes[-1] - sizes[0]):.0f} B/row)")  # fmt: skip
    if a.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
