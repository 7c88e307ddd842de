"""Benchmark: near-duplicates, probe training and the catalog map on large synthetic stores.

Usage (from the repo root)::

    python bench/intelligence.py                     # 200k duplicates, 100k probe rows, 1M map
    python bench/intelligence.py --dup-tracks 50000 --dim 128 --map-rows 200000 --json out.json
    python bench/intelligence.py --quick             # smoke-test size

Each part runs in its own subprocess (so ``peak_rss`` is that part's own peak, from
``getrusage``) on a store written with the pipeline's schemas (``tracks_table``) in fragments of
``--rows-per-file`` rows:

1. **Duplicates** (``find_duplicates``, default criterion, track level): ``--dup-tracks``
   clustered unit vectors (``clustered_vectors``, spread 0.6: tracks of a cluster at cosine ~0.7)
   with planted near-copies (pairs and groups of 3-5, cosine to the source 0.995-0.9999) and, to
   test precision, planted *related* tracks that are not copies (cosine ~0.97 to a track: a
   remix, a live version). Prints precision and recall of the planted pairs (a planted pair is
   found when both tracks end in one group; a found pair is right when both are in one planted
   group) and wall time. Goal: both >= 0.95.
2. **Probe**: ``train_probe`` on ``--probe-rows`` rows x 2 layers (MLP head, multiclass, 10
   classes whose labels follow the clusters of the second layer): wall time, epochs, accuracy.
4. **Probe curve** (``--parts probe_curve``): probe accuracy against the number of labels
   (``--probe-sizes``, default 20, 50, 100, 500, 5,000) for both estimators of
   ``pipeline.insights.probe_models.fit_probe`` (``linear`` and ``mlp``, forced), scored on
   ``--probe-test`` fresh rows of the same distribution, beside the majority class and
   scikit-learn's ``LogisticRegressionCV`` on the same standardised vectors; and, for the
   sizes below the linear threshold, the default protocol's cross-validated estimate with its
   interval against that true accuracy. Data: 10 classes of Zipf-like frequency, each a mixture of
   3 sub-clusters in ``--probe-dim`` dimensions (so the boundaries are not linear), 2 layers (the
   second a noisier copy of the first); ``--probe-repeats`` draws of the labelled rows per size.
3. **Map**: ``catalog_map`` of ``--map-rows`` rows (fit on 50k, placed fragment group by
   fragment group in this process): wall time per stage and peak memory.
5. **Crops** (real audio): the 12 shared clips plus crops of ``--crop-sources`` of them at each
   of ``--crop-fractions`` of their length (start / end / both sides, off the window grid) and
   a copy of each behind a lead-in, embedded with the golden model (hop = window =
   ``--crop-window``): recall by crop length, false merges between distinct clips and offset
   errors, with window alignment (the default) and with track vectors alone, layers 1 and 3.

Not in CI. On a shared machine, check ``uptime`` first: the figures scale with the free cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from any directory
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def write_tracks(
    root: str,
    vectors: dict[int, np.ndarray],
    ids: list[str],
    rows_per_file: int,
    perm: np.ndarray | None = None,
) -> None:
    """Tracks ``ids`` with their vectors (row ``perm[i]`` for the i-th track when given)."""
    import lance

    from pipeline.search.synthetic import tracks_table

    n = len(ids)
    for s in range(0, n, rows_per_file):
        e = min(n, s + rows_per_file)
        meta = {
            "title": [f"Title {i}" for i in range(s, e)],
            "artist": [f"Artist {i % 97}" for i in range(s, e)],
        }
        rows = slice(s, e) if perm is None else perm[s:e]
        tbl = tracks_table(ids[s:e], {k: v[rows] for k, v in vectors.items()}, meta)
        lance.write_dataset(tbl, f"{root}/tracks.lance", mode="append" if s else "create")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) / 1024.0


def tree_pss_mb(pid: int) -> float:
    """Memory of a process and all its descendants (Ray's GCS, raylet and workers included):
    the sum of their proportional set sizes (shared pages counted once in all), from /proc."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    total, todo = 0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        todo += kids.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
            with open(f"/proc/{p}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()
            CPU_SEEN[p] = max(CPU_SEEN.get(p, 0.0), (int(st[11]) + int(st[12])) / tick)
        except (OSError, ValueError, IndexError):
            pass
    return total / 1024.0


CPU_SEEN: dict[int, float] = {}  # pid -> CPU seconds (user + system) last seen by tree_pss_mb


def run_watched(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, list[float]]:
    """Run ``cmd``; (result, peak memory of its process tree in MB, load averages 1 min seen)."""
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, loads, done = [0.0], [], threading.Event()

    def watch() -> None:
        while not done.wait(1.0):
            peak[0] = max(peak[0], tree_pss_mb(proc.pid))
            loads.append(os.getloadavg()[0])

    CPU_SEEN.clear()
    th = threading.Thread(target=watch, daemon=True)
    th.start()
    out, err = proc.communicate()
    done.set()
    th.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peak[0], loads


# --------------------------------------------------------------------------- parts


def part_duplicates(a: argparse.Namespace, work: str) -> dict:
    from pipeline.insights.duplicates import find_duplicates
    from pipeline.search.synthetic import clustered_vectors

    rng = np.random.default_rng(a.seed)
    n_base = a.dup_tracks
    base = clustered_vectors(n_base, a.dim, clusters=max(10, n_base // 500), spread=0.6, seed=a.seed)
    ids = [f"t{i:07d}" for i in range(n_base)]
    vecs = [base]
    groups: list[set[str]] = []
    n_groups = max(1, n_base // 200)  # 0.5 % of the tracks have copies
    src = rng.choice(n_base, n_groups * 2, replace=False)

    def near(v: np.ndarray, one_minus_cos: float) -> np.ndarray:
        noise = rng.standard_normal(v.shape).astype(np.float32)
        noise -= (noise @ v) * v  # orthogonal to v
        noise /= np.linalg.norm(noise)
        theta = np.arccos(1.0 - one_minus_cos)
        return (np.cos(theta) * v + np.sin(theta) * noise).astype(np.float32)

    extra, extra_ids = [], []
    for j, i in enumerate(src[:n_groups]):
        size = 2 if j % 3 else int(rng.integers(3, 6))
        g = {ids[i]}
        for c in range(size - 1):
            tid = f"copy{j:06d}_{c}"
            extra.append(near(base[i], float(10 ** rng.uniform(-4, np.log10(5e-3)))))
            extra_ids.append(tid)
            g.add(tid)
        groups.append(g)
    for j, i in enumerate(src[n_groups:]):  # related, not copies: cosine ~0.97
        extra.append(near(base[i], 0.03))
        extra_ids.append(f"rel{j:06d}")
    vecs.append(np.stack(extra))
    del base, extra
    x = np.concatenate(vecs)
    del vecs
    all_ids = ids + extra_ids
    perm = rng.permutation(len(all_ids))  # copies spread over the fragments
    all_ids = [all_ids[i] for i in perm]
    root = os.path.join(work, "dup")
    t0 = time.perf_counter()
    write_tracks(root, {12: x}, all_ids, a.rows_per_file, perm=perm)
    t_write = time.perf_counter() - t0
    del x
    rss_store = peak_rss_mb()
    t0 = time.perf_counter()
    index: dict = {"type": None}
    if a.dup_index != "none":
        from pipeline.search.index import build_indexes

        r = build_indexes(root, layers=[12], tables=["tracks"], index_type=a.dup_index.upper())[0]
        index = {"type": r.index_type, "params": r.params, "action": r.action}
    t_index = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    table, rep = find_duplicates(
        root, 12, write=True, use_ray=None if not a.no_ray else False, ann_mode=a.dup_ann
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    found_group: dict[str, str] = {}
    for r in table.to_pylist():
        found_group[r["track_id"]] = found_group[r["match_track_id"]] = r["group_id"]
    planted_of = {t: k for k, g in enumerate(groups) for t in g}
    planted_pairs = [(p, q) for g in groups for p in g for q in g if p < q]
    recall = np.mean(
        [
            found_group.get(p) is not None and found_group.get(p) == found_group.get(q)
            for p, q in planted_pairs
        ]
    )
    members: dict[str, list[str]] = {}
    for t, g in found_group.items():
        members.setdefault(g, []).append(t)
    found_pairs = [(p, q) for m in members.values() for p in m for q in m if p < q]
    precision = (
        np.mean(
            [planted_of.get(p) is not None and planted_of.get(p) == planted_of.get(q) for p, q in found_pairs]
        )
        if found_pairs
        else 0.0
    )
    return {
        "tracks": len(all_ids), "dim": a.dim, "planted_groups": len(groups), "planted_pairs": len(planted_pairs),
        "related_not_copies": n_groups, "found_groups": rep.groups, "found_pairs": len(found_pairs),
        "precision": float(precision), "recall": float(recall), "wall_s": round(wall, 1), "search_s": round(rep.search_s, 1), "driver_cpu_s": round(cpu, 1),
        "write_s": round(t_write, 1), "index": index, "index_s": round(t_index, 1), "method": rep.method,
        "partitions": rep.partitions, "nprobes": rep.nprobes, "ray": rep.ray,
        "gap_ratio_quantiles": {k: round(v, 4) for k, v in rep.gap_ratio_quantiles.items()},
        "peak_rss_mb_after_writing_store": round(rss_store), "peak_rss_mb": round(peak_rss_mb()),
        "goal_met": bool(precision >= 0.95 and recall >= 0.95),
    }  # fmt: skip


def part_probe(a: argparse.Namespace, work: str) -> dict:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    from pipeline.insights.probes import ProbeSettings, train_probe
    from pipeline.search.synthetic import clustered_vectors

    n = a.probe_rows
    rng = np.random.default_rng(a.seed)
    centres = rng.standard_normal((10, a.probe_dim)).astype(np.float32)
    lab = rng.integers(0, 10, n)
    l12 = centres[lab] + 2.0 * rng.standard_normal((n, a.probe_dim)).astype(np.float32)
    l7 = clustered_vectors(n, a.probe_dim, 50, seed=a.seed + 1)
    ids = [f"t{i:07d}" for i in range(n)]
    root = os.path.join(work, "probe")
    write_tracks(root, {7: l7, 12: l12}, ids, a.rows_per_file)
    del l7, l12
    rss_store = peak_rss_mb()
    labels = os.path.join(work, "labels.csv")
    pcsv.write_csv(pa.table({"track_id": ids, "genre": [f"g{v}" for v in lab]}), labels)
    t0, c0 = time.perf_counter(), time.process_time()
    probe = train_probe(
        root, labels, ProbeSettings(task="multiclass", layers=(7, 12), head="mlp"), os.path.join(work, "p")
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    c = probe.card
    return {
        "rows": n, "layers": 2, "dim": a.probe_dim, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "epochs": c["epochs"],
        "s_per_epoch": round(wall / max(1, c["epochs"]), 2), "test": c["metrics"], "layer_weights": c["layer_weights"],
        "threads": c["threads"], "fit_s": c["fit_s"], "peak_rss_mb_after_writing_store": round(rss_store),
        "peak_rss_mb": round(peak_rss_mb()),
    }  # fmt: skip


def curve_rows(n: int, dim: int, seed: int, centres_seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows (n, 2, dim) and labels of the probe-curve task (see the module doc)."""
    classes, subs = 10, 3
    c_rng = np.random.default_rng(centres_seed)  # the task: fixed for every draw
    centres = 3.0 * c_rng.standard_normal((classes, subs, dim)).astype(np.float32) / np.sqrt(2.0)
    freq = 1.0 / np.arange(1, classes + 1) ** 0.7
    rng = np.random.default_rng(seed)
    y = rng.choice(classes, n, p=freq / freq.sum())
    l1 = centres[y, rng.integers(0, subs, n)] + rng.standard_normal((n, dim)).astype(np.float32)
    l0 = l1 + 2.0 * rng.standard_normal((n, dim)).astype(np.float32)
    return np.stack([l0, l1], 1), y


def sklearn_reference(x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray) -> float:
    """scikit-learn's LogisticRegressionCV (L2, balanced, C over the same grid by 5-fold CV) on the
    standardised, concatenated layers: test accuracy."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.insights.probe_settings import C_GRID

    folds = int(min(5, np.bincount(y).max()))
    m = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=list(C_GRID), cv=max(2, folds), class_weight="balanced", max_iter=500))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.fit(x.reshape(len(x), -1), y)
    return float(np.mean(m.predict(xt.reshape(len(xt), -1)) == yt))


def curve_point(a: argparse.Namespace, n: int, rep: int, xt: np.ndarray, yt: np.ndarray) -> dict:
    """Both estimators, the reference and the default protocol's estimate at ``n`` labels."""
    from pipeline.insights.probe_metrics import bootstrap_ci, score
    from pipeline.insights.probe_models import cross_validate, fit_probe
    from pipeline.insights.probe_settings import FitSettings

    x, y = curve_rows(n, a.curve_dim, seed=a.seed + 100 * rep + n)
    row: dict = {"n": n, "repeat": rep, "classes_seen": int(len(np.unique(y)))}
    row["majority"] = float(np.mean(yt == np.bincount(y).argmax()))
    for est in ("linear", "mlp"):
        t0, c0 = time.perf_counter(), time.process_time()
        p = fit_probe(x, y, "multiclass", n_outputs=10, settings=FitSettings(estimator=est, seed=rep))
        row[est] = {"accuracy": float(np.mean(p.predict(xt) == yt)), "fit_s": round(time.perf_counter() - t0, 2),
                    "cpu_s": round(time.process_time() - c0, 2),
                    **({"C": p.info["strength"]} if est == "linear" else {"epochs": p.info["epochs"]})}  # fmt: skip
    if n <= a.probe_sklearn_max:
        t0 = time.perf_counter()
        row["sklearn_logistic_cv"] = {"accuracy": sklearn_reference(x, y, xt, yt), "fit_s": round(time.perf_counter() - t0, 2)}  # fmt: skip
    if n < FitSettings().linear_max_labels:  # what the card would report, against the truth
        cv = cross_validate(x, y, "multiclass", n_outputs=10, settings=FitSettings(seed=rep))
        ok = cv.scored
        row["cv_estimate"] = {"accuracy": score("multiclass", y[ok], cv.oof[ok])["accuracy"],
                              "ci95": bootstrap_ci("multiclass", y[ok], cv.oof[ok], seed=rep)["accuracy"]}  # fmt: skip
    return row


def part_probe_curve(a: argparse.Namespace, work: str) -> dict:
    xt, yt = curve_rows(a.probe_test, a.curve_dim, seed=a.seed + 7)
    rows = []
    for n in [int(v) for v in a.probe_sizes.split(",")]:
        for rep in range(a.probe_repeats):
            rows.append(curve_point(a, n, rep, xt, yt))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    summary = {}
    for n in sorted({r["n"] for r in rows}):
        pts = [r for r in rows if r["n"] == n]
        summary[str(n)] = {
            k: round(float(np.mean([p[k]["accuracy"] if isinstance(p[k], dict) else p[k] for p in pts])), 4)
            for k in ("majority", "linear", "mlp", "sklearn_logistic_cv", "cv_estimate")
            if k in pts[0]
        }
    return {"dim": a.curve_dim, "layers": 2, "classes": 10, "test_rows": a.probe_test,
            "repeats": a.probe_repeats, "mean_accuracy": summary, "points": rows,
            "peak_rss_mb": round(peak_rss_mb())}  # fmt: skip


def part_map(a: argparse.Namespace, work: str) -> dict:
    import lance

    from pipeline.insights.catalog_map import MapSettings, catalog_map
    from pipeline.search.synthetic import tracks_table

    root = os.path.join(work, "map")
    dim = a.map_dim or a.dim
    # written fragment by fragment (the whole matrix is 4 GB at 1M x 1024): 40 clusters as in
    # clustered_vectors, each fragment's labels and noise from its own seeded generator
    rng = np.random.default_rng(a.seed)
    centres = rng.standard_normal((40, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    t0 = time.perf_counter()
    for s in range(0, a.map_rows, a.rows_per_file):
        e = min(a.map_rows, s + a.rows_per_file)
        r = np.random.default_rng([a.seed, s])
        x = centres[r.integers(0, 40, e - s)] + (1.0 / np.sqrt(dim)) * r.standard_normal(
            (e - s, dim), np.float32
        )
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = [f"t{i:07d}" for i in range(s, e)]
        meta = {
            "title": [f"Title {i}" for i in range(s, e)],
            "artist": [f"Artist {i % 97}" for i in range(s, e)],
        }
        lance.write_dataset(
            tracks_table(ids, {12: x}, meta), f"{root}/tracks.lance", mode="append" if s else "create"
        )
        del x
    t_write = time.perf_counter() - t0
    rss_before = peak_rss_mb()
    import pipeline.insights.catalog_map as cm

    group_rss: list[int] = []  # current RSS (MB) after each placed fragment group
    task = cm._map_task

    def watched_task(*args, **kw):
        out = task(*args, **kw)
        group_rss.append(round(rss_now_mb()))
        return out

    cm._map_task = watched_task
    t0, c0 = time.perf_counter(), time.process_time()
    rep = catalog_map(
        root, 12, os.path.join(work, "map_out"), settings=MapSettings(fit_sample=a.fit_sample), use_ray=False
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if a.png_out:
        shutil.copy(rep.png, a.png_out)
    return {
        "rows": a.map_rows, "dim": dim, "fit_sample": a.fit_sample, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "write_store_s": round(t_write, 1),
        "stage_s": {k: round(v, 1) for k, v in rep.stage_s.items()}, "peak_rss_mb_after_writing_store": round(rss_before),
        "peak_rss_mb": round(peak_rss_mb()), "html_mb": round(os.path.getsize(rep.html) / 2**20, 1),
        "rss_mb_after_each_group": group_rss,
    }  # fmt: skip


def _shared_dir() -> str:
    """The shared folder (golden model, audio clips): $MUSICFM_SHARED, ./shared or ../shared."""
    for cand in (
        os.environ.get("MUSICFM_SHARED"),
        os.path.join(ROOT, "shared"),
        os.path.join(ROOT, "..", "shared"),
    ):
        if cand and os.path.isdir(os.path.join(cand, "golden")):
            return os.path.abspath(cand)
    raise SystemExit(
        "intelligence: error: cannot find the shared/ folder (golden model, audio); set MUSICFM_SHARED"
    )


def _crop_store(a: argparse.Namespace, work: str) -> tuple[str, list, list[str]]:
    """The shared clips plus crops of ``--crop-sources`` of them at every ``--crop-fractions``
    (start / end / both sides, off the window grid) and a lead-in copy of each, embedded with
    the golden model (hop = window = ``--crop-window``, loudness -20 dBFS): (store, planted, clips)."""
    import csv
    from pathlib import Path

    from pipeline.runs.embed import run_embed
    from pipeline.runs.settings import EmbedJob
    from tools.testkit.crop_audio import crop_plan, write_copies

    shared = Path(_shared_dir())
    audio = shared / "audio"
    folder = Path(work) / "crops"
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    with open(audio / "catalog.csv", newline="") as f:
        clips = [{k: r[k] for k in ("track_id", "uri", "title", "artist")} for r in csv.DictReader(f)]
    for r in clips:
        shutil.copy(audio / r["uri"], folder / r["uri"])
    ids = [r["track_id"] for r in clips]
    sources = ids[: a.crop_sources]
    fractions = tuple(float(x) for x in a.crop_fractions.split(","))
    rows, planted = write_copies(audio, folder, crop_plan(sources, fractions, seed=a.seed))
    with open(folder / "catalog.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["track_id", "uri", "title", "artist"])
        w.writeheader()
        w.writerows(clips + rows)
    job = EmbedJob(
        catalog=str(folder / "catalog.csv"), output=str(folder / "store"),
        checkpoint=str(shared / "golden" / "checkpoint.pt"), stats=str(shared / "golden" / "stats.json"),
        layers=(1, 3), precision="fp32", window_s=a.crop_window, hop_s=a.crop_window, batch_size=8,
        decode_cpus=2, loudness_target_db=-20.0,
    )  # fmt: skip
    report = run_embed(job, progress=False)
    if report.status != "ok" or report.tracks_failed:
        raise SystemExit(f"intelligence: error: embedding the crops failed: {report}")
    return str(folder / "store"), planted, ids


def _crop_figures(table, planted: list, clips: list[str], window: float) -> dict:
    """Recall by kind and by crop fraction, false merges between distinct clips, offset errors."""
    group: dict[str, str] = {}
    for r in table.to_pylist():
        group[r["track_id"]] = group[r["match_track_id"]] = r["group_id"]
    rows = {frozenset((r["track_id"], r["match_track_id"])): r for r in table.to_pylist()}
    by_frac: dict[str, list[bool]] = {}
    errs = []
    for p in planted:
        key = p.kind if p.kind in ("lead-in", "gain") else f"{p.fraction:.2f}"
        by_frac.setdefault(key, []).append(p.copy_id in group and group.get(p.source) == group[p.copy_id])
        r = rows.get(frozenset((p.copy_id, p.source)))
        if r is not None and r["offset_s"] is not None:
            errs.append(abs(r["offset_s"] - (p.offset_s if r["track_id"] == p.copy_id else -p.offset_s)))
    merged = [
        (x, y) for i, x in enumerate(clips) for y in clips[i + 1 :] if x in group and group.get(y) == group[x]
    ]
    return {
        "recall_by_fraction": {k: round(float(np.mean(v)), 3) for k, v in sorted(by_frac.items())},
        "copies": len(planted), "grouped": int(sum(sum(v) for v in by_frac.values())),
        "false_merges": len(merged), "merged_clips": merged[:10], "pairs": table.num_rows,
        "offset_err_s": {"direct_pairs": len(errs), "max": round(max(errs), 2) if errs else None,
                         "within_half_window": round(float(np.mean(np.array(errs) <= window / 2)), 3) if errs else None},
    }  # fmt: skip


def part_crops(a: argparse.Namespace, work: str) -> dict:
    """Crops of real clips at several lengths and offsets: recall by crop length, with the
    window alignment (default) and with track vectors alone (``align="off"``), per layer."""
    from pipeline.insights.duplicates import Criterion, find_duplicates

    t0 = time.perf_counter()
    store, planted, clips = _crop_store(a, work)
    out: dict = {
        "tracks": len(clips) + len(planted),
        "window_s": a.crop_window,
        "embed_s": round(time.perf_counter() - t0, 1),
    }
    for layer in (1, 3):
        for mode in ("auto", "off"):
            t1 = time.perf_counter()
            table, rep = find_duplicates(
                store, layer, criterion=Criterion(align=mode), write=False, use_ray=False
            )
            fig = _crop_figures(table, planted, clips, a.crop_window)
            fig.update(
                wall_s=round(time.perf_counter() - t1, 2),
                aligned_pairs=rep.aligned,
                align_s=round(rep.align_s, 2),
            )
            out[f"layer{layer}_{'aligned' if mode == 'auto' else 'track_vectors'}"] = fig
    return out  # fmt: skip


PARTS = {
    "duplicates": part_duplicates,
    "probe": part_probe,
    "map": part_map,
    "crops": part_crops,
    "probe_curve": part_probe_curve,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dup-tracks", type=int, default=200_000)
    p.add_argument("--probe-rows", type=int, default=100_000)
    p.add_argument("--probe-dim", type=int, default=1024)
    p.add_argument("--probe-sizes", default="20,50,100,500,5000", help="probe curve: numbers of labels")
    p.add_argument("--curve-dim", type=int, default=256, help="probe curve: vector size")
    p.add_argument("--probe-test", type=int, default=5000, help="probe curve: fresh test rows")
    p.add_argument("--probe-repeats", type=int, default=3, help="probe curve: draws per size")
    p.add_argument(
        "--probe-sklearn-max",
        type=int,
        default=5000,
        help="probe curve: largest n with the sklearn reference",
    )
    p.add_argument("--map-rows", type=int, default=1_000_000)
    p.add_argument("--fit-sample", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=1024, help="vector size of the duplicates and map stores")
    p.add_argument("--map-dim", type=int, default=None, help="vector size of the map store (default: --dim)")
    p.add_argument("--rows-per-file", type=int, default=50_000)
    p.add_argument("--parts", default="duplicates,probe,map,crops")
    p.add_argument("--no-ray", action="store_true", help="duplicates in this process even for large stores")
    p.add_argument(
        "--dup-index", choices=("ivf_pq", "ivf_hnsw_sq", "none"), default="ivf_pq",
        help="index built on the duplicates store first (none: exact search)",
    )  # fmt: skip
    p.add_argument(
        "--dup-ann", choices=("auto", "batched", "lance"), default="auto", help="find_duplicates ann_mode"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--crop-sources", type=int, default=12, help="crops part: clips cropped (of the 12 shared)"
    )
    p.add_argument(
        "--crop-fractions",
        default="0.1,0.2,0.3,0.5,0.8",
        help="crops part: crop lengths (share of the source)",
    )
    p.add_argument("--crop-window", type=float, default=2.5, help="crops part: window = hop (s)")
    p.add_argument("--png-out", default=None, help="copy the map's PNG here")
    p.add_argument("--quick", action="store_true", help="smoke-test size")
    p.add_argument("--json", default=None, help="write all figures to this file")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.quick:
        a.dup_tracks, a.probe_rows, a.map_rows, a.dim, a.probe_dim, a.fit_sample = (
            5000,
            5000,
            20000,
            64,
            64,
            5000,
        )
        a.rows_per_file = 5000
        a.crop_sources, a.crop_fractions = 2, "0.2,0.5"
        a.probe_sizes, a.probe_test, a.probe_repeats, a.probe_sklearn_max = "20,60", 300, 1, 60
        a.curve_dim = 16
    if a.part:
        out = PARTS[a.part](a, a.work)
        print("RESULT " + json.dumps(out))
        return 0
    results = {"load_avg_at_start": os.getloadavg(), "cpus": os.cpu_count()}
    work = tempfile.mkdtemp(prefix="musicfm-bench-intel-")
    try:
        for part in a.parts.split(","):
            given = list(argv if argv is not None else sys.argv[1:])
            sub = [
                x
                for i, x in enumerate(given)
                if not x.startswith("--json") and (i == 0 or given[i - 1] != "--json")
            ]
            cmd = [sys.executable, os.path.abspath(__file__), *sub, "--part", part, "--work", work]
            t0 = time.perf_counter()
            proc, tree_peak, loads = run_watched(cmd)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                results[part] = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
            else:
                results[part] = json.loads(line[-1][7:])
            results[part]["process_s"] = round(time.perf_counter() - t0, 1)
            results[part]["tree_peak_pss_mb"] = round(tree_peak)  # all processes, Ray's included
            # CPU seconds of the part's process tree (sampled each second; the part process
            # itself exactly): independent of how much of the machine other work took
            results[part]["tree_cpu_s"] = round(sum(CPU_SEEN.values()), 1)
            if loads:
                results[part]["load_avg_1min"] = {
                    "min": round(min(loads), 1), "mean": round(sum(loads) / len(loads), 1), "max": round(max(loads), 1)
                }  # fmt: skip
            print(f"{part}: {json.dumps(results[part])}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
