"""Fine-tuning state on storage: one safetensors file per saved step, local or object storage.

    {output}/checkpoints/step-000000040.safetensors
        backbone.<key>   every tensor of the MusicFM backbone (its native state-dict names)
        head.weight      (C, D) linear head on the mean-pooled chosen layer
        head.bias        (C,)
        optim.<i>.<name> AdamW state of trainable parameter i (exp_avg, exp_avg_sq, step)
        metadata         format, run key, step, epoch, losses, audio / train seconds, optimizer
                         param groups, backbone config, mel stats, provenance

A file appears whole or not at all (written to a local temporary file, then renamed locally or
uploaded with one PUT), so a run killed at any moment leaves only complete checkpoints; the
newest one is where a rerun continues. The two newest are kept.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.io.objects import is_remote, join, open_uri

STATE_FORMAT = "musicfm-finetune-state-v1"
KEEP_LAST = 2
_NAME = re.compile(r"step-(\d{9})\.safetensors$")


@dataclass
class Progress:
    """Where training stands: steps done, the epoch being run, the mean loss of every step so far,
    and the audio seconds / training-loop seconds of one worker (summed over resumed runs)."""

    step: int = 0
    epoch: int = 0
    losses: list[float] = field(default_factory=list)
    audio_s: float = 0.0
    train_s: float = 0.0

    def to_meta(self) -> dict[str, str]:
        return {
            "step": str(self.step),
            "epoch": str(self.epoch),
            "losses": json.dumps(self.losses),
            "audio_s": repr(self.audio_s),
            "train_s": repr(self.train_s),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> Progress:
        return cls(
            step=int(meta["step"]),
            epoch=int(meta["epoch"]),
            losses=[float(x) for x in json.loads(meta["losses"])],
            audio_s=float(meta["audio_s"]),
            train_s=float(meta["train_s"]),
        )


class CheckpointStore:
    """The ``checkpoints/`` folder under ``output`` (a local path or an fsspec URI)."""

    def __init__(self, output: str, storage_options: dict[str, Any] | None = None) -> None:
        if not output:
            raise ValueError("output must be a local folder or an object-storage prefix")
        self.root = join(output, "checkpoints")
        self.remote = is_remote(output)
        self.storage_options = storage_options or None
        self.fs, self.path = open_uri(self.root, self.storage_options)

    def uri(self, step: int) -> str:
        return join(self.root, f"step-{step:09d}.safetensors")

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        try:
            names = (
                self.fs.ls(self.path, detail=False, refresh=True) if self.remote else os.listdir(self.path)
            )
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _NAME.search(str(n))))

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def write(self, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
        """Save one checkpoint atomically; drop all but the :data:`KEEP_LAST` newest."""
        from safetensors.torch import save_file

        target = self.uri(step)
        local_dir = None if self.remote else self.path
        if local_dir:
            os.makedirs(local_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".safetensors.partial", dir=local_dir)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": STATE_FORMAT, **meta})
            if self.remote:
                self.fs.put_file(tmp, f"{self.path}/step-{step:09d}.safetensors")
            else:
                os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        for old in self.steps()[:-KEEP_LAST]:
            self.fs.rm_file(f"{self.path}/step-{old:09d}.safetensors")
        return target

    def read(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and metadata of the checkpoint at ``step``."""
        from safetensors.torch import load, safe_open

        name = f"{self.path}/step-{step:09d}.safetensors"
        if self.remote:
            with self.fs.open(name, "rb") as f:
                data = f.read()
            tensors = load(data)
            with tempfile.NamedTemporaryFile(suffix=".safetensors") as t:
                t.write(data)
                t.flush()
                with safe_open(t.name, framework="pt") as f:
                    meta = dict(f.metadata() or {})
        else:
            from safetensors.torch import load_file

            tensors = load_file(name)
            with safe_open(name, framework="pt") as f:
                meta = dict(f.metadata() or {})
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(
                f"{self.uri(step)}: not a fine-tuning checkpoint (format {meta.get('format')!r})"
            )
        return tensors, meta


def pack_state(
    backbone: torch.nn.Module,
    head: torch.nn.Linear,
    optimizer: torch.optim.Optimizer,
    progress: Progress,
    run_key: str,
    base_model_id: str,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a checkpoint (everything copied to CPU). ``base_model_id``: the
    model_id of the backbone before fine-tuning."""

    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", copy=True).contiguous()

    tensors = {f"backbone.{k}": cpu(v) for k, v in backbone.state_dict().items()}
    tensors.update({f"head.{k}": cpu(v) for k, v in head.state_dict().items()})
    opt = optimizer.state_dict()
    for ix, state in opt["state"].items():
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {name!r} is {type(value).__name__}, not a tensor")
            tensors[f"optim.{ix}.{name}"] = cpu(value).reshape(value.shape)
    meta = {
        **progress.to_meta(),
        "run_key": run_key,
        "param_groups": json.dumps(opt["param_groups"]),
        "config": backbone.config.to_json(),
        "mel_mean": repr(backbone.mel_mean),
        "mel_std": repr(backbone.mel_std),
        "source": "random" if backbone.is_random else "checkpoint",
        "base_model_id": base_model_id,
    }
    return tensors, meta


def unpack_state(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    backbone: Any,
    head: torch.nn.Linear,
    optimizer: torch.optim.Optimizer,
    run_key: str,
    where: str,
) -> Progress:
    """Load a checkpoint into ``backbone``, ``head`` and ``optimizer``; refuse one of another run."""
    from musicfm.checkpoint import check_native_state_dict

    if meta.get("run_key") != run_key:
        raise ValueError(
            f"{where}: this output holds checkpoints of another fine-tuning run (different model, data "
            "or settings); choose a new output or remove its checkpoints/"
        )
    sd = {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
    check_native_state_dict(sd, {k: tuple(v.shape) for k, v in backbone.state_dict().items()})
    backbone.load_weights(sd)
    head.load_state_dict({k[len("head.") :]: v for k, v in tensors.items() if k.startswith("head.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, ix, name = k.split(".", 2)
            state.setdefault(int(ix), {})[name] = v
    groups = json.loads(meta["param_groups"])
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return Progress.from_meta(meta)


def backbone_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's tensors of a checkpoint, under the model's own names."""
    return {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
