"""Fine-tuning throughput on Ray Train: audio seconds through the model (forward + backward +
optimizer step) per second of the training loop, per data-parallel worker.

    python bench/finetune.py                          # small model, 2 CPU workers, 12 clips
    python bench/finetune.py --model full --steps 6   # released size (random weights), slow on CPU
    python bench/finetune.py --use-gpu --workers 1 --model full --batch-size 16   # on a GPU node
    python bench/finetune.py --quick --json out.json  # smoke test (CI)

The training set is the shared real clips (``shared/audio/clips``) with synthetic labels, decoded
by the embed job's decode stage, as :func:`pipeline.evaluate.finetune.run_finetune` reads them.
The rate counts the whole training loop of each worker (waiting for decoded windows, the step,
the all-reduce of gradients and loss, checkpoint writes), not Ray start-up, model load or the
export at the end; ``wall_s`` is the whole call. Each CPU worker reserves one CPU (Ray gives it
one torch thread). Random weights: throughput does not depend on them. Ray: ``RAY_ADDRESS`` or a
local cluster started here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _shared() -> Path:
    for cand in (os.environ.get("MUSICFM_SHARED"), REPO / "shared", REPO.parent / "shared"):
        if cand and (Path(cand) / "golden").is_dir():
            return Path(cand)
    raise SystemExit("cannot find shared/ (golden model, clips); set MUSICFM_SHARED")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("small", "full"), default="small",
                    help="small: shared/golden/config.json (D=48, 3 layers); full: the released size")  # fmt: skip
    ap.add_argument("--workers", type=int, default=2, help="data-parallel workers")
    ap.add_argument("--use-gpu", action="store_true", help="one GPU per worker (bf16 autocast)")
    ap.add_argument("--clips", type=int, default=0, help="shared clips used (0: all)")
    ap.add_argument("--window-s", type=float, default=10.0)
    ap.add_argument("--batch-size", type=int, default=4, help="windows per worker per step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layer", type=int, default=None, help="hidden state of the head (default: the last)")
    ap.add_argument(
        "--cache-decoded", action="store_true", help="decode once, keep windows in the object store"
    )
    ap.add_argument("--quick", action="store_true", help="smoke size: 4 clips, 2 s windows, batch 2, 4 steps")
    ap.add_argument("--json", help="write every figure to this file")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.model, args.clips, args.window_s, args.batch_size, args.steps = "small", 4, 2.0, 2, 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    from pipeline.evaluate.finetune import FinetuneSpec, LabelledTrack, run_finetune

    shared = _shared()
    clips = sorted((shared / "audio" / "clips").iterdir())
    clips = clips[: args.clips] if args.clips else clips
    cfg = str(shared / "golden" / "config.json") if args.model == "small" else None
    layer = args.layer if args.layer is not None else (3 if args.model == "small" else 12)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        # logical CPUs: one per worker and two for decoding, even on a 2-core machine
        cpus = max(os.cpu_count() or 1, args.workers + 2)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)  # fmt: skip
    ray_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="musicfm-bench-ft-") as out:
        spec = FinetuneSpec(
            checkpoint="random:0", stats=None, model_config=cfg,
            train=tuple(LabelledTrack(str(c), i % 2) for i, c in enumerate(clips)), num_classes=2,
            output=out, layer=layer, window_s=args.window_s, batch_size=args.batch_size,
            max_steps=args.steps, checkpoint_every=max(1, args.steps // 2), num_workers=args.workers,
            use_gpu=args.use_gpu, cache_decoded=args.cache_decoded,
        )  # fmt: skip
        t1 = time.perf_counter()
        res = run_finetune(spec)
        wall = time.perf_counter() - t1
    report = {
        "config": {
            "model": args.model,
            "workers": args.workers,
            "use_gpu": args.use_gpu,
            "clips": len(clips),
            "window_s": args.window_s,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "layer": layer,
            "cache_decoded": args.cache_decoded,
            "quick": args.quick,
        },  # fmt: skip
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "load_avg_before": load0,
            "load_avg_after": os.getloadavg(),
        },  # fmt: skip
        "audio_s_per_s_per_worker": res.audio_s_per_s_per_worker,
        "audio_s_trained": res.steps * args.batch_size * args.window_s * args.workers,
        "steps": res.steps,
        "wall_s": wall,
        "ray_init_s": ray_s,
        "loss_first": res.losses[0],
        "loss_last": res.losses[-1],
        "model_id": res.model_id,
    }
    print(
        f"fine-tuning {args.model} model, {args.workers} {'GPU' if args.use_gpu else 'CPU'} workers, "
        f"batch {args.batch_size} x {args.window_s:g} s, {res.steps} steps: "
        f"{res.audio_s_per_s_per_worker:.2f} audio s / s / worker; wall {wall:.1f} s; "
        f"loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f}; load avg {load0[0]:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
