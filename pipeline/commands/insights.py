"""Flags and one-line error handling of ``jobs/find_duplicates.py``, ``jobs/train_probe.py``,
``jobs/predict.py`` and ``jobs/catalog_map.py``.

Exit codes: 0 ok; 2 bad flags or a request the store refuses (unknown layer or column, missing
store, wrong model for a probe, unusable labels), as one line ``<prog>: error: ...`` on stderr
without a traceback; 1 anything else (also one line).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from pipeline.cli import add_setting, add_store_args, given, layers_arg, number_arg, positive_int
from pipeline.commands.search import OneLineArgumentParser
from pipeline.errors import SearchError, one_line, redact

__all__ = [
    "duplicates_parser",
    "map_parser",
    "predict_parser",
    "probe_parser",
    "find_duplicates_main",
    "catalog_map_main",
    "predict_main",
    "train_probe_main",
]

RAY_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class InsightRun:
    """How an insight job runs beside what it computes (each default is the knob's one):
    ``ray`` (auto: Ray tasks for large stores), and for find_duplicates the ``level`` and the
    ``ann`` search, for catalog_map the ``out`` directory."""

    ray: str = "auto"
    level: str = "track"
    ann: str = "auto"
    out: str = "."


def _add_ray(p: argparse.ArgumentParser) -> None:
    add_setting(p, "--ray", settings=InsightRun, choices=RAY_MODES, stated=False,
                help="Ray tasks (auto: large stores)")  # fmt: skip


cosine_arg = number_arg(float, lambda v: -1.0 <= v <= 1.0, "a cosine similarity in [-1, 1]")
margin_arg = number_arg(float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)")


def _layer_arg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer index, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a layer index >= 0, got {text!r}")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    add_store_args(p)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def _run(prog: str, fn: Callable[[], Any], out: TextIO | None, err: TextIO | None, as_json: bool) -> int:
    """Run ``fn`` (returns a report with ``summary()``) and print it; errors as one line."""
    from pipeline.insights.predict import ProbeMismatchError
    from pipeline.insights.probes import LabelError

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        report = fn()
    except (SearchError, LabelError, ProbeMismatchError, ValueError, FileNotFoundError) as e:
        err.write(f"{prog}: error: {one_line(redact(str(e))) or type(e).__name__}\n")
        return 2
    except Exception as e:  # noqa: BLE001 - one line, no traceback, for any failure
        err.write(f"{prog}: error: {one_line(redact(str(e))) or type(e).__name__}\n")
        return 1
    if as_json:
        out.write(json.dumps(report if isinstance(report, dict) else report.__dict__, default=str) + "\n")
    else:
        out.write((report["summary"] if isinstance(report, dict) else report.summary()) + "\n")
    return 0


def _layer_or_highest(args: argparse.Namespace) -> int:
    """``--layer``, or the highest layer the store holds when it is not given."""
    if args.layer is not None:
        return int(args.layer)
    from pipeline.search.reader import open_store

    layers = open_store(args.store, args.storage_options).layers
    if not layers:
        raise ValueError("the store has no vector layers")
    return max(layers)


# --------------------------------------------------------------------------- duplicates


def duplicates_parser() -> argparse.ArgumentParser:
    from pipeline.insights.duplicates import Criterion

    p = OneLineArgumentParser(
        prog="find_duplicates",
        description="Group the tracks of a store that are the same recording (near-duplicates).",
        settings=(Criterion, InsightRun),
    )
    _common(p)
    p.add_argument("--layer", type=_layer_arg, default=None, help="layer to compare (default: the highest)")
    add_setting(p, "--level", settings=InsightRun, choices=("track", "window"), stated=False,
                help="compare tracks or windows")  # fmt: skip
    add_setting(p, "--threshold", settings=Criterion, type=cosine_arg, stated=False,
                help="absolute cosine cut instead of the calibrated default")  # fmt: skip
    add_setting(p, "--margin", settings=Criterion, type=margin_arg, default=None,
                help="default criterion: a match is at most MARGIN times the distance of the track's nearest "
                "non-match")  # fmt: skip
    add_setting(p, "--align", settings=Criterion, choices=("auto", "on", "off"), stated=False,
                help="track level: confirm candidates by aligning their windows at one offset (auto: when "
                "windows.lance has the layer; off: track vectors alone)")  # fmt: skip
    add_setting(p, "--align-margin", settings=Criterion, type=margin_arg, default=None,
                help="aligned: a match is at most ALIGN_MARGIN times the aligned distance of the track's "
                "nearest non-match")  # fmt: skip
    add_setting(p, "-k", settings=Criterion, type=positive_int, default=None, help="neighbours per track")
    add_setting(p, "--min-windows", settings=Criterion, type=positive_int, default=None,
                help="window level: windows per match")  # fmt: skip
    p.add_argument("--incremental", action="store_true", help="query only tracks embedded since the last run")
    p.add_argument(
        "--no-index", action="store_true", help="exact search even when the layer has an ANN index"
    )
    add_setting(p, "--ann", settings=InsightRun, choices=("auto", "batched", "lance"), stated=False,
                help="indexed layer: batched search of the index's IVF partitions, or one Lance query per "
                "track (auto: batched while the vectors fit in 4 GiB)")  # fmt: skip
    _add_ray(p)
    return p


def _use_ray(v: str) -> bool | None:
    return None if v == "auto" else v == "on"


def find_duplicates_main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    from pipeline.insights.duplicates import Criterion, find_duplicates

    args = duplicates_parser().parse_args(argv)

    def go() -> Any:
        crit = Criterion(**given(args, "margin", "threshold", "min_windows", "align", "align_margin"))
        crit = dataclasses.replace(crit, k=max(2, args.k or crit.k))
        layer = _layer_or_highest(args)
        _, report = find_duplicates(
            args.store, layer, args.level, crit, args.storage_options, incremental=args.incremental,
            use_ray=_use_ray(args.ray), use_index=not args.no_index, ann_mode=args.ann,
        )  # fmt: skip
        return report

    return _run("find_duplicates", go, out, err, args.json)


# --------------------------------------------------------------------------- probes


def probe_parser() -> argparse.ArgumentParser:
    from pipeline.insights.probe_settings import LINEAR_MAX_LABELS
    from pipeline.insights.probes import ESTIMATORS, HEADS, TASKS, ProbeSettings

    p = OneLineArgumentParser(
        prog="train_probe", description="Train a probe on a store's layer vectors.", settings=(ProbeSettings,)
    )
    _common(p)
    p.add_argument("--labels", required=True, help="CSV / Parquet / JSON-lines file with track_id and labels")
    p.add_argument("--layers", type=layers_arg, required=True, help="layers to weight, e.g. 7,12")
    p.add_argument("--task", choices=TASKS, required=True, help="multiclass, multilabel or regression")
    p.add_argument("--out", required=True, help="directory for probe.safetensors and probe.json")
    p.add_argument("--label-column", action="append", default=None, help="label column(s) (default: all)")
    p.add_argument("--name", default=None, help="probe name, used in the tag_<name> columns")
    add_setting(
        p, "--estimator", settings=ProbeSettings, choices=ESTIMATORS,
        help=f"auto: the L2-regularised linear model (strength by cross-validation) below "
        f"{LINEAR_MAX_LABELS} labelled tracks, else the MLP; linear or mlp force one",
    )  # fmt: skip
    add_setting(
        p, "--head", settings=ProbeSettings, choices=HEADS,
        help="the MLP's head: mlp (512 units, dropout 0.2) or linear (no hidden layer)",
    )  # fmt: skip
    add_setting(p, "--folds", settings=ProbeSettings, type=positive_int, help="cross-validation folds")
    add_setting(p, "--level", settings=ProbeSettings, choices=("track", "window"),
                help="train on track or window vectors")  # fmt: skip
    add_setting(p, "--seed", settings=ProbeSettings, type=int, help="seed of the splits and the weights")
    add_setting(p, "--max-epochs", settings=ProbeSettings, type=positive_int, help="most epochs")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    add_setting(
        p, "--threads", settings=ProbeSettings, type=positive_int, stated=False,
        help="torch CPU threads (default: 1 for small sets, else the cores the load leaves free)",
    )  # fmt: skip
    return p


def train_probe_main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    from pipeline.insights.probes import ProbeSettings, train_probe

    args = probe_parser().parse_args(argv)

    def go() -> Any:
        s = ProbeSettings(task=args.task, layers=tuple(args.layers), estimator=args.estimator, head=args.head,
                          level=args.level, seed=args.seed, max_epochs=args.max_epochs, threads=args.threads,
                          folds=max(2, args.folds))  # fmt: skip
        probe = train_probe(args.store, args.labels, s, args.out, name=args.name, label_columns=args.label_column,
                            storage_options=args.storage_options, device=args.device)  # fmt: skip
        c = probe.card
        ci = c["metrics_ci95"]
        m = ", ".join(
            f"{k} {v:.3f}" + (f" [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" if k in ci else "")
            for k, v in c["metrics"].items()
            if isinstance(v, float)
        )
        base = ", ".join(f"{k} {v:.3f}" for k, v in c["metrics_majority"].items() if isinstance(v, float))
        w = ", ".join(f"{k}: {v:.2f}" for k, v in c["layer_weights"].items())
        strength = "alpha" if c["task"] == "regression" else "C"
        fitted = f"{strength} {c['strength']:g}" if c["estimator"] == "linear" else f"{c['epochs']} epochs"
        summary = (
            f"probe {c['name']} ({c['task']}, {c['estimator']}, {c['level']} level, {c['labelled_tracks']} "
            f"labelled tracks) -> {args.out}: {m} ({c['evaluation']['protocol']}; majority class: {base}); "
            f"layer weights {w}; {fitted}, {c['train_s']:.1f} s"
            + (f"; {c['notes'][0]}" if c["notes"] else "")
        )
        return {"summary": summary, **c}

    return _run("train_probe", go, out, err, args.json)


def predict_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="predict", description="Write a probe's predictions into tracks columns.", settings=(InsightRun,)
    )
    _common(p)
    p.add_argument("--probe", required=True, help="probe directory written by train_probe")
    p.add_argument("--run-id", default=None, help="only the tracks of this run (e.g. a refresh's)")
    _add_ray(p)
    return p


def predict_main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    from pipeline.insights.predict import predict_store

    args = predict_parser().parse_args(argv)
    return _run(
        "predict",
        lambda: predict_store(
            args.store, args.probe, args.storage_options, run_id=args.run_id, use_ray=_use_ray(args.ray)
        ),
        out,
        err,
        args.json,
    )


# --------------------------------------------------------------------------- map


def map_parser() -> argparse.ArgumentParser:
    from pipeline.insights.catalog_map import MapSettings

    p = OneLineArgumentParser(
        prog="catalog_map",
        description="A 2-D map of the catalog (PCA + UMAP).",
        settings=(MapSettings, InsightRun),
    )
    _common(p)
    p.add_argument("--layer", type=_layer_arg, default=None, help="layer to map (default: the highest)")
    p.add_argument("--color-by", default=None, help="tracks column to colour by (metadata or tag_...)")
    add_setting(p, "--out", settings=InsightRun, help="directory for catalog_map.html and catalog_map.png")
    add_setting(
        p, "--fit-sample", settings=MapSettings, type=positive_int, help="tracks the map is fitted on"
    )
    add_setting(p, "--plot-max", settings=MapSettings, type=positive_int, help="most points in the HTML page")
    add_setting(p, "--seed", settings=MapSettings, type=int, help="seed of the sample and of UMAP")
    _add_ray(p)
    return p


def catalog_map_main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    from pipeline.insights.catalog_map import MapSettings, catalog_map

    args = map_parser().parse_args(argv)

    def go() -> Any:
        layer = _layer_or_highest(args)
        s = MapSettings(seed=args.seed, fit_sample=args.fit_sample, plot_max=args.plot_max)
        return catalog_map(
            args.store, layer, args.out, args.color_by, args.storage_options, s, use_ray=_use_ray(args.ray)
        )

    return _run("catalog_map", go, out, err, args.json)
