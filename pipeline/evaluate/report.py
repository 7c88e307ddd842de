"""Evaluation outputs: ``results.json`` (task, dataset, splits, model, settings, per-layer
metrics with bootstrap intervals), ``results.md`` (a table in the layout of the MusicFM paper's
Table 1), ``<task>_layers.png`` (metric vs layer), and the run's row in the store's
``runs.lance`` (``kind="evaluate"``)."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from pipeline.evaluate.harness import Evaluation

#: Table 1 columns of the MusicFM paper (plus genre): (task, metric, header).
TABLE1 = (
    ("beat", "f_measure", "Beat F1"),
    ("downbeat", "f_measure", "Downbeat F1"),
    ("chord", "majmin", "Chord majmin"),
    ("chord", "mirex", "Chord mirex"),
    ("structure", "hr_0.5", "Structure HR.5"),
    ("structure", "hr_3", "Structure HR3"),
    ("key", "weighted_score", "Key weighted"),
    ("tagging", "roc_auc", "Tagging ROC"),
    ("tagging", "average_precision", "Tagging AP"),
    ("genre", "accuracy", "Genre Acc"),
)


def results_dict(ev: Evaluation, dataset: dict[str, Any], model: dict[str, Any], settings: dict[str, Any],
                 errors: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """The content of ``results.json``."""
    primary = ev.task.primary
    layers = {
        name: {"metrics": h.metrics, "ci95": h.ci, "threshold": h.threshold, "best_epoch": h.epochs}
        for name, h in ev.heads.items()
    }
    ranked = [n for n in layers if n != "weighted" and not math.isnan(layers[n]["metrics"][primary])]
    best = max(ranked, key=lambda n: layers[n]["metrics"][primary]) if ranked else None
    return {
        "task": ev.task.name,
        "profile": {
            "window_s": ev.task.profile.window_s,
            "frames_hz": ev.task.frames_hz,
            "level": ev.task.level,
        },
        "dataset": {**dataset, "split_sizes_scored": ev.sizes},
        **model,
        "settings": settings,
        "primary_metric": primary,
        "best_layer": best,
        "layers": layers,
        "layer_weights": ev.layer_weights,
        "test_tracks": ev.test_ids,
        "error_rows": [{"track_id": t, "message": m} for t, m in sorted(errors.items())],
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }


def _cell(res: dict[str, Any], head: str, metric: str) -> str:
    m = res["layers"].get(head, {})
    v = m.get("metrics", {}).get(metric)
    if v is None:
        return ""
    lo, hi = m["ci95"][metric]
    return f"{100 * v:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def table1(results: Sequence[dict[str, Any]], all_layers: bool = True) -> str:
    """A Markdown table in the layout of MusicFM's Table 1: one row per model and layer
    (``all_layers``) or per model at its best layer, one column per task metric present;
    values in percent with their 95 % bootstrap interval."""
    tasks = {r["task"] for r in results}
    cols = [c for c in TABLE1 if c[0] in tasks]
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for r in results:
        heads = list(r["layers"]) if all_layers else [r["best_layer"]]
        for h in heads:
            row = rows.setdefault((r["model_id"], h), {})
            for task, metric, header in cols:
                if task == r["task"]:
                    row[header] = _cell(r, h, metric)
    lines = ["| Model | Layer | " + " | ".join(c[2] for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]  # fmt: skip
    for (model, head), row in rows.items():
        lines.append(f"| {model} | {head} | " + " | ".join(row.get(c[2], "") for c in cols) + " |")
    return "\n".join(lines)


def write_outputs(out_dir: str, res: dict[str, Any]) -> dict[str, str]:
    """results.json, results.md and the metric-vs-layer PNG into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "md": os.path.join(out_dir, "results.md"),
             "png": os.path.join(out_dir, f"{res['task']}_layers.png")}  # fmt: skip
    with open(paths["json"], "w") as f:
        json.dump(res, f, indent=1, default=float)
    ds = res["dataset"]
    head = (f"# {res['task']} on {ds['name']} — {res['model_id']}\n\n"
            f"Split ({ds['split']['source']}): " + ", ".join(f"{k} {v}" for k, v in ds["split_sizes_scored"].items())
            + f" tracks. Best layer by {res['primary_metric']}: {res['best_layer']}. Values in %, 95 % bootstrap "
            "interval over test tracks in brackets.\n\n")  # fmt: skip
    with open(paths["md"], "w") as f:
        f.write(head + table1([res]) + "\n")
    plot_layers(res, paths["png"])
    return paths


def plot_layers(res: dict[str, Any], path: str) -> None:
    """Primary metric (and the others) vs layer with 95 % intervals; the weighted-layers probe as
    a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in res["layers"] if n != "weighted"]
    xs = [int(n.split("_")[1]) for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for metric in res["layers"][names[0]]["metrics"]:
        ys = [res["layers"][n]["metrics"][metric] for n in names]
        lo = [y - res["layers"][n]["ci95"][metric][0] for y, n in zip(ys, names, strict=True)]
        hi = [res["layers"][n]["ci95"][metric][1] - y for y, n in zip(ys, names, strict=True)]
        line = ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=metric)
        if "weighted" in res["layers"]:
            ax.axhline(res["layers"]["weighted"]["metrics"][metric], ls="--", color=line[0].get_color(), lw=1)
    ax.set_xlabel("layer (hidden state)")
    ax.set_ylabel("score")
    ax.set_title(f"{res['task']} on {res['dataset']['name']} ({res['model_id']}); dashed: learned layer weights",
                 fontsize=8)  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def record_run(store: str, storage_options: dict | None, res: dict[str, Any], run_id: str,
               started_at: dt.datetime, wall_s: float, stage_s: dict[str, float]) -> int:  # fmt: skip
    """One ``runs.lance`` row with ``kind="evaluate"``; returns the table's new version."""
    import pyarrow as pa

    from pipeline import schemas
    from pipeline.store.commits import append_once
    from pipeline.store.tables import Store

    summary = {k: res[k] for k in ("task", "primary_metric", "best_layer", "layer_weights")}
    summary["dataset"] = res["dataset"]
    summary["metrics"] = {n: v["metrics"] for n, v in res["layers"].items()}
    row = {
        "run_id": run_id, "kind": "evaluate", "status": "ok", "started_at": started_at,
        "finished_at": schemas.utc_now(), "args_json": json.dumps(res["settings"], default=str),
        "model_id": res["model_id"], "settings_id": res["settings_id"],
        "tracks_ok": sum(res["dataset"]["split_sizes_scored"].values()), "tracks_failed": len(res["error_rows"]),
        "windows": 0, "audio_hours": 0.0, "wall_s": wall_s, "x_realtime": 0.0,
        "stage_times_json": json.dumps(stage_s), "report_json": json.dumps(summary, default=float),
    }  # fmt: skip
    tbl = pa.Table.from_pylist([row], schema=schemas.RUNS_SCHEMA)
    return append_once(Store(store, storage_options, create=False), "runs", tbl, run_id)
