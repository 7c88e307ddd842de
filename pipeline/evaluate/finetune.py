"""Fine-tuning MusicFM on Ray Train, data parallel, resumable; the result is an embed-job checkpoint.

    LabelledTrack(uri, label) x N ──Ray Data: DecodeStage (the embed job's decode actors)
        ──to_examples──▶ fixed-length windows + labels, split equally over the workers
    TorchTrainer(num_workers, GPU or CPU) ── each worker: backbone (train mode, lr_backbone) +
        linear head on the time-mean of hidden state ``layer`` (lr_head), AdamW, cross-entropy,
        DDP (NCCL / gloo), bf16 autocast on CUDA, float32 on CPU
        ──every checkpoint_every steps──▶ {output}/checkpoints/step-N.safetensors (rank 0)
    driver ── the latest checkpoint's backbone ──▶ {output}/finetuned.safetensors (+ head.safetensors)

A rerun with the same spec (same output) continues at the latest checkpoint's step with the
saved weights, optimizer state and loss history (after a kill of the driver, of a worker, or a
longer ``max_steps``); the data order of the interrupted epoch is not replayed: that epoch starts
over from its first window. ``finetuned.safetensors`` holds the backbone only, with its config and
mel stats, so ``jobs/embed_catalog.py --checkpoint`` loads it, and its ``model_id`` (a hash of the
weights) differs from the base model's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid

from pipeline.engine.inference import PRESETS
from pipeline.evaluate.finetune_forgetting import ForgettingReport, forgetting
from pipeline.evaluate.finetune_spec import FinetuneResult, FinetuneSpec, LabelledTrack
from pipeline.evaluate.finetune_state import CheckpointStore, backbone_tensors
from pipeline.io.objects import is_remote, join, open_uri

__all__ = [
    "FinetuneResult",
    "FinetuneSpec",
    "ForgettingReport",
    "LabelledTrack",
    "base_config",
    "export_result",
    "forgetting",
    "run_finetune",
]

log = logging.getLogger(__name__)

MODEL_FILE = "finetuned.safetensors"
HEAD_FILE = "head.safetensors"


def base_config(spec: FinetuneSpec) -> object | None:
    """The backbone's :class:`musicfm.MusicFMConfig` when it is known without loading weights
    (``model_config``, presets, random weights, ``.safetensors`` metadata); None for a ``.pt``."""
    from musicfm import MusicFMConfig

    if spec.model_config:
        return MusicFMConfig.from_json(spec.model_config)
    ck = spec.checkpoint
    if ck in PRESETS or ck == "random" or ck.startswith("random:"):
        return MusicFMConfig()
    if ck.endswith(".safetensors") and not is_remote(ck) and os.path.isfile(ck):
        from safetensors import safe_open

        with safe_open(ck, framework="pt") as f:
            meta = f.metadata() or {}
        return MusicFMConfig.from_dict(json.loads(meta["config"])) if "config" in meta else None
    return None


def _check(spec: FinetuneSpec) -> None:
    """Refuse, before any work, what would fail inside the workers."""
    ck = spec.checkpoint
    if ck not in PRESETS and not ck.startswith("random") and not is_remote(ck) and not os.path.isfile(ck):
        raise FileNotFoundError(f"checkpoint not found: {ck}")
    cfg = base_config(spec)
    if cfg is not None and spec.layer > cfg.encoder_depth:
        raise ValueError(f"layer {spec.layer} exceeds the model depth {cfg.encoder_depth}")


def _check_cluster(spec: FinetuneSpec) -> None:
    """The workers and at least one decode actor must fit at once, or the run would wait forever
    (Ray Data only uses what the training workers leave)."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    need_cpu = spec.num_workers + 1  # a CPU per worker (also for GPU workers) and one decode actor
    if cpus < need_cpu or (spec.use_gpu and gpus < spec.num_workers):
        raise ValueError(
            f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs; {spec.num_workers} "
            f"{'GPU' if spec.use_gpu else 'CPU'} workers and a decode actor need {need_cpu} CPUs"
            + (f" and {spec.num_workers} GPUs" if spec.use_gpu else "")
        )


def _trainer(spec: FinetuneSpec, dataset: object, storage: str) -> object:
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.evaluate.finetune_train import train_loop

    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.num_workers,
            use_gpu=spec.use_gpu,
            resources_per_worker={"CPU": 1, "GPU": 1} if spec.use_gpu else {"CPU": 1},
        ),
        # Ray Train's own run folder (worker logs, its state); the model checkpoints go to spec.output
        run_config=ray.train.RunConfig(name=f"finetune-{uuid.uuid4().hex[:12]}", storage_path=storage),
        datasets={"train": dataset},
    )


def run_finetune(spec: FinetuneSpec) -> FinetuneResult:
    """Train (or continue training) as ``spec`` says on the Ray cluster in ``RAY_ADDRESS`` (or a
    local one); write and return the fine-tuned checkpoint. A worker failure raises."""
    from pipeline.flow.runtime import configure_data_context, ensure_ray

    _check(spec)
    ensure_ray()
    _check_cluster(spec)
    configure_data_context(progress=False)
    store = CheckpointStore(spec.output, spec.storage_options)
    resumed_from = store.latest() or 0
    if resumed_from:
        log.info("fine-tuning: continuing from %s", store.uri(resumed_from))
    from pipeline.evaluate.finetune_data import training_dataset

    dataset, attempts_dir = training_dataset(spec)
    if spec.cache_decoded:
        dataset = dataset.materialize()
    storage = tempfile.mkdtemp(prefix="musicfm-train-")
    try:
        if resumed_from < spec.max_steps:
            _trainer(spec, dataset, storage).fit()
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        shutil.rmtree(attempts_dir, ignore_errors=True)
    last = store.latest()
    if last is None:
        raise RuntimeError(f"fine-tuning ended without a checkpoint in {store.root}")
    return export_result(spec, store, last, resumed_from)


def export_result(spec: FinetuneSpec, store: CheckpointStore, step: int, resumed_from: int) -> FinetuneResult:
    """Write the backbone of checkpoint ``step`` as ``finetuned.safetensors`` and the head as
    ``head.safetensors`` under ``spec.output``; the result of the run."""
    from safetensors.torch import save_file

    from musicfm import MusicFM25Hz, MusicFMConfig
    from musicfm.checkpoint import check_native_state_dict, save_safetensors
    from pipeline.evaluate.finetune_state import Progress

    tensors, meta = store.read(step)
    progress = Progress.from_meta(meta)
    cfg = MusicFMConfig.from_dict(json.loads(meta["config"]))
    model = MusicFM25Hz(cfg, float(meta["mel_mean"]), float(meta["mel_std"]), init="empty")
    sd = backbone_tensors(tensors)
    check_native_state_dict(sd, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    model.load_weights(sd)
    model.provenance = {"source": meta["source"], "finetuned_from": meta["base_model_id"]}
    head = {k[len("head.") :]: v.contiguous() for k, v in tensors.items() if k.startswith("head.")}
    head_meta = {"layer": str(spec.layer), "num_classes": str(spec.num_classes), "model_id": model.model_id}
    fs, root = open_uri(spec.output, spec.storage_options)
    local = tempfile.mkdtemp(prefix="musicfm-finetuned-")
    try:
        save_safetensors(model, os.path.join(local, MODEL_FILE))
        save_file(head, os.path.join(local, HEAD_FILE), metadata=head_meta)
        for name in (MODEL_FILE, HEAD_FILE):
            if is_remote(spec.output):
                fs.put_file(os.path.join(local, name), f"{root.rstrip('/')}/{name}")
            else:
                os.makedirs(spec.output, exist_ok=True)
                os.replace(os.path.join(local, name), os.path.join(spec.output, name))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    rate = progress.audio_s / progress.train_s if progress.train_s > 0 else 0.0
    return FinetuneResult(
        checkpoint=join(spec.output, MODEL_FILE)
        if is_remote(spec.output)
        else os.path.join(spec.output, MODEL_FILE),
        losses=tuple(progress.losses),
        steps=progress.step,
        audio_s_per_s_per_worker=rate,
        model_id=model.model_id,
        base_model_id=meta["base_model_id"],
        resumed_from=resumed_from,
        head=join(spec.output, HEAD_FILE) if is_remote(spec.output) else os.path.join(spec.output, HEAD_FILE),
    )
