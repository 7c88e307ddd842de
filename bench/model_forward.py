"""Forward-pass benchmark of MusicFM25Hz: speed, peak memory, time breakdown and reduced-precision drift.

What it measures (all on one device, one process):

* throughput: x realtime = audio seconds processed per wall second, for each precision and batch size
  (median over ``--repeats`` timed calls after ``--warmup`` untimed ones); fixed-length windows
  (``--seconds``, 30 s = 720000 samples by default), all hidden states computed;
* peak memory of one forward call: CUDA ``max_memory_allocated`` above the allocation before the call;
  CPU: peak resident set size (sampled from ``/proc/self/statm`` by a thread every 2 ms) above the RSS
  before the call (freed heap is handed back with ``malloc_trim`` first, so the delta is the call's own);
* breakdown of one call into mel / conv front end / Conformer (so we know where the time goes);
* drift of bf16 (and fp16 on CUDA) against fp32 for every hidden state 0..L on real music: a clip from
  ``shared/audio/clips`` decoded with soundfile, downmixed to mono and resampled to 24 kHz with soxr.
  Max abs error and relative L2 error ``||h - h_ref|| / ||h_ref||`` per layer.

The model is the full-size config with deterministic random weights unless ``--config`` (a JSON in the
neutral format of ``shared/golden/config.json``) or ``--checkpoint``/``--stats`` are given. Drift numbers
on random weights only show the numerical behaviour of the kernels; rerun with ``--checkpoint`` for the
released weights.

    python bench/model_forward.py                       # full run: batches 1,2,4,8, 30 s, fp32 + bf16
    python bench/model_forward.py --quick               # smoke test: batch 1, 10 s, 1 repeat, < 1 minute
    python bench/model_forward.py --batches 1,4 --precisions fp32 --json out.json
    python bench/model_forward.py --profile             # also print the top torch.profiler ops (fp32, 1st batch)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from musicfm import MusicFM25Hz, MusicFMConfig  # noqa: E402
from musicfm.kernels import precision_context  # noqa: E402
from tools.testkit.paths import find_shared  # noqa: E402

SAMPLE_RATE = 24000


# --------------------------------------------------------------------------- inputs


def default_clip() -> Path | None:
    shared = find_shared()
    if shared is None:
        return None
    clips = sorted((shared / "audio" / "clips").glob("*"))
    # prefer the 30 s stereo Vorbis clip (exercises downmix + resampling); else the first one
    named = [p for p in clips if p.stem == "hw_city"]
    return (named or clips or [None])[0]


def load_clip(path: Path, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode with soundfile, average channels to mono, resample to ``sr`` with soxr: float32 (N,)."""
    import soundfile as sf
    import soxr

    data, file_sr = sf.read(str(path), dtype="float32", always_2d=True)  # (N, C)
    mono = data.mean(axis=1)
    if file_sr != sr:
        mono = soxr.resample(mono, file_sr, sr, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def make_batch(clip: np.ndarray, batch: int, n: int) -> torch.Tensor:
    """(batch, n) windows of the clip; item i starts i * 1.7 s later, wrapping around (clip tiled)."""
    reps = math.ceil((n + batch * 40800) / max(len(clip), 1)) + 1
    tiled = np.tile(clip, reps)
    rows = [tiled[i * 40800 : i * 40800 + n] for i in range(batch)]
    return torch.from_numpy(np.stack(rows))


# --------------------------------------------------------------------------- memory


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so an RSS delta counts only the next call's memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssPeak:
    """Samples the process RSS in a background thread; ``peak - start`` after the block."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssPeak:
        self.start = self.peak = _rss_bytes() or 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() or 0)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes() or 0)


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Yields a dict filled on exit with ``peak_mb`` (above the start) and ``peak_total_mb``."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        out["peak_mb"] = (peak - before) / 2**20
        out["peak_total_mb"] = peak / 2**20
    else:
        _malloc_trim()
        with RssPeak() as rss:
            yield out
        out["peak_mb"] = (rss.peak - rss.start) / 2**20
        out["peak_total_mb"] = rss.peak / 2**20


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def throughput(
    model: MusicFM25Hz, clip: np.ndarray, precision: str, batch: int, n: int, repeats: int, warmup: int
) -> dict[str, Any]:
    device = model.device
    wav = make_batch(clip, batch, n).to(device)

    def call() -> object:
        return model.hidden_states(wav, precision=precision)

    for _ in range(warmup - 1):
        call()
    with peak_memory(device) as mem:  # on the last untimed call: malloc_trim makes its page faults dearer
        call()
    walls, cpus = [], []
    for _ in range(repeats):
        c0 = time.process_time()
        walls.append(timed(call, device))
        cpus.append(time.process_time() - c0)
    audio_s = batch * n / SAMPLE_RATE
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    threads = torch.get_num_threads()
    return {
        "precision": precision,
        "batch": batch,
        "audio_seconds": audio_s,
        "times_s": [round(t, 5) for t in walls],
        "median_s": wall,
        "best_s": min(walls),
        "xrt": audio_s / wall,
        "xrt_best": audio_s / min(walls),
        # process CPU seconds per call (median); audio seconds per CPU second is the per-core figure,
        # which other processes competing for the cores inflate far less than the wall figure
        "cpu_s": cpu,
        "cpu_util": cpu / wall,
        "threads": threads,
        "xrt_per_cpu_s": audio_s / cpu if cpu > 0 else None,
        "peak_mem_mb": mem["peak_mb"],
        "peak_total_mb": mem["peak_total_mb"],
    }


def breakdown(model: MusicFM25Hz, clip: np.ndarray, precision: str, batch: int, n: int, repeats: int) -> dict:
    """Median wall and process-CPU time of the three stages of ``hidden_states``, run stage by stage.

    Shares are of CPU time on a CPU run (robust to other processes on the machine), else of wall time.
    """
    device = model.device
    wav = make_batch(clip, batch, n).to(device)
    wanted = set(range(model.config.encoder_depth + 1))
    names = ("mel", "frontend", "conformer")
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}

    def clock() -> tuple[float, float]:
        _sync(device)
        return time.perf_counter(), time.process_time()

    for rep in range(repeats + 1):  # first round is warm-up
        marks = [clock()]
        mel = model.mel_frontend(wav)
        marks.append(clock())
        with precision_context(precision, device):
            x = model.frontend(mel)
            marks.append(clock())
            model.encoder(x, wanted)
            marks.append(clock())
        if rep:
            for i, k in enumerate(names):
                wall[k].append(marks[i + 1][0] - marks[i][0])
                cpu[k].append(marks[i + 1][1] - marks[i][1])
    wall_med = {k: statistics.median(v) for k, v in wall.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    basis = cpu_med if device.type == "cpu" else wall_med
    total = sum(basis.values())
    return {
        "precision": precision,
        "batch": batch,
        "audio_seconds": batch * n / SAMPLE_RATE,
        "stages_s": wall_med,
        "stages_cpu_s": cpu_med,
        "share_of": "cpu" if device.type == "cpu" else "wall",
        "share": {k: v / total for k, v in basis.items()},
        "total_s": sum(wall_med.values()),
        "total_cpu_s": sum(cpu_med.values()),
    }


def drift(model: MusicFM25Hz, clip: np.ndarray, precisions: list[str], n: int) -> dict[str, list[dict]]:
    """Per hidden state: max abs and relative L2 error of each precision against fp32 (batch 1)."""
    wav = make_batch(clip, 1, n).to(model.device)
    ref = [h.double() for h in model.hidden_states(wav, precision="fp32")]
    out: dict[str, list[dict]] = {}
    for p in precisions:
        got = model.hidden_states(wav, precision=p)
        rows = []
        for i, (r, g) in enumerate(zip(ref, got, strict=True)):
            d = g.double() - r
            rows.append(
                {
                    "layer": i,
                    "max_abs": float(d.abs().max()),
                    "rel_l2": float(d.norm() / r.norm().clamp_min(1e-30)),
                    "ref_abs_max": float(r.abs().max()),
                    "cos_mean_pool": float(
                        torch.nn.functional.cosine_similarity(g.double().mean(1), r.mean(1), dim=-1).min()
                    ),
                }
            )
        out[p] = rows
    return out


def profile_ops(model: MusicFM25Hz, clip: np.ndarray, batch: int, n: int, top: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    wav = make_batch(clip, batch, n).to(model.device)
    model.hidden_states(wav)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        model.hidden_states(wav)
    key = "self_cuda_time_total" if model.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


# --------------------------------------------------------------------------- reporting


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, sep, *body])


def format_report(res: dict[str, Any]) -> str:
    m = res["meta"]
    parts = [
        f"MusicFM25Hz forward  |  {m['device_name']}  |  torch {m['torch']}  |  threads {m['threads']}",
        f"model: {m['model']} ({m['params_m']:.1f} M params, D={m['config']['encoder_dim']}, "
        f"L={m['config']['encoder_depth']})  |  window {m['seconds']:g} s = {m['samples']} samples "
        f"-> {m['tokens']} tokens  |  repeats {m['repeats']}, warm-up {m['warmup']}",
        "",
        "Throughput (x realtime = audio seconds per wall second; median call time; peak memory of one call)",
        _table(
            [
                "precision",
                "batch",
                "audio s",
                "call s",
                "wall x RT",
                "wall x RT best",
                "CPU s",
                "CPU util",
                "x RT per CPU-s",
                "peak MB",
                "peak total MB",
            ],
            [
                [
                    r["precision"],
                    str(r["batch"]),
                    f"{r['audio_seconds']:g}",
                    f"{r['median_s']:.3f}",
                    f"{r['xrt']:.2f}",
                    f"{r['xrt_best']:.2f}",
                    f"{r['cpu_s']:.3f}",
                    f"{r['cpu_util']:.2f}",
                    "-" if r["xrt_per_cpu_s"] is None else f"{r['xrt_per_cpu_s']:.2f}",
                    f"{r['peak_mem_mb']:.0f}",
                    f"{r['peak_total_mb']:.0f}",
                ]
                for r in res["throughput"]
            ],
        ),
        "wall x RT: audio s / median wall s of a call; best: fastest call; CPU s: median process CPU s "
        "of a call; CPU util: CPU s / wall s; x RT per CPU-s: audio s / CPU s (the per-core figure)",
    ]
    load = m.get("loadavg_start")
    if (
        load is not None
        and m["device"] == "cpu"
        and max(load, m.get("loadavg_end") or 0) > (m["cpu_count"] or 1)
    ):
        parts.insert(
            2,
            f"WARNING: machine busy (1-min load {load:.1f} -> {m.get('loadavg_end', 0):.1f} on "
            f"{m['cpu_count']} CPUs): wall-clock figures are inflated, see x RT per CPU-s",
        )
    for b in res.get("breakdown", []):
        parts += [
            "",
            f"Breakdown ({b['precision']}, batch {b['batch']}, {b['audio_seconds']:g} s of audio; "
            f"share of {b['share_of']} time)",
            _table(
                ["stage", "wall s", "CPU s", "share"],
                [
                    [k, f"{v:.3f}", f"{b['stages_cpu_s'][k]:.3f}", f"{b['share'][k] * 100:.1f} %"]
                    for k, v in b["stages_s"].items()
                ]
                + [["total", f"{b['total_s']:.3f}", f"{b['total_cpu_s']:.3f}", "100.0 %"]],
            ),
        ]
    d = res.get("drift")
    if d:
        parts += [
            "",
            f"Drift vs fp32 on real music ({d['clip']}, {d['seconds']:g} s, batch 1, weights: {m['model']})",
        ]
        for p, rows in d["precisions"].items():
            parts += [
                f"[{p}]",
                _table(
                    ["layer", "max abs", "rel L2", "|ref| max", "cos(mean-pool)"],
                    [
                        [
                            str(r["layer"]),
                            f"{r['max_abs']:.3e}",
                            f"{r['rel_l2']:.3e}",
                            f"{r['ref_abs_max']:.2f}",
                            f"{r['cos_mean_pool']:.6f}",
                        ]
                        for r in rows
                    ],
                ),
            ]
    if res.get("profile"):
        parts += ["", "torch.profiler, fp32, one call", res["profile"]]
    return "\n".join(parts)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,2,4,8", help="comma-separated batch sizes (default 1,2,4,8)")
    ap.add_argument("--seconds", type=float, default=30.0, help="window length in seconds (default 30)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per point (default 3)")
    ap.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed calls before timing (default 1, at least 1: it measures memory)",
    )
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    ap.add_argument(
        "--precisions",
        default=None,
        help="comma-separated subset of fp32,bf16,fp16 (default: fp32,bf16 on CPU; all three on CUDA)",
    )
    ap.add_argument("--config", type=Path, default=None, help="model config JSON (default: full size)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="real weights (.pt needs --stats)")
    ap.add_argument("--stats", type=Path, default=None, help="stats JSON for --checkpoint")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument(
        "--clip", type=Path, default=None, help="audio file (default: shared/audio/clips/hw_city.ogg)"
    )
    ap.add_argument("--no-breakdown", action="store_true", help="skip the mel / front end / Conformer split")
    ap.add_argument("--no-drift", action="store_true", help="skip the per-layer drift table")
    ap.add_argument(
        "--profile", action="store_true", help="print the top torch.profiler ops of one fp32 call"
    )
    ap.add_argument("--quick", action="store_true", help="smoke test: batch 1, 10 s, 1 repeat")
    ap.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="write all figures to this JSON file"
    )
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.seconds, args.repeats = "1", 10.0, 1
    args.warmup = max(1, args.warmup)
    args.repeats = max(1, args.repeats)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device available")
    if args.precisions:
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    else:
        precisions = ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"]
    if device.type != "cuda" and "fp16" in precisions:
        raise SystemExit("fp16 is CUDA-only (autocast); use fp32/bf16 on CPU")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    n = int(round(args.seconds * SAMPLE_RATE))

    clip_path = args.clip or default_clip()
    if clip_path is not None:
        clip = load_clip(clip_path)
    else:  # no shared/ folder: a deterministic noise + tone stand-in, reported as such
        t = np.arange(n, dtype=np.float32) / SAMPLE_RATE
        rng = np.random.default_rng(0)
        clip = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)

    if args.checkpoint is not None:
        model = MusicFM25Hz.from_checkpoint(args.checkpoint, args.stats, args.config)
        model_name = f"checkpoint {args.checkpoint.name}"
    else:
        cfg = MusicFMConfig.from_json(args.config) if args.config else MusicFMConfig()
        model = MusicFM25Hz(cfg, seed=args.seed)
        model_name = f"random init (seed {args.seed})" + (
            f", config {args.config.name}" if args.config else ""
        )
    model = model.to(device).eval()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    cfg = model.config
    meta = {
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {_cpu_name()}",
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "model": model_name,
        "model_id": model.model_id,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "config": cfg.to_dict(),
        "seconds": args.seconds,
        "samples": n,
        "tokens": cfg.num_tokens(n),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "precisions": precisions,
        "batches": batches,
        "clip": str(clip_path) if clip_path else "synthetic",
        "quick": bool(args.quick),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": _loadavg(),
    }
    res: dict[str, Any] = {"meta": meta, "throughput": [], "breakdown": []}
    with torch.inference_mode():
        for p in precisions:  # one short call each first: builds the one-off caches (folded weights, rotary)
            model.hidden_states(make_batch(clip, 1, min(n, SAMPLE_RATE)).to(device), precision=p)
        for p in precisions:
            for b in batches:
                r = throughput(model, clip, p, b, n, args.repeats, args.warmup)
                res["throughput"].append(r)
                print(
                    f"  {p:>4} batch {b:>2}: {r['median_s']:.3f} s/call, {r['xrt']:.2f} wall x realtime, "
                    f"{r['xrt_per_cpu_s']:.2f} x realtime per CPU-s",
                    flush=True,
                )
        if not args.no_breakdown:
            for p in precisions:
                res["breakdown"].append(breakdown(model, clip, p, batches[0], n, max(1, args.repeats)))
        low = [p for p in precisions if p != "fp32"]
        if not args.no_drift and low:
            res["drift"] = {
                "clip": Path(meta["clip"]).name,
                "seconds": args.seconds,
                "reference": "fp32",
                "precisions": drift(model, clip, low, n),
            }
        if args.profile:
            res["profile"] = profile_ops(model, clip, batches[0], n)
    meta["loadavg_end"] = _loadavg()
    print(format_report(res), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
        print(f"\nwrote {args.json}")
    return res


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
