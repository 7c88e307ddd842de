"""Resume benchmark: an embed of many tiny real-audio tracks, SIGKILLed about half way and run
again with the same command, against an uninterrupted run of the same catalog.

    python bench/resume.py --tracks 20000 --chunk-size 1000      # not in CI (minutes)

Tracks are short slices of the real clips in ``shared/audio`` (written as 16-bit WAV); the model
is the small golden MusicFM of ``shared/golden`` (real model stage, tiny cost). Prints, measured
in one run:

* the uninterrupted embed: wall time, tracks;
* the killed run: chunks and tracks committed when the driver got SIGKILL;
* the rerun: tracks it found already there, tracks it embedded, its wall time;
* tracks embedded twice (embedded by the killed run but not committed, so redone) and the bound
  ``chunk size x chunks in flight``; the in-flight count is what the killed run's log shows as
  started-but-not-committed when it died;
* whether the final store equals the uninterrupted one (same track ids, vectors within 1e-6).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from tools.testkit.paths import find_shared  # noqa: E402

SHARED = find_shared() or REPO / "shared"
AUDIO, GOLDEN = SHARED / "audio", SHARED / "golden"

JOB = str(REPO / "jobs" / "embed_catalog.py")


def make_tracks(root: Path, n: int, seconds: float) -> Path:
    """``n`` WAV slices of the shared clips (16 kHz mono) and their catalog."""
    import soundfile as sf
    import soxr

    clips = sorted((AUDIO / "clips").glob("*.flac")) or sorted((AUDIO / "clips").iterdir())
    sources = []
    for c in clips:
        x, sr = sf.read(str(c), dtype="float32", always_2d=True)
        sources.append(soxr.resample(x.mean(axis=1), sr, 16000))
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    step = int(seconds * 16000)
    with open(root / "catalog.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["track_id", "uri", "title"])
        for i in range(n):
            src = sources[i % len(sources)]
            start = (i // len(sources)) * step % max(1, len(src) - step)
            path = audio / f"t{i:06d}.wav"
            if not path.exists():
                sf.write(str(path), src[start : start + step], 16000, subtype="PCM_16")
            w.writerow([f"t{i:06d}", str(path), f"slice {i}"])
    return root / "catalog.csv"


def command(catalog: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, JOB, "--catalog", str(catalog), "--output", str(out),
            "--checkpoint", str(GOLDEN / "checkpoint.pt"), "--stats", str(GOLDEN / "stats.json"),
            "--layers", "1,3", "--precision", "fp32", "--window-s", "1", "--batch-size", "32",
            "--decode-cpus", str(args.decode_cpus), "--chunk-size", str(args.chunk_size),
            "--no-progress", "--log-format", "json"]  # fmt: skip


def run(cmd: list[str], env: dict, kill_after_chunks: int | None = None) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    committed = 0
    tracks_committed = 0
    other: list[str] = []  # the job's other lines (its one-line error when it fails)
    assert p.stderr is not None
    for line in p.stderr:
        if not line.startswith("{"):
            other = [*other[-19:], line.rstrip()]
            continue
        ev = json.loads(line)
        if ev.get("step") == "chunk committed":
            committed += 1
            tracks_committed = int(ev.get("embedded_total", 0))
            if kill_after_chunks is not None and committed >= kill_after_chunks:
                p.send_signal(signal.SIGKILL)
                break
    out, err = p.communicate()
    if p.returncode not in (0, -signal.SIGKILL):
        print(
            f"resume: {' '.join(cmd[:2])} exited {p.returncode}:",
            *other,
            err[-3000:],
            sep="\n",
            file=sys.stderr,
        )
    return {"rc": p.returncode, "wall_s": time.perf_counter() - t0, "chunks": committed,
            "tracks_committed": tracks_committed, "stdout": out}  # fmt: skip


def lost_work(store: Path) -> tuple[int, int]:
    """(data files, distinct tracks) of ``windows`` data files on disk that no version of the
    table references: what the killed run embedded but never committed (work redone)."""
    import lance
    from lance.file import LanceFileReader

    uri = str(store / "windows.lance")
    used = set()
    for v in lance.dataset(uri).versions():
        for fr in lance.dataset(uri, version=v["version"]).get_fragments():
            used |= {f.path for f in fr.metadata.files}
    files, tracks = 0, set()
    for path in (store / "windows.lance" / "data").glob("*.lance"):
        if path.name in used:
            continue
        files += 1
        tracks |= set(LanceFileReader(str(path)).read_all().to_table().column(0).to_pylist())
    return files, len(tracks)


def vectors(store: Path) -> dict[str, np.ndarray]:
    import lance

    t = lance.dataset(str(store / "tracks.lance")).to_table(columns=["track_id", "layer_3"])
    return {
        k: np.asarray(v, np.float32)
        for k, v in zip(t["track_id"].to_pylist(), t["layer_3"].to_pylist(), strict=True)
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracks", type=int, default=20000)
    p.add_argument("--seconds", type=float, default=1.0, help="length of each track")
    p.add_argument("--chunk-size", type=int, default=1000)
    p.add_argument("--decode-cpus", default="2")
    p.add_argument("--workdir", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="musicfm-resume-"))
    catalog = make_tracks(root, args.tracks, args.seconds)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    n_chunks = -(-args.tracks // args.chunk_size)

    clean = run(command(catalog, root / "clean", args), env)
    killed = run(command(catalog, root / "resumed", args), env, kill_after_chunks=max(1, n_chunks // 2))
    lost_files, lost_tracks = lost_work(root / "resumed")  # before the rerun's cleanup
    rerun = run(command(catalog, root / "resumed", args), env)
    a, b = vectors(root / "clean"), vectors(root / "resumed")
    same_ids = sorted(a) == sorted(b)
    max_diff = max((float(np.abs(a[k] - b[k]).max()) for k in a if k in b), default=float("nan"))
    summary = rerun["stdout"]
    already = next((ln for ln in summary.splitlines() if "already in the store" in ln), "")
    embedded_rerun = int(already.split()[1]) if already else -1
    redone = embedded_rerun - (args.tracks - killed["tracks_committed"])
    print(
        f"catalog: {args.tracks} tracks x {args.seconds} s, chunk size {args.chunk_size} ({n_chunks} chunks)"
    )
    print(f"uninterrupted: rc {clean['rc']}, {clean['wall_s']:.1f} s")
    print(f"killed run:    SIGKILL after {killed['chunks']} committed chunk(s) = {killed['tracks_committed']} tracks "
          f"(rc {killed['rc']}, {killed['wall_s']:.1f} s)")  # fmt: skip
    print(f"rerun:         rc {rerun['rc']}, {rerun['wall_s']:.1f} s; {already.strip()}")
    print(f"tracks embedded twice: {lost_tracks} (in {lost_files} uncommitted windows data files of the killed "
          f"run) = {lost_tracks / args.chunk_size:.2f} x chunk size; "
          f"rerun embedded {embedded_rerun} = catalog - committed: {redone == 0}")  # fmt: skip
    print(
        f"final store equals the uninterrupted one: ids {same_ids}, max |diff| {max_diff:.2e} (<= 1e-6: {max_diff <= 1e-6})"
    )
    return 0 if same_ids and max_diff <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
