#!/usr/bin/env python
"""Benchmark of the evaluation harness (probe mode) on a rendered set: per task, wall time, the
share of time in feature extraction (the embed job) vs reading + probing + scoring, and the
driver's peak memory; every layer swept in one pass.

    python bench/evaluate.py                          # 1,000 rendered tracks over the five tasks
    python bench/evaluate.py --n 40 --tasks beat,genre --json out.json
    python bench/evaluate.py --quick                  # CI smoke: 8 tracks each for beat and genre

The tracks are MIDI rendered by fluidsynth with FluidR3_GM (tools/testkit/render.py): drums for
beat, triad progressions for chord and key, sections for structure, instrument phrases for genre
(tagging uses the genre store). The model is the small golden config with its random weights
(``--model-config`` / ``--checkpoint`` for others). Ray is started once before the timings.
Fine-tuning throughput is measured by the fine-tuning benchmark, not here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.testkit.render import drum_set, section_set, timbre_set, triad_set  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
#: task -> (rendered set, its share of the tracks)
SETS = {
    "beat": "drums",
    "chord": "triads",
    "key": "triads",
    "structure": "sections",
    "genre": "timbre",
    "tagging": "timbre",
}


def render_sets(root: Path, tasks: list[str], n: int) -> dict[str, Path]:
    """Render the sets the tasks need, ``n`` tracks split evenly over the distinct sets."""
    names = sorted({SETS[t] for t in tasks})
    per = max(8, n // len(names))
    out = {}
    for name in names:
        folder = root / name
        if name == "drums":
            drum_set(folder, n=per)
        elif name == "triads":
            triad_set(folder, n=per)
        elif name == "sections":
            section_set(folder, n=per)
        else:
            _, out["timbre_tags"] = timbre_set(folder, n=per)
        out[name] = folder
    return out


def run_task(task: str, data: dict[str, Path], work: Path, args: argparse.Namespace) -> dict:
    from pipeline.commands.evaluate import build_spec, evaluate_parser
    from pipeline.evaluate.runner import run_evaluation

    dataset = data["timbre_tags"] if task == "tagging" else data[SETS[task]]
    store = str(work / "genre" / "features") if task == "tagging" else None
    argv = ["--task", task, "--dataset", str(dataset), "--output", str(work / task), "--model-config", args.model_config,
            "--precision", "fp32", "--max-epochs", str(args.max_epochs), "--bootstrap", "200", "--no-progress"]  # fmt: skip
    if args.stats:
        argv += ["--stats", args.stats]
    ns = evaluate_parser().parse_args(argv)
    spec = build_spec(ns, ns.output, None if store else args.checkpoint, store)
    t0 = time.perf_counter()
    res, _ = run_evaluation(spec)
    wall = time.perf_counter() - t0
    st = res["stage_s"]
    feat = st.get("features", 0.0)
    probe = st.get("read", 0.0) + st.get("probe_and_score", 0.0)
    return {"task": task, "tracks": res["dataset"]["tracks"], "layers": len(res["layers"]) - 1, "wall_s": round(wall, 2),
            "features_s": round(feat, 2), "probe_s": round(probe, 2), "features_share": round(feat / wall, 3),
            "probe_share": round(probe / wall, 3), "best_layer": res["best_layer"], "primary": res["primary_metric"],
            "best": res["layers"][res["best_layer"]]["metrics"][res["primary_metric"]] if res["best_layer"] else None}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="rendered tracks in all (split over the sets)")
    p.add_argument("--tasks", default="beat,chord,key,structure,genre,tagging")
    p.add_argument("--quick", action="store_true", help="8 tracks each, beat and genre (CI smoke)")
    p.add_argument("--checkpoint", default=str(GOLDEN / "checkpoint.pt"))
    p.add_argument("--stats", default=str(GOLDEN / "stats.json"))
    p.add_argument("--model-config", default=str(GOLDEN / "config.json"))
    p.add_argument("--max-epochs", type=int, default=50)
    p.add_argument("--workdir", help="keep the rendered set and outputs here (default: a temp dir)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--table", help="write the Table-1 style Markdown of all tasks (every layer) here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = ["beat", "genre"] if args.quick else [t.strip() for t in args.tasks.split(",") if t.strip()]
    if "tagging" in tasks and "genre" not in tasks:
        tasks.insert(tasks.index("tagging"), "genre")  # tagging reads the genre store
    n = 16 if args.quick else args.n
    import ray

    from pipeline.flow.runtime import ensure_ray

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        t0 = time.perf_counter()
        data = render_sets(work / "audio", tasks, n)
        render_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ensure_ray()
        ray_s = time.perf_counter() - t0
        rows = [run_task(t, data, work / "runs", args) for t in tasks]
        ray.shutdown()
        if args.table:
            from pipeline.evaluate.report import table1

            results = [json.loads((work / "runs" / t / "results.json").read_text()) for t in tasks]
            Path(args.table).write_text(table1(results) + "\n")
    out = {"config": {"tasks": tasks, "n": n, "quick": args.quick, "model_config": args.model_config,
                      "cpus": os.cpu_count(), "max_epochs": args.max_epochs},
           "render_s": round(render_s, 2), "ray_init_s": round(ray_s, 2), "tasks": rows,
           "peak_rss_mb_driver": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # fmt: skip
    print(f"{'task':<10}{'tracks':>7}{'wall s':>9}{'features':>10}{'probe':>8}  best")
    for r in rows:
        print(f"{r['task']:<10}{r['tracks']:>7}{r['wall_s']:>9.1f}{r['features_share']:>9.0%}{r['probe_share']:>8.0%}  "
              f"{r['best_layer']} {r['primary']} {r['best']}")  # fmt: skip
    print(
        f"driver peak RSS {out['peak_rss_mb_driver']} MB; render {out['render_s']} s; ray init {out['ray_init_s']} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
