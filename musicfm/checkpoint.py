"""Checkpoint loading with an explicit key map and strict checks.

Released checkpoints (``pretrained_{msd,fma}.pt``) are ``{"state_dict": {"model." + key: tensor}}``
in the official module names. :func:`official_key_map` lists, for a given config, every official
key this package needs and the parameter it fills. Keys that the embedding path does not use
(quantizer, prediction head, cls token, positional conv, BatchNorm counters) are matched by
:data:`DROPPED_KEYS` and dropped on purpose. Anything else is an error, as is a missing key or a
wrongly shaped tensor: all problems are collected and raised together in one
:class:`CheckpointError`.

Native files are safetensors written by :func:`save_safetensors` (``python -m musicfm.convert``):
tensors under this package's own names, with the config and mel stats in the metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .config import MusicFMConfig

PREFIX = "model."
NATIVE_FORMAT = "musicfm-native-v1"

# Official keys (after the "model." prefix) that are unused for embeddings, dropped on purpose.
DROPPED_KEYS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"cls_token",
        r"quantizer_melspec_2048_\d+\.(random_projection|codebook)",
        r"conformer\.pos_conv_embed\.conv\.bias",
        r"conformer\.pos_conv_embed\.conv\.parametrizations\.weight\.original[01]",
        r"conformer\.pos_conv_embed\.conv\.weight_[gv]",
        r"linear\.(weight|bias)",
        r"conv\.conv\.[01]\.bn[123]\.num_batches_tracked",
        r"conformer\.layers\.\d+\.conv_module\.batch_norm\.num_batches_tracked",
    )
)

_BN = ("weight", "bias", "running_mean", "running_var")
_LAYER_MAP = {
    "ffn1_layer_norm": "ffn1.norm",
    "ffn1.intermediate_dense": "ffn1.fc1",
    "ffn1.output_dense": "ffn1.fc2",
    "self_attn_layer_norm": "attn.norm",
    "self_attn.linear_q": "attn.q",
    "self_attn.linear_k": "attn.k",
    "self_attn.linear_v": "attn.v",
    "self_attn.linear_out": "attn.out",
    "conv_module.layer_norm": "conv.norm",
    "conv_module.batch_norm": "conv.bn",
    "ffn2_layer_norm": "ffn2.norm",
    "ffn2.intermediate_dense": "ffn2.fc1",
    "ffn2.output_dense": "ffn2.fc2",
    "final_layer_norm": "final_norm",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message lists every problem found."""


def official_key_map(cfg: MusicFMConfig) -> dict[str, str]:
    """Official key (without ``model.``) -> this package's state-dict key, for every needed tensor."""
    m = {
        "preprocessor_melspec_2048.mel_stft.spectrogram.window": "mel_frontend.window",
        "preprocessor_melspec_2048.mel_stft.mel_scale.fb": "mel_frontend.fb",
        "conv.linear.weight": "frontend.proj.weight",
        "conv.linear.bias": "frontend.proj.bias",
        "conformer.embed_positions.inv_freq": "encoder.inv_freq",
        "conformer.layer_norm.weight": "encoder.norm.weight",
        "conformer.layer_norm.bias": "encoder.norm.bias",
    }
    for b in range(2):
        for c in (1, 2, 3):
            for s in ("weight", "bias"):
                m[f"conv.conv.{b}.conv{c}.{s}"] = f"frontend.block{b}.conv{c}.{s}"
            for s in _BN:
                m[f"conv.conv.{b}.bn{c}.{s}"] = f"frontend.block{b}.bn{c}.{s}"
    for i in range(cfg.encoder_depth):
        src, dst = f"conformer.layers.{i}.", f"encoder.layers.{i}."
        for o, n in _LAYER_MAP.items():
            suffixes = _BN if o.endswith("batch_norm") else ("weight", "bias")
            for s in suffixes:
                m[src + f"{o}.{s}"] = dst + f"{n}.{s}"
        for o, n in (("pointwise_conv1", "pw1"), ("depthwise_conv", "dw"), ("pointwise_conv2", "pw2")):
            m[src + f"conv_module.{o}.weight"] = dst + f"conv.{n}.weight"
    return m


def _is_dropped(key: str) -> bool:
    return any(p.fullmatch(key) for p in DROPPED_KEYS)


# --------------------------------------------------------------------------- reading files


def read_torch_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)["state_dict"]`` with the ``model.`` prefix removed key by key.

    Refuses pickles that need anything beyond tensors and plain containers.
    """
    try:
        try:  # memory-map the zip format so a 1.3 GB checkpoint is not read twice into RAM
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{os.fspath(path)}: refused to load: the file needs arbitrary Python objects to unpickle, "
            f"which could run code; only plain tensor checkpoints are accepted (weights_only=True). "
            f"Detail: {first}"
        ) from None
    except Exception as e:  # corrupt zip, truncated file, garbage bytes: all one clear error
        raise CheckpointError(
            f"{os.fspath(path)}: not a readable torch checkpoint ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(obj, Mapping) or "state_dict" not in obj or not isinstance(obj["state_dict"], Mapping):
        raise CheckpointError(
            f"{os.fspath(path)}: expected a dict with a 'state_dict' entry (MusicFM release format)"
        )
    raw = obj["state_dict"]
    bad_prefix = [k for k in raw if not str(k).startswith(PREFIX)]
    if bad_prefix:
        raise CheckpointError(
            f"{os.fspath(path)}: {len(bad_prefix)} state_dict keys lack the '{PREFIX}' prefix of the release "
            f"format, e.g. {', '.join(map(str, bad_prefix[:5]))}"
        )
    out: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{os.fspath(path)}: entry {k!r} is {type(v).__name__}, not a tensor")
        out[k[len(PREFIX) :]] = v
    return out


def infer_config(sd: Mapping[str, torch.Tensor]) -> MusicFMConfig:
    """Sizes from tensor shapes of an official state dict (keys without ``model.``)."""
    needed = (
        "conv.conv.0.conv1.weight",
        "conv.linear.weight",
        "conformer.embed_positions.inv_freq",
        "preprocessor_melspec_2048.mel_stft.mel_scale.fb",
        "preprocessor_melspec_2048.mel_stft.spectrogram.window",
    )
    missing = [k for k in needed if k not in sd]
    if missing:
        raise CheckpointError(f"cannot infer the model size: missing keys {', '.join(missing)}")
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"conformer\.layers\.(\d+)\.", k))}
    depth = max(layer_ids) + 1 if layer_ids else 0
    if depth == 0 or layer_ids != set(range(depth)):
        raise CheckpointError(f"cannot infer the model depth: conformer layers found {sorted(layer_ids)}")
    dim = sd["conv.linear.weight"].shape[0]
    head_dim = 2 * sd["conformer.embed_positions.inv_freq"].shape[0]
    kwargs: dict[str, Any] = dict(
        encoder_dim=dim,
        encoder_depth=depth,
        conv_dim=sd["conv.conv.0.conv1.weight"].shape[0],
        num_heads=dim // head_dim if head_dim and dim % head_dim == 0 else 0,
        n_mels=sd["preprocessor_melspec_2048.mel_stft.mel_scale.fb"].shape[1],
        n_fft=sd["preprocessor_melspec_2048.mel_stft.spectrogram.window"].shape[0],
    )
    if "conformer.layers.0.ffn1.intermediate_dense.weight" in sd:
        kwargs["ffn_dim"] = sd["conformer.layers.0.ffn1.intermediate_dense.weight"].shape[0]
    if "conformer.layers.0.conv_module.depthwise_conv.weight" in sd:
        kwargs["conv_kernel"] = sd["conformer.layers.0.conv_module.depthwise_conv.weight"].shape[-1]
    try:
        return MusicFMConfig(**kwargs)
    except ValueError as e:
        raise CheckpointError(f"inferred sizes are inconsistent: {e}") from None


def read_stats(stats: str | os.PathLike[str] | Mapping[str, Any], cfg: MusicFMConfig) -> tuple[float, float]:
    """(mean, std) of the dB mel from the stats JSON, reading exactly ``cfg.stats_keys``."""
    where = "stats"
    if not isinstance(stats, Mapping):
        where = os.fspath(stats)
        try:
            with open(stats, encoding="utf-8") as f:
                stats = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{where}: cannot read stats JSON ({type(e).__name__}: {e})") from None
        if not isinstance(stats, Mapping):
            raise CheckpointError(f"{where}: stats JSON must be an object")
    mean_key, std_key = cfg.stats_keys
    missing = [k for k in (mean_key, std_key) if k not in stats]
    if missing:
        raise CheckpointError(
            f"{where}: missing stats keys {', '.join(missing)} (found: {', '.join(sorted(map(str, stats))) or 'none'})"
        )
    try:
        mean, std = float(stats[mean_key]), float(stats[std_key])
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: {mean_key} and {std_key} must be numbers") from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise CheckpointError(f"{where}: need a finite mean and a positive std, got {mean}, {std}")
    return mean, std


# --------------------------------------------------------------------------- strict mapping


def map_official_state_dict(
    sd: Mapping[str, torch.Tensor], cfg: MusicFMConfig, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Translate an official state dict into native keys; ``shapes`` are the native tensors'
    shapes the model expects. Raises one error listing every problem (missing, unexpected,
    wrong shape or dtype)."""
    key_map = official_key_map(cfg)
    missing = [k for k in key_map if k not in sd]
    unexpected = [k for k in sd if k not in key_map and not _is_dropped(k)]
    wrong_shape = []
    out: dict[str, torch.Tensor] = {}
    for src, dst in key_map.items():
        if src not in sd:
            continue
        t = sd[src]
        want = tuple(shapes[dst])
        if tuple(t.shape) != want:
            wrong_shape.append(f"{src}: checkpoint {tuple(t.shape)} vs model {want}")
        elif not t.is_floating_point():
            wrong_shape.append(f"{src}: dtype {t.dtype} is not floating point")
        else:
            out[dst] = t
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(PREFIX + k for k in missing))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(PREFIX + k for k in unexpected))
    if wrong_shape:
        problems.append(f"wrong shapes ({len(wrong_shape)}): " + "; ".join(PREFIX + k for k in wrong_shape))
    if problems:
        raise CheckpointError("checkpoint does not match the model config:\n  " + "\n  ".join(problems))
    return out


def check_native_state_dict(sd: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Strict check of a native (safetensors) state dict against the model's tensor ``shapes``."""
    missing = [k for k in shapes if k not in sd]
    unexpected = [k for k in sd if k not in shapes]
    wrong = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(shapes[k])}"
        for k in shapes
        if k in sd and tuple(sd[k].shape) != tuple(shapes[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): " + "; ".join(wrong))
    if problems:
        raise CheckpointError("safetensors file does not match the model config:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------- entry points


def _as_config(
    config: MusicFMConfig | str | os.PathLike[str] | Mapping[str, Any] | None,
) -> MusicFMConfig | None:
    if config is None or isinstance(config, MusicFMConfig):
        return config
    if isinstance(config, Mapping):
        return MusicFMConfig.from_dict(dict(config))
    return MusicFMConfig.from_json(config)


@dataclass(frozen=True)
class CheckpointFile:
    """What a checkpoint file holds, read without building a model: the config, the mel stats,
    the tensors (``native``: this package's key names, else official names without ``model.``)
    and where they came from."""

    config: MusicFMConfig
    mel_mean: float
    mel_std: float
    tensors: dict[str, torch.Tensor]
    native: bool
    provenance: dict[str, str]


def read_checkpoint(checkpoint: Any, stats: Any = None, config: Any = None) -> CheckpointFile:
    """Read a released ``.pt`` (official key names; needs ``stats``) or a ``.safetensors`` written
    by ``python -m musicfm.convert`` (config and stats inside). ``config=None`` infers the sizes."""
    cfg = _as_config(config)
    meta: dict[str, str] = {}
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        sd, meta = read_safetensors(path)
        file_cfg = MusicFMConfig.from_dict(json.loads(meta["config"]))
        if cfg is not None and cfg != file_cfg:
            raise CheckpointError(f"{path}: the given config differs from the one stored in the file")
        cfg = file_cfg
        mean, std = (
            read_stats(stats, cfg) if stats is not None else (float(meta["mel_mean"]), float(meta["mel_std"]))
        )
        native = True
    else:
        if stats is None:
            raise CheckpointError(f"{path}: a .pt checkpoint needs its stats JSON (e.g. msd_stats.json)")
        sd = read_torch_checkpoint(path, map_location="cpu")
        cfg = cfg or infer_config(sd)
        mean, std = read_stats(stats, cfg)
        native = False
    bad = non_finite_tensors(sd)
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} tensor(s) hold NaN/Inf values, the checkpoint is broken: "
            + ", ".join(bad[:5])
            + (" ..." if len(bad) > 5 else "")
        )
    random_weights = native and meta.get("source") == "random"
    provenance = {"source": "random" if random_weights else "checkpoint", "file": os.path.basename(path)}
    return CheckpointFile(cfg, mean, std, dict(sd), native, provenance)


def non_finite_tensors(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``sd`` that hold a NaN or an Inf."""
    return [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def fingerprint(model: Any) -> str:
    """sha256 hex of a :class:`musicfm.model.MusicFM25Hz`'s config, mel stats and every tensor
    (name, dtype, shape, raw bytes), in key order: the digest of its ``model_id``."""
    h = hashlib.sha256()
    h.update(model.config.to_json().encode())
    h.update(f"{model.mel_mean!r}/{model.mel_std!r}".encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_safetensors(model: Any, path: str | os.PathLike[str]) -> None:
    """Write a :class:`musicfm.model.MusicFM25Hz`'s tensors under native names, with config and
    mel stats in the metadata (reads the model, never changes it)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {
        "format": NATIVE_FORMAT,
        "config": model.config.to_json(),
        "mel_mean": repr(model.mel_mean),
        "mel_std": repr(model.mel_std),
        "model_id": model.model_id,
        "source": "random" if model.is_random else "checkpoint",  # random weights stay labelled as such
    }
    save_file(tensors, os.fspath(path), metadata=meta)


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        sd = load_file(os.fspath(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{os.fspath(path)}: not a readable safetensors file ({e})") from None
    if meta.get("format") != NATIVE_FORMAT or "config" not in meta:
        raise CheckpointError(
            f"{os.fspath(path)}: safetensors file was not written by musicfm.convert (format {meta.get('format')!r})"
        )
    return sd, meta
