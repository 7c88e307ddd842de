"""``jobs/evaluate.py`` and ``jobs/compare_models.py``: flags and the run, with one-line errors.

    python jobs/evaluate.py --task beat --dataset beatles --data-home ~/mir_datasets/beatles \\
        --checkpoint msd --output eval/beat
    python jobs/evaluate.py --task genre --dataset my_jams_folder/ --store s3://b/store --output eval/genre
    python jobs/compare_models.py --task key --dataset giantsteps_key --data-home ... \\
        --a msd --b finetuned.safetensors --output eval/key_cmp

Exit codes: 0 ok; 1 error (one line on stderr); 2 bad flags or a dataset that cannot serve the task.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from pipeline.cli import OneLineParser, add_setting, positive_int, run_main, storage_options_arg
from pipeline.evaluate.tasks import TASKS

DOC = __doc__


def layer_range(text: str) -> tuple[int, ...]:
    """``--layers``: ``0-12``, ``7``, ``3,7,12`` or mixed (``0-3,7``)."""
    out: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            lo, _, hi = part.partition("-")
            out += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layers like 0-12 or 3,7,12, got {text!r}") from None
    if not out or min(out) < 0 or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative layers, got {text!r}")
    return tuple(out)


def evaluate_settings() -> tuple[type, ...]:
    """The settings dataclasses the evaluate and compare flags set (their defaults are the flags')."""
    from pipeline.evaluate.features import FeatureSpec
    from pipeline.evaluate.finetune_spec import FinetuneSpec
    from pipeline.evaluate.probe import ProbeConfig
    from pipeline.evaluate.runner import EvalSpec

    return EvalSpec, ProbeConfig, FeatureSpec, FinetuneSpec


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    EvalSpec = evaluate_settings()[0]
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--dataset", required=True,
                   help="mirdata dataset name (with --data-home), a folder of audio + <stem>.jams, or a catalog CSV/Parquet")  # fmt: skip
    p.add_argument("--data-home", help="local folder of a mirdata dataset (nothing is downloaded)")
    p.add_argument("--mirdata-version", help="mirdata index version (default: the dataset's default)")
    p.add_argument("--label-column", help="catalog label column (default genre / key / tags)")
    add_setting(p, "--split-seed", settings=EvalSpec, type=int, stated=False,
                help="seed of the split where there is no official one")  # fmt: skip
    p.add_argument("--output", required=True, help="folder for results.json, results.md, the PNG and JAMS")


def add_probe_args(p: argparse.ArgumentParser) -> None:
    EvalSpec, ProbeConfig, FeatureSpec, _ = evaluate_settings()
    g = p.add_argument_group("probe")
    g.add_argument("--layers", type=layer_range, help="hidden states to probe, e.g. 0-12 (default: all)")
    add_setting(
        g, "--probe", settings=ProbeConfig, field="kind", choices=["linear", "mlp"], help="probe head"
    )
    add_setting(g, "--hidden", settings=ProbeConfig, type=positive_int, help="MLP width")
    add_setting(g, "--lr", settings=ProbeConfig, type=float, help="probe learning rate")
    add_setting(g, "--max-epochs", settings=ProbeConfig, type=positive_int, stated=False)
    add_setting(g, "--patience", settings=ProbeConfig, type=positive_int, stated=False,
                help="early stopping on the valid split")  # fmt: skip
    add_setting(g, "--seed", settings=ProbeConfig, type=int, stated=False)
    add_setting(g, "--bootstrap", settings=EvalSpec, field="resamples", type=positive_int, stated=False,
                help="bootstrap resamples of the test tracks")  # fmt: skip
    g = p.add_argument_group("features")
    g.add_argument("--stats", help="stats JSON for a .pt checkpoint")
    g.add_argument("--model-config", help="MusicFMConfig JSON for non-default sizes")
    add_setting(
        g, "--precision", settings=FeatureSpec, choices=["auto", "fp32", "bf16", "fp16"], stated=False
    )
    add_setting(g, "--batch-size", settings=FeatureSpec, type=positive_int, stated=False)
    add_setting(g, "--decode-cpus", settings=FeatureSpec, type=positive_int, stated=False)
    add_setting(g, "--gpu-actors", settings=FeatureSpec, type=positive_int, stated=False)
    g.add_argument("--storage-options", type=storage_options_arg, default=None)
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--debug", action="store_true", help="print tracebacks on failure")


def evaluate_parser() -> argparse.ArgumentParser:
    FinetuneSpec = evaluate_settings()[3]
    p = OneLineParser(prog="evaluate", description=DOC, formatter_class=argparse.RawDescriptionHelpFormatter,
                      settings=evaluate_settings())  # fmt: skip
    add_dataset_args(p)
    p.add_argument("--checkpoint", help="model to embed with (msd | fma | path | random[:SEED]); "
                   "without it --store is used as it is")  # fmt: skip
    p.add_argument(
        "--store", help="feature store (default OUTPUT/features); reused when it holds the task's profile"
    )
    p.add_argument("--mode", choices=["probe", "finetune"], default="probe")
    g = p.add_argument_group("fine-tuning (--mode finetune)")
    add_setting(g, "--backbone-lr", settings=FinetuneSpec, field="lr_backbone", type=float, stated=False)
    add_setting(g, "--head-lr", settings=FinetuneSpec, field="lr_head", type=float, stated=False)
    add_setting(g, "--workers", settings=FinetuneSpec, field="num_workers", type=positive_int, stated=False)
    add_setting(g, "--steps", settings=FinetuneSpec, field="max_steps", type=positive_int, stated=False)
    add_setting(g, "--checkpoint-every", settings=FinetuneSpec, type=positive_int, stated=False)
    add_probe_args(p)
    add_forgetting_args(p)
    return p


def add_forgetting_args(p: argparse.ArgumentParser) -> None:
    """Fine-tuning's head layer and the forgetting report on a second task (--mode finetune);
    an unset layer takes the default of FinetuneSpec.layer / finetune_forgetting.forgetting."""
    g = p.add_argument_group("forgetting (--mode finetune)")
    g.add_argument(
        "--finetune-layer",
        type=int,
        help="hidden state the fine-tuning head reads (default: FinetuneSpec.layer)",
    )
    g.add_argument("--forgetting-task", choices=["genre", "key"],
                   help="also score --forgetting-layer of the base and fine-tuned backbones on this second task")  # fmt: skip
    g.add_argument("--forgetting-dataset", help="dataset of the second task (default --dataset)")
    g.add_argument(
        "--forgetting-layer", type=int, help="hidden state scored for forgetting (default: layer 7)"
    )


def set_only(**flags: Any) -> dict[str, Any]:
    """The keyword arguments whose flag was set (None: leave the callee's default)."""
    return {k: v for k, v in flags.items() if v is not None}


def is_store(path: str) -> bool:
    return "://" not in path and os.path.isdir(os.path.join(path, "tracks.lance"))


def store_layers(store: str, storage_options: dict | None) -> tuple[int, ...]:
    from pipeline.schemas import parse_layer_column
    from pipeline.store.tables import Store

    ds = Store(store, storage_options, create=False).open("tracks")
    if ds is None:
        raise ValueError(f"no tracks.lance in the store at {store}")
    return tuple(sorted(i for i in (parse_layer_column(n) for n in ds.schema.names) if i is not None))


def build_spec(args: argparse.Namespace, output: str, checkpoint: str | None, store: str | None) -> Any:
    """An :class:`EvalSpec` from the flags, for one model (checkpoint) or one store."""
    from pipeline.evaluate.features import FeatureSpec
    from pipeline.evaluate.probe import ProbeConfig
    from pipeline.evaluate.runner import EvalSpec, default_layers

    if not checkpoint and not store:
        raise ValueError("give --checkpoint (embed the dataset) or --store (features already embedded)")
    store = store or os.path.join(output, "features")
    if args.layers:
        layers = args.layers
    elif checkpoint:
        layers = default_layers(args.model_config)
    else:
        layers = store_layers(store, args.storage_options)
    feats = FeatureSpec(store=store, checkpoint=checkpoint, stats=args.stats, model_config=args.model_config,
                        layers=layers, precision=args.precision, batch_size=args.batch_size,
                        decode_cpus=args.decode_cpus, gpu_actors=args.gpu_actors,
                        storage_options=dict(args.storage_options or {}))  # fmt: skip
    probe = ProbeConfig(kind=args.probe, hidden=args.hidden, lr=args.lr, max_epochs=args.max_epochs,
                        patience=args.patience, seed=args.seed)  # fmt: skip
    return EvalSpec(task=args.task, dataset=args.dataset, output=output, features=feats, probe=probe,
                    data_home=args.data_home, mirdata_version=args.mirdata_version, label_column=args.label_column,
                    split_seed=args.split_seed, resamples=args.bootstrap, progress=not args.no_progress)  # fmt: skip


def finetuned_checkpoint(args: argparse.Namespace) -> str:
    """Fine-tune ``--checkpoint`` with :mod:`pipeline.evaluate.finetune` (Ray Train) on the train
    split of a track-level single-label task (genre, key: one class per track) and return the
    fine-tuned checkpoint, which is then probed like any other."""
    from pipeline.evaluate import finetune
    from pipeline.evaluate.datasets import load_dataset, stratum
    from pipeline.evaluate.tasks import get_task

    task = get_task(args.task)
    if args.task not in ("genre", "key"):
        raise ValueError(f"--mode finetune trains on track labels: --task genre or key, not {args.task}")
    ds = load_dataset(args.dataset, task, data_home=args.data_home, version=args.mirdata_version,
                      label_column=args.label_column, seed=args.split_seed)  # fmt: skip
    train = [t for t in ds.tracks if (t.split or "train") == "train"]
    classes = sorted({stratum(task, t.ref) for t in train})
    if len(classes) < 2:
        raise ValueError(f"--mode finetune needs 2 or more classes in the train split, got {len(classes)}")
    spec = finetune.FinetuneSpec(
        checkpoint=args.checkpoint, stats=args.stats, model_config=args.model_config,
        train=tuple(finetune.LabelledTrack(t.audio, classes.index(stratum(task, t.ref))) for t in train),
        num_classes=len(classes), output=os.path.join(args.output, "finetune"),
        lr_backbone=args.backbone_lr, lr_head=args.head_lr, num_workers=args.workers, max_steps=args.steps,
        checkpoint_every=args.checkpoint_every, seed=args.seed, **set_only(layer=args.finetune_layer),
    )  # fmt: skip
    return str(finetune.run_finetune(spec).checkpoint)


def evaluate_main(argv: list[str] | None = None) -> int:
    parser = evaluate_parser()

    def run(args: argparse.Namespace) -> int:
        from pipeline.evaluate import finetune_forgetting as fg
        from pipeline.evaluate.datasets import TaskMismatch
        from pipeline.evaluate.runner import load, run_evaluation

        checkpoint, second = args.checkpoint, None
        if args.forgetting_task and args.mode != "finetune":
            parser.error("--forgetting-task needs --mode finetune")
        if args.mode == "finetune":
            if not checkpoint:
                parser.error("--mode finetune needs --checkpoint (the model to start from)")
            if args.forgetting_task:  # read and checked before any work
                second = fg.forgetting_tracks(args.forgetting_task, args.forgetting_dataset or args.dataset,
                                              args.data_home, args.mirdata_version, None, args.split_seed)  # fmt: skip
            checkpoint = finetuned_checkpoint(args)
        spec = build_spec(args, args.output, checkpoint, args.store)
        try:
            ds = load(spec)  # the task is checked against the annotations before any work
        except TaskMismatch as e:
            parser.error(str(e))
        res, _ = run_evaluation(spec, ds)
        if second is not None:
            from pipeline.evaluate.tasks import get_task

            rep = fg.forgetting(args.checkpoint, checkpoint, second, **set_only(layer=args.forgetting_layer), stats=args.stats,
                                model_config=args.model_config, window_s=get_task(args.forgetting_task).profile.window_s,
                                seed=args.seed, storage_options=args.storage_options, task=args.forgetting_task,
                                resamples=args.bootstrap)  # fmt: skip
            fg.write_forgetting(res, rep)
        print(summary(res))
        return 0

    return run_main(run, parser, argv)


def summary(res: dict[str, Any]) -> str:
    p = res["primary_metric"]
    lines = [f"evaluate {res['run_id']}: {res['task']} on {res['dataset']['name']} with {res['model_id']}"]
    for name, m in res["layers"].items():
        lo, hi = m["ci95"][p]
        lines.append(f"  {name:<9} {p} {m['metrics'][p]:.4f} [{lo:.4f}, {hi:.4f}]")
    if res["error_rows"]:
        lines.append(f"  errors   {len(res['error_rows'])} tracks left out (see results.json error_rows)")
    if "forgetting" in res:
        fo = res["forgetting"]
        lines.append(f"  forgetting layer {fo['layer']} on {fo['task']}: {fo['metric']} {fo['before']:.4f} -> "
                     f"{fo['after']:.4f} ({fo['delta']:+.4f})")  # fmt: skip
    lines.append(f"  best     {res['best_layer']}; results in {os.path.dirname(res['outputs']['json'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- compare


def compare_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="compare_models", description="Two models (checkpoints or stores) on the same dataset "
                      "and task, per layer, with a paired bootstrap over test tracks.",
                      settings=evaluate_settings()[:3])  # fmt: skip
    add_dataset_args(p)
    p.add_argument(
        "--a", required=True, help="model A: a checkpoint (msd, path, random:SEED) or a store folder"
    )
    p.add_argument("--b", required=True, help="model B: a checkpoint or a store folder")
    add_probe_args(p)
    return p


def compare_main(argv: list[str] | None = None) -> int:
    parser = compare_parser()

    def run(args: argparse.Namespace) -> int:
        from pipeline.evaluate.datasets import TaskMismatch
        from pipeline.evaluate.runner import load, run_compare

        specs = []
        for name in ("a", "b"):
            ref = getattr(args, name)
            out = os.path.join(args.output, name)
            specs.append(
                build_spec(args, out, None if is_store(ref) else ref, ref if is_store(ref) else None)
            )
        try:
            load(specs[0])
        except TaskMismatch as e:
            parser.error(str(e))
        out = run_compare(specs[0], specs[1], args.output)
        print(
            f"compare {out['task']} on {out['dataset']['name']}: a = {out['a']['model_id']}, b = {out['b']['model_id']}"
        )
        for head, line in out["verdict"].items():
            print(f"  {head:<9} {line}")
        return 0

    return run_main(run, parser, sys.argv[1:] if argv is None else argv)
