"""GPU benchmark of the model stage: one command on a machine with a CUDA GPU (``bench/gpu.sh``).

Prints, for one GPU:

1. **model only**: x realtime per GPU of ``MusicFM25Hz.hidden_states`` on device-resident 30 s windows
   (layers 7 and 12 pooled, as the job stores them) for fp32 / bf16 / fp16 x batch 8 / 32 / 64, eager
   and ``torch.compile`` (``--no-compile`` skips it); MFU = counted FLOPs (``bench/flops.py``) x
   x realtime / the GPU's dense peak for that precision; peak memory (``max_memory_allocated``);
   the SDPA kernel each precision runs (``pipeline.engine.device.sdpa_backends``);
2. **the model stage's own path**: ``WindowEmbedder`` on host (NumPy) windows, with the copy of batch
   n+1 overlapping the compute of batch n and one readback per batch, at the batch size it picks
   from the free memory, against model-only at that batch size;
3. **the pipeline**: ``run_embed`` (Ray, real decode of FLAC files made from the shared clips) with
   N decode CPUs for each N of ``--decode-cpus``: x realtime and the GPU busy fraction (share of
   ``nvidia-smi`` samples with a kernel running, during the run) and the model actor's busy seconds.

It exits at once with a one-line error when there is no CUDA device. ``--cpu-smoke`` runs the same
code on the CPU at toy sizes (small golden model, batch 2, 2 s, fp32/bf16), to check the script.

    bash bench/gpu.sh                        # everything, full-size model, random weights
    python bench/gpu.py --precisions bf16 --batches 32 --no-compile --decode-cpus 8
    python bench/gpu.py --cpu-smoke          # on a machine without a GPU: checks the code paths
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
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

SAMPLE_RATE = 24000
LAYERS = (7, 12)  # what the job stores by default (full-size model)


def layers_for(model: Any) -> tuple[int, ...]:
    depth = model.config.encoder_depth
    return LAYERS if depth >= max(LAYERS) else (1, depth)


# Dense peak TFLOP/s per precision (no sparsity): vendor data sheets. fp32 = CUDA cores (no TF32:
# the model's fp32 path disables TF32 for reference numerics). Matched by substring of the name.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "H100 PCIe": {"fp32": 51.0, "bf16": 756.0, "fp16": 756.0},
    "H100": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0},
    "A100": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0},
    "L40S": {"fp32": 91.6, "bf16": 362.0, "fp16": 362.0},
    "L4": {"fp32": 30.3, "bf16": 121.0, "fp16": 121.0},
    "A10G": {"fp32": 31.2, "bf16": 70.0, "fp16": 70.0},
    "A10": {"fp32": 31.2, "bf16": 125.0, "fp16": 125.0},
}


def fail(msg: str) -> None:
    print(f"gpu: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def peak_tflops(name: str, precision: str, override: float | None) -> float | None:
    if override:
        return override
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision]
    return None


# --------------------------------------------------------------------------- model only


def model_only(model: Any, precision: str, batch: int, seconds: float, repeats: int) -> dict:
    import torch

    from pipeline.engine.staging import pool_batch

    dev = model.device
    n = int(round(seconds * SAMPLE_RATE))
    x = (0.1 * torch.randn((batch, n), generator=torch.Generator().manual_seed(0))).to(dev)  # (B, N)
    cuda = dev.type == "cuda"

    def call() -> None:
        hs = model.hidden_states(x, layers_for(model), precision=precision)  # 2 x (B, T, D)
        pool_batch(hs, None).cpu()  # (2, B, D): the job's one readback

    with torch.inference_mode():
        t0 = time.perf_counter()
        call()  # warm-up (and compile, when compiled)
        first_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        times = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            call()
            if cuda:
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if cuda else float("nan")
    med = statistics.median(times)
    return {"median_s": med, "xrt": batch * seconds / med, "peak_mb": peak, "first_call_s": first_s}


# --------------------------------------------------------------------------- embedder path


def embedder_path(model: Any, precision: str, seconds: float, windows: int, batch: int | None) -> dict:
    import numpy as np

    from pipeline.engine.inference import EmbedSettings, WindowEmbedder

    n = int(round(seconds * SAMPLE_RATE))
    rng = np.random.default_rng(0)
    audio = [(0.1 * rng.standard_normal(n)).astype(np.float32) for _ in range(windows)]
    emb = WindowEmbedder(
        model,
        EmbedSettings(layers=layers_for(model), window_s=seconds, hop_s=seconds, precision=precision),
        batch,
        allow_slow_bf16=True,  # the CPU smoke checks the script at toy sizes, on any CPU
    )
    emb.embed(audio[: emb.max_batch])  # warm-up
    emb.model_seconds = emb.device_seconds = 0.0
    t0 = time.perf_counter()
    emb.embed(audio)
    wall = time.perf_counter() - t0
    return {
        "batch": emb.max_batch,
        "windows": windows,
        "wall_s": wall,
        "xrt": windows * seconds / wall,
        "device_busy": emb.device_seconds / wall,
    }


# --------------------------------------------------------------------------- pipeline


class GpuSampler:
    """Share of ``nvidia-smi`` samples (every 100 ms) with a kernel running on GPU ``index``."""

    def __init__(self, index: int) -> None:
        self.index, self.samples, self._stop = index, [], threading.Event()
        self.available = shutil.which("nvidia-smi") is not None

    def __enter__(self) -> GpuSampler:
        if self.available:
            self.proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    f"--id={self.index}",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "100",
                ],  # fmt: skip
                stdout=subprocess.PIPE,
                text=True,
            )
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.strip().isdigit():
                self.samples.append(int(line.strip()))

    def __exit__(self, *exc: object) -> None:
        if self.available:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.thread.join(timeout=5)

    def busy(self) -> float | None:
        return statistics.mean(self.samples) / 100 if self.samples else None


def make_catalog(root: Path, tracks: int, track_s: float) -> Path:
    """``tracks`` catalog rows over 12 distinct 44.1 kHz stereo FLAC files made from the shared clips."""
    import numpy as np
    import soundfile as sf
    import soxr

    from tools.testkit.paths import require_shared

    AUDIO = require_shared() / "audio"
    root.mkdir(parents=True, exist_ok=True)
    clips = sorted((AUDIO / "clips").glob("*.*"))
    files = []
    for k, p in enumerate(clips):
        out = root / f"{p.stem}_{track_s:g}s.flac"
        if not out.exists():
            x, sr = sf.read(p, dtype="float32", always_2d=True)  # (n, C)
            x = np.repeat(x, 2, axis=1)[:, :2] if x.shape[1] == 1 else x[:, :2]
            if sr != 44100:
                x = soxr.resample(x, sr, 44100).astype(np.float32)
            reps = int(np.ceil(track_s * 44100 / x.shape[0]))
            sf.write(out, np.tile(x, (reps, 1))[: int(track_s * 44100)], 44100, subtype="PCM_16")
        files.append(out)
        del k
    cat = root / f"catalog_{tracks}.csv"
    with open(cat, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["track_id", "uri"])
        for i in range(tracks):
            w.writerow([f"t{i:06d}", files[i % len(files)].name])
    return cat


def pipeline_run(
    catalog: Path, out: Path, decode_cpus: int, precision: str, batch: int, cfg: Path | None
) -> dict:
    import ray

    from pipeline.runs.embed import run_embed
    from pipeline.runs.settings import EmbedJob

    job = EmbedJob(
        catalog=str(catalog),
        output=str(out),
        checkpoint="random",
        model_config=str(cfg) if cfg else None,
        layers=LAYERS if cfg is None else (1, 3),
        precision=precision,
        batch_size=batch,
        decode_cpus=decode_cpus,
    )
    with GpuSampler(0) as sampler:
        t0 = time.perf_counter()
        report = run_embed(job, progress=False)
        wall = time.perf_counter() - t0
    ray.shutdown()
    return {
        "decode_cpus": decode_cpus,
        "status": report.status,
        "audio_s": report.audio_s,
        "wall_s": wall,
        "xrt": report.audio_s / wall,
        "gpu_busy_nvidia_smi": sampler.busy(),
        # the model actor's seconds inside model calls / the streaming pass's wall seconds
        "model_actor_busy": report.stage_s.get("model_worker", 0.0)
        / max(1e-9, report.stage_s.get("decode+model", 0.0)),
        "stage_s": report.stage_s,
    }


# --------------------------------------------------------------------------- main


def _table(headers: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w[i]) for i, h in enumerate(headers)), "  ".join("-" * x for x in w)]
    return "\n".join(lines + ["  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in rows])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--precisions", default="fp32,bf16,fp16")
    ap.add_argument("--batches", default="8,32,64")
    ap.add_argument("--seconds", type=float, default=30.0, help="window length (default 30)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--decode-cpus", default="4,8,15", help="decode actor counts for the pipeline runs")
    ap.add_argument("--tracks", type=int, default=1200, help="catalog rows for the pipeline runs")
    ap.add_argument("--track-s", type=float, default=120.0, help="seconds per track (default 120)")
    ap.add_argument("--no-pipeline", action="store_true", help="skip the Ray pipeline runs")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense peak for MFU (default: table)")
    ap.add_argument("--work-dir", type=Path, default=None, help="audio and stores (default: a temp dir)")
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU: run every path on the CPU at toy sizes")
    ap.add_argument("--json", type=Path, default=None, metavar="OUT")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
        args.decode_cpus = [int(d) for d in args.decode_cpus.split(",") if d.strip()]
    except ValueError as e:
        ap.error(str(e))
    if set(args.precisions) - {"fp32", "bf16", "fp16"}:
        ap.error(f"--precisions: expected a subset of fp32,bf16,fp16, got {args.precisions}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        fail(
            f"no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "run this on a GPU machine, or --cpu-smoke to check the script on a CPU"
        )
    from bench.flops import count_flops
    from musicfm import MusicFM25Hz, MusicFMConfig
    from pipeline.engine.device import compile_model, describe, sdpa_backends

    cfg_path = None
    if args.cpu_smoke:
        from tools.testkit.paths import require_shared

        cfg_path = require_shared() / "golden" / "config.json"
        args.precisions = [p for p in args.precisions if p != "fp16"]
        args.batches, args.seconds, args.repeats = [2], 2.0, 1
        args.decode_cpus, args.tracks, args.track_s = [1], 4, 4.0
        args.no_compile = True  # inductor needs minutes on a CPU; tests/flow/test_device.py covers it
        device = torch.device("cpu")
    else:
        device = torch.device("cuda")
    cfg = MusicFMConfig.from_json(cfg_path) if cfg_path else MusicFMConfig()
    model = MusicFM25Hz(cfg, seed=0).to(device).eval()
    name = describe(device)
    flops = count_flops(model, args.seconds)
    fps = flops["flops_per_window"] / args.seconds  # FLOP per audio second
    res: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "gflop_per_audio_s": fps / 1e9,
        "seconds": args.seconds,
        "model_only": [],
        "sdpa": {},
    }
    print(
        f"{name} | torch {torch.__version__} | {fps / 1e9:.2f} GFLOP per audio second (counted, {args.seconds:g} s)"
    )
    for p in args.precisions:
        res["sdpa"][p] = sorted(sdpa_backends(model, p))
        print(f"  SDPA kernels at {p}: {', '.join(res['sdpa'][p]) or 'none seen'}", flush=True)

    variants = [False] if args.no_compile else [False, True]
    for compiled in variants:
        m = model
        if compiled:
            m = MusicFM25Hz(cfg, seed=0).to(device).eval()
            compile_model(m)
        for p in args.precisions:
            for b in args.batches:
                try:
                    r = model_only(m, p, b, args.seconds, args.repeats)
                except torch.OutOfMemoryError:
                    r = {
                        "median_s": float("nan"),
                        "xrt": float("nan"),
                        "peak_mb": float("nan"),
                        "first_call_s": 0,
                    }
                    torch.cuda.empty_cache()
                peak = peak_tflops(name, p, args.peak_tflops)
                r.update(precision=p, batch=b, compiled=compiled)
                r["mfu"] = r["xrt"] * fps / (peak * 1e12) if peak else None
                res["model_only"].append(r)
                print(
                    f"  {p} batch {b} {'compiled' if compiled else 'eager'}: {r['xrt']:.0f}x realtime",
                    flush=True,
                )
    print(
        f"\nModel only, one device ({args.seconds:g} s windows, layers {layers_for(model)} pooled, median of repeats)"
    )
    print(
        _table(
            ["precision", "batch", "compile", "s/call", "x realtime", "MFU", "peak MB", "1st call s"],
            [
                [
                    r["precision"],
                    str(r["batch"]),
                    "yes" if r["compiled"] else "no",
                    f"{r['median_s']:.3f}",
                    f"{r['xrt']:.0f}",
                    "-" if r["mfu"] is None else f"{r['mfu'] * 100:.1f} %",
                    f"{r['peak_mb']:.0f}",
                    f"{r['first_call_s']:.1f}",
                ]  # fmt: skip
                for r in res["model_only"]
            ],
        )
    )

    best_p = "bf16" if "bf16" in args.precisions else args.precisions[0]
    windows = 4 * max(args.batches)
    e = embedder_path(model, best_p, args.seconds, windows, None)
    ref = model_only(model, best_p, e["batch"], args.seconds, args.repeats)
    res["embedder"] = {**e, "model_only_xrt": ref["xrt"]}
    print(
        f"\nWindowEmbedder ({best_p}, host windows, overlapped copies): batch {e['batch']} picked from memory, "
        f"{e['xrt']:.0f}x realtime vs model-only {ref['xrt']:.0f}x at that batch "
        f"({e['xrt'] / ref['xrt']:.2f}); device busy {e['device_busy'] * 100:.0f} % of the wall time"
    )

    if not args.no_pipeline:
        work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu-bench-"))
        cat = make_catalog(work / "audio", args.tracks, args.track_s)
        res["pipeline"] = []
        for n in args.decode_cpus:
            r = pipeline_run(
                cat, work / f"store_{n}", n, best_p, e["batch"] if not args.cpu_smoke else 2, cfg_path
            )
            res["pipeline"].append(r)
            busy = r["gpu_busy_nvidia_smi"]
            print(
                f"  pipeline, {n} decode CPUs: {r['status']}, {r['audio_s'] / 3600:.2f} h in {r['wall_s']:.1f} s = "
                f"{r['xrt']:.0f}x realtime, GPU busy {'-' if busy is None else f'{busy * 100:.0f} %'} (nvidia-smi), "
                f"model actor busy {r['model_actor_busy'] * 100:.0f} % of the streaming pass; "
                f"stages {json.dumps({k: round(v, 1) for k, v in r['stage_s'].items()})}",
                flush=True,
            )
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
