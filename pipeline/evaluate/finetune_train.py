"""The Ray Train worker of fine-tuning (one per data-parallel worker, GPU or CPU).

Each worker loads the backbone, adds the head, wraps both in DDP (``ray.train.torch.prepare_model``:
NCCL on GPUs, gloo on CPUs), restores the latest checkpoint of the run if there is one, and
trains on its shard of the decoded windows (``ray.train.get_dataset_shard``; the shards hold
equal row counts, so every worker takes the same number of steps). On CUDA the backbone runs
under bf16 autocast (mixed precision; the mel, the head and the loss stay float32), on CPU in
float32. Rank 0 writes the checkpoints.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from pipeline.evaluate.finetune_spec import FinetuneSpec
from pipeline.evaluate.finetune_state import CheckpointStore, Progress, pack_state, unpack_state

log = logging.getLogger(__name__)

#: Rows each worker shuffles locally, in batches (windows of one track arrive together).
SHUFFLE_BATCHES = 8


class Classifier(nn.Module):
    """Backbone plus a linear head on the time-mean of hidden state ``layer``: (B, N) -> (B, C)."""

    def __init__(self, backbone: Any, num_classes: int, layer: int, precision: str) -> None:
        super().__init__()
        depth = backbone.config.encoder_depth
        if not 0 <= layer <= depth:
            raise ValueError(f"layer {layer} is out of range 0..{depth} for this model")
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.encoder_dim, num_classes)
        self.layer = layer
        self.precision = precision
        freeze_unused(backbone, layer)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:  # (B, N) -> (B, C)
        h = self.backbone.hidden_states(wav, [self.layer], precision=self.precision)[0]  # (B, T, D) fp32
        return self.head(h.mean(dim=1))  # (B, D) -> (B, C)


def freeze_unused(backbone: Any, layer: int) -> None:
    """No gradient for the parts the chosen hidden state does not depend on (the Conformer
    layers after it, and the final norm unless it is the last state): DDP needs every trainable
    parameter to take part in each step."""
    layers = backbone.encoder.layers
    for lay in layers[layer:]:
        lay.requires_grad_(False)
    if layer < len(layers):
        backbone.encoder.norm.requires_grad_(False)


def make_optimizer(model: Classifier, spec: FinetuneSpec) -> torch.optim.Optimizer:
    """AdamW: the backbone's trainable parameters at ``lr_backbone``, the head at ``lr_head``."""
    return torch.optim.AdamW(
        [
            {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": spec.lr_backbone},
            {"params": list(model.head.parameters()), "lr": spec.lr_head},
        ]
    )


def _mean_over_workers(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.cpu().tolist()


def build(spec: FinetuneSpec, device: torch.device) -> tuple[Classifier, str]:
    """The model before training (head seeded) and the backbone's model_id."""
    from pipeline.engine.inference import load_model

    backbone = load_model(
        spec.checkpoint,
        spec.stats,
        spec.model_config,
        device="cpu",
        storage_options=spec.storage_options or None,
    )
    base_id = backbone.model_id
    torch.manual_seed(spec.seed)
    precision = "bf16" if device.type == "cuda" else "fp32"
    model = Classifier(backbone.train(), spec.num_classes, spec.layer, precision)
    return model, base_id


def train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the :class:`ray.train.torch.TorchTrainer`."""
    import ray.train
    import ray.train.torch

    spec: FinetuneSpec = config["spec"]
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    model, base_id = build(spec, device)
    wrapped = ray.train.torch.prepare_model(model)  # DDP over the workers; moves to the device
    optimizer = make_optimizer(model, spec)
    store = CheckpointStore(spec.output, spec.storage_options)
    progress = Progress()
    last = store.latest()
    if last is not None:
        tensors, meta = store.read(last)
        progress = unpack_state(tensors, meta, model.backbone, model.head, optimizer, spec.run_key(),
                                store.uri(last))  # fmt: skip
        base_id = meta["base_model_id"]
    start = progress.step
    shard = ray.train.get_dataset_shard("train")
    loss_fn = nn.CrossEntropyLoss()
    sr = model.backbone.config.sample_rate

    def save() -> None:
        if rank == 0:
            tensors, meta = pack_state(
                model.backbone, model.head, optimizer, progress, spec.run_key(), base_id
            )
            store.write(progress.step, tensors, meta)
        ray.train.report({"step": progress.step, "loss": progress.losses[-1] if progress.losses else None})

    while progress.step < spec.max_steps and (spec.epochs is None or progress.epoch < spec.epochs):
        n_batches = 0
        t_prev = time.perf_counter()
        for batch in shard.iter_torch_batches(
            batch_size=spec.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=SHUFFLE_BATCHES * spec.batch_size,
            local_shuffle_seed=spec.seed * 1_000_003 + progress.epoch * 101 + rank,
            device=device,
        ):
            wav, labels = batch["audio"].float(), batch["label"].long()  # (B, N), (B,)
            loss = loss_fn(wrapped(wav), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            now = time.perf_counter()
            mean_loss, train_s = _mean_over_workers([float(loss.detach()), now - t_prev], device)
            t_prev = now
            progress.step += 1
            progress.losses.append(mean_loss)
            progress.audio_s += wav.shape[0] * wav.shape[1] / sr
            progress.train_s += train_s
            n_batches += 1
            if progress.step % spec.checkpoint_every == 0 or progress.step == spec.max_steps:
                save()
            if progress.step >= spec.max_steps:
                break
        if n_batches == 0:
            raise RuntimeError(
                f"no full batch of {spec.batch_size} windows per worker: the training set has too few "
                f"{spec.window_s:g} s windows for {spec.num_workers} workers; lower batch_size or num_workers"
            )
        if progress.step < spec.max_steps:
            progress.epoch += 1
    if progress.step > start and progress.step % spec.checkpoint_every and progress.step != spec.max_steps:
        save()  # stopped by epochs between two checkpoints: keep the end state
    log.info("fine-tuning worker %d: steps %d -> %d", rank, start, progress.step)
