"""Model side of the pipeline: loading MusicFM from flags and embedding windows of audio.

Shared by the Ray model stage (:class:`pipeline.flow.stages.EmbedStage`), query-by-audio in search,
and tests: one code path from decoded samples to pooled vectors.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pipeline.io.windows import Window, WindowSpec, plan_windows

if TYPE_CHECKING:  # torch and the model load only where a model runs (not in decode workers)
    import torch

    from musicfm import MusicFM25Hz

PRESETS = ("msd", "fma")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class EmbedSettings:
    """What is embedded and how: the parts that change the stored vectors."""

    layers: tuple[int, ...] = (7, 12)
    window_s: float = 30.0
    hop_s: float = 30.0
    frames_hz: float | None = None
    precision: str = "fp32"  # resolved: fp32 | bf16 | fp16 (never "auto")
    # RMS level (dBFS) each window is scaled to before the model; None = audio as decoded
    loudness_target_db: float | None = None
    # runtime option, not in settings_id: torch.compile of the model (same math, other kernels)
    compile: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct and non-empty, got {self.layers}")
        if any(i < 0 for i in self.layers):
            raise ValueError(f"layers must be >= 0, got {self.layers}")
        if self.precision not in PRECISIONS[1:]:
            raise ValueError(f"precision must be one of fp32, bf16, fp16 here, got {self.precision!r}")
        if self.frames_hz is not None and not self.frames_hz > 0:
            raise ValueError(f"frames_hz must be > 0, got {self.frames_hz}")
        if self.loudness_target_db is not None and not -80.0 <= self.loudness_target_db <= 0.0:
            raise ValueError(f"loudness_target_db must be in [-80, 0] dBFS, got {self.loudness_target_db}")
        self.window_spec()  # validates window/hop

    def window_spec(self) -> WindowSpec:
        return WindowSpec(window_s=self.window_s, hop_s=self.hop_s)

    def settings_id(self, model_id: str) -> str:
        """Fingerprint of everything that determines the stored vectors."""
        fields = {
            "model_id": model_id,
            "layers": list(self.layers),
            "window_s": self.window_s,
            "hop_s": self.hop_s,
            "frames_hz": self.frames_hz,
            "precision": self.precision,
        }
        if self.loudness_target_db is not None:  # only when set: existing settings_ids stay the same
            fields["loudness_target_db"] = float(self.loudness_target_db)
        payload = json.dumps(fields, sort_keys=True)
        return "s-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


#: Windows quieter than this (RMS, dBFS) are left as they are by loudness normalisation.
SILENCE_DB = -70.0


def normalize_loudness(x: np.ndarray, target_db: float) -> np.ndarray:
    """Each row of ``x`` (B, N) scaled to an RMS of ``target_db`` dBFS (near-silent rows kept).

    Per window, not per track: the decode stage streams a track window by window, so the whole
    track's level is not known when its first windows reach the model. A pure gain change (a
    louder master) gives the same windows after it, up to float rounding."""
    rms = np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=1, keepdims=True))  # (B, 1)
    gain = np.where(rms > 10 ** (SILENCE_DB / 20), 10 ** (target_db / 20) / np.maximum(rms, 1e-12), 1.0)
    return (x * gain).astype(np.float32)


def pick_device(device: str | None = None) -> torch.device:
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    import torch

    """``auto`` -> bf16 on CUDA, fp32 on every CPU (bf16 there is opt-in: faster by 1.67x per CPU
    second on AVX512-BF16 at batch 8, unmeasured on AMX; docs/sizing_decode.md); fp16 is refused
    off CUDA."""
    dev = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if dev.type == "cuda" else "fp32"
    if precision == "fp16" and dev.type != "cuda":
        raise ValueError("fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return precision


# --------------------------------------------------------------------------- loading


def _local_copy(uri: str, storage_options: dict | None) -> str:
    """Download a remote checkpoint/stats file once into a local cache; return the local path."""
    from pipeline.io.objects import open_uri

    cache = os.environ.get("MUSICFM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "musicfm"))
    os.makedirs(cache, exist_ok=True)
    fs, path = open_uri(uri, storage_options)
    info = fs.info(path)
    tag = hashlib.sha256(f"{uri}|{info.get('ETag') or info.get('size')}".encode()).hexdigest()[:16]
    local = os.path.join(cache, f"{tag}-{os.path.basename(path)}")
    if not os.path.exists(local):
        tmp = f"{local}.partial-{os.getpid()}"
        fs.get(path, tmp)
        os.replace(tmp, local)
    return local


def _is_remote(uri: str | None) -> bool:
    return bool(uri) and "://" in uri and not uri.startswith("file://")


def load_model(
    checkpoint: str = "msd",
    stats: str | None = None,
    model_config: str | None = None,
    device: str | None = None,
    storage_options: dict | None = None,
) -> MusicFM25Hz:
    """Build the model the job flags describe, in eval mode on ``device``.

    ``checkpoint``: ``msd`` / ``fma`` (released weights via the Hugging Face cache), a local path
    or ``s3://`` / ``gs://`` URI of a ``.pt`` (needs ``stats``) or ``.safetensors``, or
    ``random`` / ``random:SEED`` for a deterministic random-weight model (demo and tests; sizes
    from ``model_config``; such a model's id starts with ``random-``).
    """
    from musicfm import MusicFM25Hz, MusicFMConfig

    cfg = MusicFMConfig.from_json(model_config) if model_config else None
    if checkpoint in PRESETS:
        if stats:
            raise ValueError("--stats is only for checkpoint files; presets bring their own stats")
        model = MusicFM25Hz.from_pretrained(checkpoint)
        if cfg is not None and cfg != model.config:
            raise ValueError("--model-config does not match the preset's sizes")
    elif checkpoint == "random" or checkpoint.startswith("random:"):
        seed = int(checkpoint.split(":", 1)[1]) if ":" in checkpoint else 0
        mean, std = (0.0, 1.0)
        if stats:
            from musicfm.checkpoint import read_stats

            mean, std = read_stats(
                _local_copy(stats, storage_options) if _is_remote(stats) else stats, cfg or MusicFMConfig()
            )
        model = MusicFM25Hz(cfg, mean, std, seed=seed)
    else:
        ckpt = _local_copy(checkpoint, storage_options) if _is_remote(checkpoint) else checkpoint
        st = _local_copy(stats, storage_options) if _is_remote(stats) else stats
        model = MusicFM25Hz.from_checkpoint(ckpt, st, cfg)
    return model.to(pick_device(device)).eval()


# --------------------------------------------------------------------------- embedding


@dataclass
class WindowResult:
    """Pooled output of one window: per-layer mean over its tokens, optional frames."""

    means: dict[int, np.ndarray]  # layer -> (D,) float32
    n_tokens: int
    frames: dict[int, np.ndarray] | None = None  # layer -> (n_frames, D) float32
    frame_times: np.ndarray | None = None  # (n_frames,) seconds from the window start (centres)


class WindowEmbedder:
    """Runs windows through the model, batching windows of equal length (no padding: the model has
    no mask, so padding would change the embeddings of the real frames).

    ``allow_slow_bf16``: run bf16 on a CPU without bf16 units anyway (refused by default:
    :func:`pipeline.engine.device.require_cpu_bf16`); audio queries of a bf16 store do, as they
    must match the store's settings.

    ``max_batch``: windows per model call; ``None`` picks one (:func:`pipeline.engine.device.auto_batch_size`:
    the CPU default of 8, or what fits in the free GPU memory). On CUDA the copy of batch n+1 to
    the device overlaps the compute of batch n, and each batch comes back in one copy
    (:mod:`pipeline.engine.staging`); ``settings.compile`` wraps the model in ``torch.compile`` first.
    """

    def __init__(
        self,
        model: MusicFM25Hz,
        settings: EmbedSettings,
        max_batch: int | None = None,
        allow_slow_bf16: bool = False,
    ) -> None:
        from pipeline.engine.device import auto_batch_size, compile_model, require_cpu_bf16
        from pipeline.engine.staging import Stager

        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if settings.precision == "bf16" and model.device.type == "cpu" and not allow_slow_bf16:
            require_cpu_bf16()  # bf16 on a CPU without bf16 units: refused, not minutes per track
        bad = [i for i in settings.layers if i > model.config.encoder_depth]
        if bad:
            raise ValueError(f"layers {bad} exceed the model depth {model.config.encoder_depth}")
        if settings.compile:
            compile_model(model)
        self.model = model
        self.settings = settings
        self.device = model.device
        if max_batch is None:
            n = int(round(settings.window_s * model.config.sample_rate))
            max_batch = auto_batch_size(model, n, settings.precision, settings.layers)
        self.max_batch = max_batch
        self.model_seconds = 0.0  # wall seconds in model calls and their copies
        self.device_seconds = 0.0  # seconds the device computed (CUDA events; = model calls on CPU)
        self._stager = Stager(self.device)

    def embed(self, audio: Sequence[np.ndarray]) -> list[WindowResult]:
        """``audio``: 1-D float32 arrays at 24 kHz, any lengths. Results in input order."""
        import torch

        with torch.inference_mode():
            return self._embed(audio)

    def _plan(self, audio: Sequence[np.ndarray]) -> list[list[int]]:
        """Batches of input indices: equal lengths, at most ``max_batch``, in first-seen order."""
        by_len: dict[int, list[int]] = {}
        for i, a in enumerate(audio):
            by_len.setdefault(int(a.shape[0]), []).append(i)
        return [
            idx[s : s + self.max_batch] for idx in by_len.values() for s in range(0, len(idx), self.max_batch)
        ]

    def _embed(self, audio: Sequence[np.ndarray]) -> list[WindowResult]:
        import torch

        from musicfm.pooling import num_frames
        from pipeline.engine.staging import Readback, pool_batch

        out: list[WindowResult | None] = [None] * len(audio)
        sr = self.model.config.sample_rate
        plan = self._plan(audio)
        stager, cuda = self._stager, self.device.type == "cuda"
        pending: tuple | None = None  # (batch indices, Readback, timing events) of the batch before

        def finish(p: tuple) -> None:
            chunk, back, n_tok, nf, events = p
            pooled = back.result()  # (L, B, D) or (L, B, 1 + nf, D)
            if events is not None:
                self.device_seconds += events[0].elapsed_time(events[1]) / 1000
            n = int(audio[chunk[0]].shape[0])
            times = None if nf is None else (np.arange(nf) + 0.5) * (n / sr) / nf
            layers = self.settings.layers
            for b, i in enumerate(chunk):
                out[i] = WindowResult(
                    means={
                        lay: pooled[k, b] if nf is None else pooled[k, b, 0] for k, lay in enumerate(layers)
                    },
                    n_tokens=n_tok,
                    frames=None if nf is None else {lay: pooled[k, b, 1:] for k, lay in enumerate(layers)},
                    frame_times=times,
                )

        target = self.settings.loudness_target_db

        def windows_of(chunk: Sequence[int]) -> list[np.ndarray]:  # (N,) each, loudness-normalised if asked
            if target is None:
                return [audio[i] for i in chunk]
            return [normalize_loudness(np.asarray(audio[i], np.float32)[None], target)[0] for i in chunk]

        staged = None
        for k, chunk in enumerate(plan):
            if staged is None:
                staged = stager.to_device(stager.host_batch(windows_of(chunk)))
            t0 = time.perf_counter()
            x = stager.acquire(staged)  # (B, N) on the device
            n = int(x.shape[1])
            nf = num_frames(n / sr, self.settings.frames_hz) if self.settings.frames_hz else None
            events = (
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None
            )
            if events is not None:
                events[0].record()
            hs = self.model.hidden_states(
                x, self.settings.layers, precision=self.settings.precision
            )  # L x (B, T, D)
            back_now = Readback(pool_batch(hs, nf))  # one copy for all layers
            if events is not None:
                events[1].record()
            else:
                self.device_seconds += time.perf_counter() - t0
            self.model_seconds += time.perf_counter() - t0
            staged = None
            if k + 1 < len(plan):  # queue the next batch's copy behind this batch's compute
                staged = stager.to_device(stager.host_batch(windows_of(plan[k + 1])))
            t1 = time.perf_counter()
            if pending is not None:
                finish(pending)
            pending = (chunk, back_now, int(hs[0].shape[1]), nf, events)
            self.model_seconds += time.perf_counter() - t1
        if pending is not None:
            t1 = time.perf_counter()
            finish(pending)
            self.model_seconds += time.perf_counter() - t1
        return out  # type: ignore[return-value]


def track_mean(window_means: Sequence[np.ndarray], n_tokens: Sequence[int]) -> np.ndarray:
    """Mean over all tokens of all windows, from per-window means weighted by token counts."""
    w = np.asarray(n_tokens, dtype=np.float64)
    m = np.stack([np.asarray(v, dtype=np.float64) for v in window_means])  # (W, D)
    return ((w[:, None] * m).sum(0) / w.sum()).astype(np.float32)


def frame_ownership(windows: Sequence[Window], num_samples: int) -> list[tuple[int, int]]:
    """Sample range each window owns for frame output, so overlapping windows give no duplicate
    frames: a window owns from its start (or its predecessor's end, if later) to the next
    window's start (or its own end, if earlier); the last window owns up to the track end."""
    own = []
    prev_end = 0
    for k, w in enumerate(windows):
        start = max(w.start, prev_end)
        end = num_samples if k == len(windows) - 1 else min(w.end, windows[k + 1].start)
        own.append((start, max(start, end)))
        prev_end = max(start, end)
    return own


@dataclass
class TrackEmbedding:
    """Embedding of one track: per-layer track vectors and per-window vectors."""

    track: dict[int, np.ndarray]  # layer -> (D,)
    windows: list[tuple[float, float, dict[int, np.ndarray]]] = field(default_factory=list)
    duration_s: float = 0.0


def embed_samples(embedder: WindowEmbedder, samples: np.ndarray) -> TrackEmbedding:
    """Window, embed and pool one decoded track (mono float32 at 24 kHz)."""
    spec = embedder.settings.window_spec()
    sr = spec.sample_rate
    wins = plan_windows(int(samples.shape[0]), spec)
    results = embedder.embed([samples[w.start : w.end] for w in wins])
    layers = embedder.settings.layers
    track = {
        lay: track_mean([r.means[lay] for r in results], [r.n_tokens for r in results]) for lay in layers
    }
    return TrackEmbedding(
        track=track,
        windows=[(w.start / sr, w.end / sr, r.means) for w, r in zip(wins, results, strict=True)],
        duration_s=samples.shape[0] / sr,
    )


def embed_uri(
    uri: str,
    model: MusicFM25Hz,
    layers: Sequence[int],
    window_s: float = 30.0,
    hop_s: float = 30.0,
    storage_options: dict | None = None,
    precision: str = "fp32",
    loudness_target_db: float | None = None,
) -> TrackEmbedding:
    """Fetch, decode, window, embed and pool one audio file or object (the pipeline's path)."""
    from pipeline.io.audio import decode_audio
    from pipeline.io.objects import fetch_bytes

    if "://" in uri and not uri.startswith("file://"):
        data, _ = fetch_bytes(uri, storage_options)
    else:
        data = uri[len("file://") :] if uri.startswith("file://") else uri
    decoded = decode_audio(data)
    settings = EmbedSettings(
        layers=tuple(layers),
        window_s=window_s,
        hop_s=hop_s,
        precision=resolve_precision(precision, model.device),
        loudness_target_db=loudness_target_db,
    )
    # a query follows the store's precision whatever this CPU has (one track, not a catalog)
    return embed_samples(WindowEmbedder(model, settings, allow_slow_bf16=True), decoded.samples)
