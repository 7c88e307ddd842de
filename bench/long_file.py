"""Benchmark: the embed job on one long file, peak RSS of every process of the run by kind.

Generates a 24 kHz mono FLAC of each ``--hours`` (a tone with a little noise, written a minute at a
time; cached under ``$TMPDIR/musicfm-bench-long/``), runs ``jobs/embed_catalog.py`` on a catalog of
that one file (golden model from ``shared/golden`` unless ``--model-config`` / ``--checkpoint`` say
otherwise; ``--max-duration-s`` raised to fit), and samples every 0.2 s the RSS of each process of
the job's tree (the driver, Ray's processes and every worker of its local cluster). Prints, per
file length, the peak RSS per process kind (decode actor, model actor, writer, driver, Ray) and the
CPU seconds of the tree per audio hour. ``--malloc default`` runs the workers with glibc's own
allocator settings (``MUSICFM_WORKER_MALLOC=default``) instead of ``WORKER_MALLOC_TUNABLES``: both
ways measure what the trim after a long track keeps of the page-fault savings.

    python bench/long_file.py --hours 2,6                    # issue 22: 2 h < 1.5 GB, 6 h within 10 %
    python bench/long_file.py --hours 2 --malloc tuned,default --json out.json
    python bench/long_file.py --hours 0.25 --quick           # a smoke: 15 minutes, ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from bench.procstat import tree_cpu  # noqa: E402
from tools.testkit.paths import find_shared  # noqa: E402

SR = 24000
KINDS = (("DecodeStage", "decode actor"), ("EmbedStage", "model actor"), ("ChunkWriter", "writer actor"),
         ("embed_catalog", "driver"), ("raylet", "raylet"), ("gcs_server", "gcs"))  # fmt: skip


def long_flac(path: Path, hours: float) -> Path:
    """A 24 kHz mono FLAC of ``hours`` (cached: written once per length)."""
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    t = np.arange(SR * 60) / SR
    minute = (0.05 * np.sin(2 * np.pi * 220 * t) + 0.002 * rng.standard_normal(t.size)).astype(np.float32)
    tmp = path.with_suffix(".part.flac")
    with sf.SoundFile(tmp, "w", samplerate=SR, channels=1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(round(hours * 60))):
            f.write(minute)
    tmp.rename(path)
    return path


def _kind(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode("latin-1")
    except OSError:
        return "other"
    return next((name for key, name in KINDS if key in cmd), "other")


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, RssShmem) of ``pid`` in bytes: RssShmem is the part of the RSS that is shared
    memory, mostly pages of Ray's object store that the process wrote or read (counted once in
    the store, under its own limit and spilling, not in the process's own heap)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = {
                line.split(":")[0]: int(line.split()[1]) * 1024
                for line in f
                if line.startswith(("VmRSS:", "RssShmem:"))
            }
    except OSError:
        return 0, 0
    return fields.get("VmRSS", 0), fields.get("RssShmem", 0)


def run_job(path: Path, model_argv: list[str], malloc: str, store: Path) -> dict[str, Any]:
    """The job on ``path`` as a subprocess; peak RSS per process kind, CPU s of its tree."""
    catalog = store.parent / f"{store.name}.csv"
    catalog.write_text(f"track_id,uri\nlong,{path}\n")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    if malloc == "default":
        env["MUSICFM_WORKER_MALLOC"] = "default"
    cmd = [sys.executable, str(REPO / "jobs" / "embed_catalog.py"), "--catalog", str(catalog), "--output",
           str(store), *model_argv, "--no-progress", "--max-duration-s", "25000",
           "--allowed-prefixes", str(path.parent)]  # fmt: skip
    w0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout or []), daemon=True).start()
    peak: dict[str, int] = {}
    own: dict[str, int] = {}  # RSS less shared memory (the object store's pages)
    cpu: dict[tuple[int, int], float] = {}
    while proc.poll() is None:
        tree = tree_cpu(proc.pid)
        cpu.update(tree)
        for pid, _start in tree:
            k = _kind(pid)
            rss, shared = _rss(pid)
            peak[k] = max(peak.get(k, 0), rss)
            own[k] = max(own.get(k, 0), rss - shared)
        time.sleep(0.2)
    wall = time.perf_counter() - w0
    text = "".join(out)
    warned = [line for line in text.splitlines() if "only requests" in line or "used up to" in line]
    if proc.returncode == 0 and " 1 embedded" not in text:  # the file must have gone through the model
        raise SystemExit(f"the job did not embed the file:\n{text[-1500:]}")
    return {"rc": proc.returncode, "wall_s": wall, "cpu_s": sum(cpu.values()), "peak_rss_mb":
            {k: v / 2**20 for k, v in sorted(peak.items())},
            "peak_own_mb": {k: v / 2**20 for k, v in sorted(own.items())}, "ray_memory_warnings": warned,
            "tail": text[-1500:] if proc.returncode else ""}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench/long_file.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--hours", default="2,6", help="file lengths in hours, comma-separated (default 2,6)")
    ap.add_argument(
        "--malloc", default="tuned", help="tuned (WORKER_MALLOC_TUNABLES), default, or both: tuned,default"
    )
    ap.add_argument("--model-config", default=None, help="MusicFMConfig JSON (default: the golden model)")
    ap.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint (default: the golden one; 'random' with --model-config)",
    )
    ap.add_argument("--layers", default="1,3")
    ap.add_argument("--json", type=Path, default=None)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    shared = find_shared()
    if args.checkpoint is None and shared is None:
        raise SystemExit("cannot find shared/golden; set MUSICFM_SHARED or give --checkpoint")
    golden = (shared / "golden") if shared else None
    model_argv = ["--layers", args.layers, "--precision", "fp32"]
    if args.checkpoint in (None, "golden"):
        model_argv += ["--checkpoint", str(golden / "checkpoint.pt"), "--stats", str(golden / "stats.json"),
                       "--model-config", args.model_config or str(golden / "config.json")]  # fmt: skip
    else:
        model_argv += ["--checkpoint", args.checkpoint] + (
            ["--model-config", args.model_config] if args.model_config else []
        )
    cache = Path(tempfile.gettempdir()) / "musicfm-bench-long"
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="musicfm-long-"))
    results = []
    for hours in [float(h) for h in args.hours.split(",") if h.strip()]:
        path = long_flac(cache / f"{hours:g}h.flac", hours)
        for malloc in [m.strip() for m in args.malloc.split(",") if m.strip()]:
            print(f"{hours:g} h, malloc {malloc} ...", file=sys.stderr)
            r = run_job(path, model_argv, malloc, work / f"store-{hours:g}-{malloc}")
            r.update(hours=hours, malloc=malloc, cpu_s_per_audio_h=r["cpu_s"] / hours)
            results.append(r)
            peaks = ", ".join(f"{k} {v:,.0f}" for k, v in r["peak_rss_mb"].items())
            own = ", ".join(f"{k} {v:,.0f}" for k, v in r["peak_own_mb"].items())
            print(f"{hours:g} h, malloc {malloc}: rc {r['rc']}, {r['wall_s']:.0f} s wall, "
                  f"{r['cpu_s_per_audio_h']:.0f} CPU s per audio hour; peak RSS MB: {peaks}; "
                  f"peak RSS less shared memory (object store pages) MB: {own}; "
                  f"Ray memory warnings: {len(r['ray_memory_warnings'])}")  # fmt: skip
            if r["rc"]:
                print(r["tail"], file=sys.stderr)
    out = {"load_avg": os.getloadavg(), "cpus": os.cpu_count(), "results": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
