"""Decode speed per format, sample rate and channel count, through the pipeline's own decoder.

For each of wav16 / float wav / flac / ogg (Vorbis) / opus / mp3 at 22.05 / 44.1 / 48 kHz, mono and
stereo, a test file is written with soundfile from the real clips in ``shared/audio/clips`` (every
stereo clip, resampled to the rate with soxr VHQ and concatenated to ``--seconds``; mono = mean of the
channels). Opus exists at 48 kHz only (libopus codes 8/12/16/24/48 kHz).

Then, per file, in this process (one thread):

* ``decode_audio`` (``pipeline/io/audio.py``: block reads, downmix, soxr stream to 24 kHz): x realtime
  per core = audio seconds / process CPU seconds of the call (best of ``--repeats``), and wall
  x realtime = audio seconds / wall seconds;
* the resample share: CPU seconds of the same soxr stream (same blocks, same quality) run alone on
  the file's mono samples, divided by the CPU seconds of the whole ``decode_audio`` call; the
  remainder is reading, decoding and downmixing.

``--variants`` then times candidate hot paths on a subset (block size, soxr quality) and measures
the embedding drift of each against today's path: cosine of pooled vectors (every window mean
and the track mean, every hidden state) of the golden small model on all shared clips.

    python bench/decode_formats.py                 # full table (60 s files, 3 repeats) + variants
    python bench/decode_formats.py --quick         # smoke test: 10 s files, 1 repeat, no variants
    python bench/decode_formats.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import soxr  # noqa: E402

from pipeline.io.audio import TARGET_SR, decode_audio  # noqa: E402
from tools.testkit.paths import find_shared  # noqa: E402

# name -> (soundfile format, subtype, extension)
FORMATS: dict[str, tuple[str, str, str]] = {
    "wav16": ("WAV", "PCM_16", "wav"),
    "wavf32": ("WAV", "FLOAT", "wav"),
    "flac": ("FLAC", "PCM_16", "flac"),
    "ogg": ("OGG", "VORBIS", "ogg"),
    "opus": ("OGG", "OPUS", "opus"),
    "mp3": ("MP3", "MPEG_LAYER_III", "mp3"),
}
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
RATES = (22050, 44100, 48000)
BLOCK = 65536  # decode_audio's default block_frames


# --------------------------------------------------------------------------- test files


def source_audio(clips: Path, rate: int, seconds: float) -> np.ndarray:
    """(N, 2) float32 at ``rate``: every stereo clip, resampled (VHQ), concatenated to ``seconds``."""
    parts, total = [], 0
    want = int(round(seconds * rate))
    while total < want:
        for p in sorted(clips.glob("*.*")):
            x, sr = sf.read(p, dtype="float32", always_2d=True)  # (n, C)
            if x.shape[1] != 2:
                continue
            if sr != rate:
                x = soxr.resample(x, sr, rate, quality="VHQ").astype(np.float32)
            parts.append(x)
            total += x.shape[0]
            if total >= want:
                break
    return np.clip(np.concatenate(parts)[:want], -1.0, 1.0)


def write_files(out: Path, clips: Path, seconds: float, rates: list[int], formats: list[str]) -> list[dict]:
    files = []
    for rate in rates:
        stereo = source_audio(clips, rate, seconds)
        for ch in (1, 2):
            x = stereo if ch == 2 else stereo.mean(axis=1, dtype=np.float32)
            for name in formats:
                fmt, sub, ext = FORMATS[name]
                if name == "opus" and rate not in OPUS_RATES:
                    continue
                path = out / f"{name}_{rate}_{ch}ch.{ext}"
                if not path.exists():
                    sf.write(path, x, rate, format=fmt, subtype=sub)
                files.append({"format": name, "rate": rate, "channels": ch, "path": path})
    return files


# --------------------------------------------------------------------------- timing


def cpu_wall(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best process CPU s, best wall s) of ``repeats`` calls."""
    cpus, walls = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - t0)
    return min(cpus), min(walls)


def resample_alone(mono: np.ndarray, sr: int, quality: str, block: int) -> None:
    rs = soxr.ResampleStream(sr, TARGET_SR, 1, dtype="float32", quality=quality)
    for s in range(0, mono.shape[0], block):
        rs.resample_chunk(mono[s : s + block], last=False)
    rs.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


def measure(f: dict, repeats: int, block: int = BLOCK, quality: str = "HQ") -> dict:
    path = f["path"]
    dec = decode_audio(path, block_frames=block, resample_quality=quality)
    audio_s = dec.frames_in / dec.sample_rate_in
    cpu, wall = cpu_wall(lambda: decode_audio(path, block_frames=block, resample_quality=quality), repeats)
    x, sr = sf.read(path, dtype="float32", always_2d=True)  # (n, C)
    mono = np.ascontiguousarray(x.mean(axis=1, dtype=np.float32))
    rs_cpu, _ = (
        cpu_wall(lambda: resample_alone(mono, sr, quality, block), repeats) if sr != TARGET_SR else (0.0, 0)
    )
    return {
        "format": f["format"],
        "rate": f["rate"],
        "channels": f["channels"],
        "kbytes": path.stat().st_size / 1024,
        "audio_s": audio_s,
        "cpu_s": cpu,
        "wall_s": wall,
        "xrt_per_core": audio_s / cpu,
        "xrt_wall": audio_s / wall,
        "resample_cpu_s": rs_cpu,
        "resample_share": min(1.0, rs_cpu / cpu),
        "block": block,
        "quality": quality,
    }


# --------------------------------------------------------------------------- drift


def pooled_vectors(shared: Path, **decode_kw: Any) -> dict[str, np.ndarray]:
    """Golden small model: every window mean and the track mean of every clip, all layers."""
    from pipeline.engine.inference import EmbedSettings, WindowEmbedder, embed_samples, load_model

    g = shared / "golden"
    model = load_model(str(g / "checkpoint.pt"), str(g / "stats.json"), device="cpu")
    layers = tuple(range(model.config.encoder_depth + 1))
    emb = WindowEmbedder(model, EmbedSettings(layers=layers, window_s=10.0, hop_s=10.0))
    out = {}
    for p in sorted((shared / "audio" / "clips").glob("*.*")):
        te = embed_samples(emb, decode_audio(p, **decode_kw).samples)
        for lay in layers:
            out[f"{p.stem}/track/{lay}"] = te.track[lay]
            for k, (_s, _e, means) in enumerate(te.windows):
                out[f"{p.stem}/w{k}/{lay}"] = means[lay]
    return out


def min_cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    cos = []
    for k, v in a.items():
        x, y = v.astype(np.float64), b[k].astype(np.float64)
        cos.append(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
    return min(cos)


# --------------------------------------------------------------------------- report


def _table(headers: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w[i]) for i, h in enumerate(headers)), "  ".join("-" * x for x in w)]
    lines += ["  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def format_table(rows: list[dict]) -> str:
    return _table(
        ["format", "rate", "ch", "KB", "audio s", "x RT per core", "x RT wall", "resample share"],
        [
            [
                r["format"],
                str(r["rate"]),
                str(r["channels"]),
                f"{r['kbytes']:.0f}",
                f"{r['audio_s']:.1f}",
                f"{r['xrt_per_core']:.0f}",
                f"{r['xrt_wall']:.0f}",
                f"{r['resample_share'] * 100:.0f} %",
            ]
            for r in rows
        ],
    )


VARIANTS = [  # (label, decode_audio keywords)
    ("today: HQ, 65536-frame blocks", {}),
    ("HQ, 262144-frame blocks", {"block_frames": 262144}),
    ("HQ, 16384-frame blocks", {"block_frames": 16384}),
    ("soxr MQ", {"resample_quality": "MQ"}),
    ("soxr LQ", {"resample_quality": "LQ"}),
    ("soxr VHQ", {"resample_quality": "VHQ"}),
]
VARIANT_FILES = [("flac", 44100, 2), ("ogg", 44100, 2), ("mp3", 44100, 2), ("wav16", 48000, 1)]


def run_variants(files: list[dict], shared: Path, repeats: int) -> list[dict]:
    pick = [f for f in files if (f["format"], f["rate"], f["channels"]) in VARIANT_FILES]
    ref = pooled_vectors(shared)
    out = []
    for label, kw in VARIANTS:
        block, quality = kw.get("block_frames", BLOCK), kw.get("resample_quality", "HQ")
        rows = [measure(f, repeats, block, quality) for f in pick]
        cos = 1.0 if not kw else min_cosine(ref, pooled_vectors(shared, **kw))
        out.append(
            {
                "variant": label,
                "per_file_xrt_per_core": {
                    f"{r['format']}_{r['rate']}_{r['channels']}ch": r["xrt_per_core"] for r in rows
                },
                "cpu_s": sum(r["cpu_s"] for r in rows),
                "min_cosine_vs_today": cos,
            }
        )
        print(
            f"  variant {label}: {sum(r['cpu_s'] for r in rows):.3f} CPU s, min cosine {cos:.7f}", flush=True
        )
    base = out[0]["cpu_s"]
    for v in out:
        v["speedup_vs_today"] = base / v["cpu_s"]
    return out


def format_variants(vs: list[dict]) -> str:
    keys = list(vs[0]["per_file_xrt_per_core"])
    return _table(
        ["variant", *keys, "speed-up", "min cosine vs today"],
        [
            [
                v["variant"],
                *(f"{v['per_file_xrt_per_core'][k]:.0f}" for k in keys),
                f"{v['speedup_vs_today']:.2f}x",
                f"{v['min_cosine_vs_today']:.7f}",
            ]  # fmt: skip
            for v in vs
        ],
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="decode_formats", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each test file (default 60)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per file, best kept (default 3)")
    ap.add_argument("--rates", default="22050,44100,48000", help="sample rates (default 22050,44100,48000)")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"subset of {','.join(FORMATS)}")
    ap.add_argument("--no-variants", action="store_true", help="skip the hot-path variants and their drift")
    ap.add_argument("--dir", type=Path, default=None, help="where test files go (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 10 s files, 1 repeat, no variants")
    ap.add_argument("--json", type=Path, default=None, metavar="OUT", help="write all figures here")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.repeats, args.no_variants = 10.0, 1, True
    fmts = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or args.seconds <= 0 or args.repeats < 1:
        ap.error(f"bad --formats {bad}" if bad else "--seconds and --repeats must be positive")
    args.formats = fmts
    try:
        args.rates = [int(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--rates: expected comma-separated integers, got {args.rates!r}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    shared = find_shared()
    if shared is None or not (shared / "audio" / "clips").is_dir():
        raise SystemExit("decode_formats: error: cannot find shared/audio/clips (set MUSICFM_SHARED)")
    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="decode-formats-")
        args.dir = Path(tmp.name)
    args.dir.mkdir(parents=True, exist_ok=True)
    files = write_files(args.dir, shared / "audio" / "clips", args.seconds, args.rates, args.formats)
    print(f"{len(files)} files of {args.seconds:g} s in {args.dir}", flush=True)
    rows = [measure(f, args.repeats) for f in files]
    meta = {
        "commit": _commit(),
        "libsndfile": sf.__libsndfile_version__,
        "soxr": soxr.__version__,
        "cpu": os.cpu_count(),
        "loadavg": os.getloadavg()[0],
        "seconds": args.seconds,
        "repeats": args.repeats,
    }
    res: dict[str, Any] = {"meta": meta, "rows": rows}
    print(
        f"\ndecode_audio to mono 24 kHz, one core (commit {meta['commit']}, libsndfile {meta['libsndfile']}, "
        f"soxr {meta['soxr']}, {args.seconds:g} s files, best of {args.repeats}, load {meta['loadavg']:.1f})"
    )
    print(format_table(rows))
    print(
        "x RT per core: audio s / process CPU s of decode_audio; wall: audio s / wall s; resample share: "
        "CPU s of the soxr HQ stream alone / CPU s of decode_audio (the rest reads, decodes and downmixes)"
    )
    for name in args.formats:
        sel = [r["xrt_per_core"] for r in rows if r["format"] == name]
        if sel:
            print(f"  {name:>6}: median {statistics.median(sel):.0f}x per core over {len(sel)} files")
    if not args.no_variants:
        print(
            "\nHot-path variants (x RT per core per file; drift: golden model, all shared clips)", flush=True
        )
        res["variants"] = run_variants(files, shared, args.repeats)
        print(format_variants(res["variants"]))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
        print(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()
    return res


if __name__ == "__main__":
    main()
