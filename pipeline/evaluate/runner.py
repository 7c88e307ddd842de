"""One evaluation run end to end (:func:`run_evaluation`) and the comparison of two models on the
same dataset and task with a paired bootstrap over tracks (:func:`run_compare`)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.evaluate.datasets import EvalDataset, load_dataset
from pipeline.evaluate.features import FeatureSpec, check_profile, embed_features, read_features
from pipeline.evaluate.harness import Evaluation, evaluate_probe
from pipeline.evaluate.metrics import paired_bootstrap
from pipeline.evaluate.probe import ProbeConfig
from pipeline.evaluate.report import record_run, results_dict, write_outputs
from pipeline.evaluate.tasks import get_task


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate: task, dataset (mirdata name / JAMS folder / catalog), model or store,
    probe settings, where to write."""

    task: str
    dataset: str
    output: str
    features: FeatureSpec
    probe: ProbeConfig = ProbeConfig()
    data_home: str | None = None
    mirdata_version: str | None = None
    label_column: str | None = None
    split_seed: int = 0
    resamples: int = 1000
    progress: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in results.json settings

    def __post_init__(self) -> None:
        get_task(self.task)
        if self.resamples < 10:
            raise ValueError(f"--bootstrap must be >= 10, got {self.resamples}")


def default_layers(model_config: str | None) -> tuple[int, ...]:
    """Every hidden state of the model: 0 (the input to the first block) .. encoder depth."""
    depth = 12
    if model_config:
        with open(model_config) as f:
            depth = int(json.load(f).get("encoder_depth", 12))
    return tuple(range(depth + 1))


def load(spec: EvalSpec) -> EvalDataset:
    """The dataset, read and split; a task its annotations do not match is refused here,
    before any audio is touched."""
    return load_dataset(spec.dataset, get_task(spec.task), data_home=spec.data_home, version=spec.mirdata_version,
                        label_column=spec.label_column, seed=spec.split_seed)  # fmt: skip


def run_evaluation(spec: EvalSpec, ds: EvalDataset | None = None) -> tuple[dict[str, Any], Evaluation]:
    """Dataset -> features through the embed job (or the given store) -> probes -> scores ->
    results.json / results.md / PNG / JAMS under ``spec.output`` and a ``runs.lance`` row."""
    from pipeline.runs.report import new_run_id
    from pipeline.schemas import utc_now

    started, t0, stage_s = utc_now(), time.perf_counter(), {}
    task = get_task(spec.task)
    ds = ds or load(spec)
    stage_s["dataset"] = time.perf_counter() - t0
    fs = spec.features
    embed_report: dict[str, Any] = {}
    if fs.checkpoint:
        t1 = time.perf_counter()
        os.makedirs(spec.output, exist_ok=True)
        embed_report = embed_features(ds, task, fs, spec.output, spec.progress)
        stage_s["features"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    layers = fs.layers
    feats = read_features(fs.store, task, layers, [t.track_id for t in ds.tracks], fs.storage_options)
    if not fs.checkpoint:
        check_profile(fs.store, feats.settings_id, task, fs.storage_options)
    stage_s["read"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    ev = evaluate_probe(ds, task, feats, spec.probe, os.path.join(spec.output, "predictions"), spec.resamples)
    stage_s["probe_and_score"] = time.perf_counter() - t1
    settings = {"probe": dataclasses.asdict(spec.probe), "layers": list(layers), "store": fs.store,
                "checkpoint": fs.checkpoint, "resamples": spec.resamples, "embed": embed_report, **spec.extra}  # fmt: skip
    dataset = {
        "name": ds.name,
        "spec": spec.dataset,
        "split": ds.split_info,
        "tracks": len(ds.tracks),
        "absent": ds.absent,
    }
    res = results_dict(
        ev, dataset, {"model_id": feats.model_id, "settings_id": feats.settings_id}, settings, feats.errors
    )
    run_id = new_run_id()
    res["run_id"] = run_id
    res["outputs"] = write_outputs(spec.output, res)
    res["stage_s"] = stage_s
    record_run(fs.store, fs.storage_options, res, run_id, started, time.perf_counter() - t0, stage_s)
    with open(res["outputs"]["json"], "w") as f:
        json.dump(res, f, indent=1, default=float)
    return res, ev


def run_compare(a: EvalSpec, b: EvalSpec, output: str) -> dict[str, Any]:
    """Evaluate both on the same dataset, task and split; per layer, the paired bootstrap of
    a - b over the test tracks. Writes ``compare.json`` and ``compare.md`` into ``output``."""
    if (a.task, a.dataset, a.split_seed) != (b.task, b.dataset, b.split_seed):
        raise ValueError("compare needs the same task, dataset and split seed for both models")
    ds = load(a)
    res_a, ev_a = run_evaluation(a, ds)
    res_b, ev_b = run_evaluation(b, ds)
    if ev_a.test_ids != ev_b.test_ids:
        raise ValueError(
            "the two models scored different test tracks (a track failed in one of them); see error_rows"
        )
    primary = ev_a.task.primary
    layers = {}
    for head in [h for h in ev_a.heads if h in ev_b.heads]:
        layers[head] = paired_bootstrap(
            ev_a.heads[head].scores, ev_b.heads[head].scores, a.resamples, a.probe.seed
        )
    out = {"task": a.task, "dataset": res_a["dataset"], "a": {"model_id": res_a["model_id"], "output": a.output},
           "b": {"model_id": res_b["model_id"], "output": b.output}, "primary_metric": primary, "layers": layers,
           "verdict": verdict(layers, primary)}  # fmt: skip
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "compare.json"), "w") as f:
        json.dump(out, f, indent=1, default=float)
    with open(os.path.join(output, "compare.md"), "w") as f:
        f.write(compare_markdown(out))
    return out


def verdict(layers: dict[str, dict], primary: str) -> dict[str, str]:
    """Per layer: which model is better on the primary metric, by how much, with the interval
    ("no clear difference" when the interval holds 0)."""
    out = {}
    for head, m in layers.items():
        d = m[primary]
        lo, hi = d["ci"]
        who = "a" if lo > 0 else "b" if hi < 0 else "no clear difference"
        out[head] = f"{who}: {primary} a - b = {d['diff']:+.4f} (95% CI {lo:+.4f} .. {hi:+.4f})"
    return out


def compare_markdown(out: dict[str, Any]) -> str:
    p = out["primary_metric"]
    lines = [f"# {out['task']} on {out['dataset']['name']}: a = {out['a']['model_id']}, b = {out['b']['model_id']}",
             "", f"Paired bootstrap over the {out['dataset']['split_sizes_scored']['test']} test tracks; {p}.", "",
             "| Layer | a | b | a - b | 95% CI | P(a better) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for head, m in out["layers"].items():
        d = m[p]
        lines.append(f"| {head} | {d['a']:.4f} | {d['b']:.4f} | {d['diff']:+.4f} | "
                     f"{d['ci'][0]:+.4f} .. {d['ci'][1]:+.4f} | {d['p_a_better']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"
