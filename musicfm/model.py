"""MusicFM 25 Hz in pure torch: log-mel front end, conv subsampling, rotary Conformer.

Written from ``shared/musicfm-spec.md``. Shapes use B = batch, N = samples at 24 kHz,
M = mel bins, F = mel frames (N // hop), T = tokens at 25 Hz, D = encoder width, H = heads.

Numerics (CPU fp32) follow the official operation order so the hidden states match the
official implementation; attention goes through ``scaled_dot_product_attention``. For inference
speed the BatchNorms of the conv front end are folded into their convs, q/k are one matmul and
CPU fp32 matmuls go through oneDNN (see :func:`musicfm.kernels.linear`); these change results by
float rounding only (golden parity error 1e-5, tolerance 1e-4). State-dict names are those of the
plain modules. The inference kernels (oneDNN matmul, derived-weight caches, precision contexts)
live in :mod:`musicfm.kernels`; the model id's digest (:func:`fingerprint`) in :mod:`musicfm.checkpoint`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import check_native_state_dict, fingerprint, map_official_state_dict, read_checkpoint
from .config import MusicFMConfig
from .kernels import PRECISIONS, DerivedCache, Linear, autocast_off, linear, precision_context, tensor_key

__all__ = ["PRECISIONS", "Conformer", "ConvFrontEnd", "LogMel", "MusicFM25Hz", "fingerprint"]


# --------------------------------------------------------------------------- mel front end


def hann_window(n_fft: int) -> Tensor:
    return torch.hann_window(n_fft, periodic=True, dtype=torch.float32)


def htk_mel_filterbank(n_fft: int, n_mels: int, sample_rate: int) -> Tensor:
    """(n_fft // 2 + 1, n_mels) HTK triangles without normalisation, computed in float32.

    The released checkpoints carry this buffer; this is only used for freshly built models.
    """
    n_freqs = n_fft // 2 + 1
    f_max = float(sample_rate // 2)
    bins = torch.linspace(0.0, f_max, n_freqs)  # (n_freqs,)
    mel_min = 2595.0 * math.log10(1.0 + 0.0 / 700.0)
    mel_max = 2595.0 * math.log10(1.0 + f_max / 700.0)
    m_pts = torch.linspace(mel_min, mel_max, n_mels + 2)
    f_pts = 700.0 * (10 ** (m_pts / 2595.0) - 1.0)  # (n_mels + 2,)
    f_diff = f_pts[1:] - f_pts[:-1]  # (n_mels + 1,)
    slopes = f_pts.unsqueeze(0) - bins.unsqueeze(1)  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0)


class LogMel(nn.Module):
    """Power mel spectrogram in dB, last frame dropped, normalised by two scalars. Always float32."""

    def __init__(self, cfg: MusicFMConfig, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        self.n_fft = cfg.n_fft
        self.hop_length = cfg.hop_length
        self.register_buffer("window", torch.empty(cfg.n_fft))  # (n_fft,)
        self.register_buffer("fb", torch.empty(cfg.n_fft // 2 + 1, cfg.n_mels))  # (n_fft/2+1, M)
        self.mean = float(mean)
        self.std = float(std)

    def reset_buffers(self, cfg: MusicFMConfig) -> None:
        with torch.no_grad():
            self.window.copy_(hann_window(cfg.n_fft))
            self.fb.copy_(htk_mel_filterbank(cfg.n_fft, cfg.n_mels, cfg.sample_rate))

    def db(self, wav: Tensor) -> Tensor:
        """(B, N) -> (B, M, N // hop) mel power in dB, before normalisation."""
        with autocast_off(wav.device):
            if wav.device.type == "cpu":
                return self._db_cpu(wav)
            z = torch.stft(
                wav.float(),
                n_fft=self.n_fft,
                hop_length=self.hop_length,
                win_length=self.n_fft,
                window=self.window.float(),
                center=True,
                pad_mode="reflect",
                normalized=False,
                onesided=True,
                return_complex=True,
            )  # (B, n_fft/2+1, N // hop + 1)
            power = z.abs().pow(2.0)
            mel = torch.matmul(power.transpose(-1, -2), self.fb.float()).transpose(-1, -2)  # (B, M, F+1)
            db = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))
            return db[..., :-1]  # (B, M, F)

    #: STFT frames (over the whole batch) transformed per step on CPU: ~4 MB of float64 frames,
    #: so the windowed frames, their spectrum and power stay in the core's cache.
    CPU_FRAMES_PER_STEP = 256

    def _db_cpu(self, wav: Tensor) -> Tensor:
        """The same spectrogram on CPU, in float64, a few frames at a time, rounded once at the end.

        float32 FFTs differ between CPU kernels (MKL on Intel vs AMD) by up to ~1.4e-4 dB; float64
        stays within ~8e-5 dB of the official values everywhere. Framing by hand (reflect pad,
        strided view, window, rfft) is what ``torch.stft(center=True)`` does; working through the
        frames in cache-sized steps and forming |z|^2 as re^2 + im^2 (exact in float64 to well below
        the final float32 rounding) makes this ~4x faster than one ``stft`` over the batch, with
        the same float32 result. The last frame is never computed (it is dropped)."""
        b, n = wav.shape
        half = self.n_fft // 2
        x = F.pad(wav.to(torch.float64)[:, None], (half, half), mode="reflect")[:, 0]  # (B, N + n_fft)
        n_frames = n // self.hop_length
        frames = x.unfold(-1, self.n_fft, self.hop_length)[:, :n_frames]  # (B, F, n_fft), a view
        window = self.window.to(torch.float64)
        fb = self.fb.to(torch.float64)  # (K, M)
        mel = torch.empty(b, n_frames, fb.shape[1], dtype=torch.float64)  # (B, F, M)
        step = max(1, self.CPU_FRAMES_PER_STEP // b)
        for s in range(0, n_frames, step):
            ri = torch.view_as_real(torch.fft.rfft(frames[:, s : s + step] * window))  # (B, f, K, 2)
            power = ri[..., 0].square().addcmul_(ri[..., 1], ri[..., 1])  # (B, f, K)
            mel[:, s : s + step] = power @ fb
        db = mel.clamp_(min=1e-10).log10_().mul_(10.0)
        return db.float().transpose(1, 2).contiguous()  # (B, M, F)

    def forward(self, wav: Tensor) -> Tensor:
        return (self.db(wav) - self.mean) / self.std


# --------------------------------------------------------------------------- conv subsampling


class FrozenBatchNorm(nn.Module):
    """Inference BatchNorm over dim 1 from running statistics (no counters, no training mode)."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels))
        self.register_buffer("running_mean", torch.empty(channels))
        self.register_buffer("running_var", torch.empty(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class ResBlock2d(nn.Module):
    """conv1(s2)-bn1-relu-conv2-bn2 plus shortcut conv3(s2)-bn3, then ReLU. Halves freq and time.

    For inference each BatchNorm is folded into the conv before it (one conv with scaled weights and a
    new bias, cached until a weight changes), which saves three passes over the largest activations
    of the model; numerics differ from conv-then-BN by float rounding only (~1e-6 relative).
    """

    def __init__(self, c_in: int, c_out: int, eps: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.bn1 = FrozenBatchNorm(c_out, eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1)
        self.bn2 = FrozenBatchNorm(c_out, eps)
        self.conv3 = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.bn3 = FrozenBatchNorm(c_out, eps)
        self._folded = DerivedCache(self._fold)

    def _fold(self) -> list[tuple[Tensor, Tensor]]:
        """(weight, bias) of conv1, conv2, conv3 with bn1, bn2, bn3 folded in."""
        out = []
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C_out,)
            out.append(
                (conv.weight * scale[:, None, None, None], (conv.bias - bn.running_mean) * scale + bn.bias)
            )
        return out

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, M, F) -> (B, C_out, ceil(M/2), ceil(F/2))
        (w1, b1), (w2, b2), (w3, b3) = self._folded(self.parameters(), self.buffers())
        y = F.conv2d(x, w1, b1, stride=2, padding=1).relu_()  # conv1 + bn1, ReLU
        y = F.conv2d(y, w2, b2, padding=1)  # conv2 + bn2
        # shortcut conv3 + bn3 computed last, so that only two full-size activations are alive at once
        return y.add_(F.conv2d(x, w3, b3, stride=2, padding=1)).relu_()


class ConvFrontEnd(nn.Module):
    def __init__(self, cfg: MusicFMConfig) -> None:
        super().__init__()
        self.block0 = ResBlock2d(1, cfg.conv_dim, cfg.batch_norm_eps)
        self.block1 = ResBlock2d(cfg.conv_dim, cfg.conv_dim, cfg.batch_norm_eps)
        # plain F.linear: for this long reduction (K = 16384) MKL beats oneDNN (bench, 2 threads)
        self.proj = nn.Linear(cfg.conv_dim * cfg.mel_bins_after_conv, cfg.encoder_dim)

    def forward(self, mel: Tensor) -> Tensor:  # (B, M, F) -> (B, T, D)
        x = self.block1(self.block0(mel.unsqueeze(1)))  # (B, C, M/4, T)
        b, c, f, t = x.shape
        x = x.permute(0, 3, 1, 2).reshape(b, t, c * f)  # channel-major flatten: index = c * f_bins + f
        return self.proj(x)


# --------------------------------------------------------------------------- conformer


class FeedForward(nn.Module):
    def __init__(self, cfg: MusicFMConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.encoder_dim, eps=cfg.layer_norm_eps)
        self.fc1 = Linear(cfg.encoder_dim, cfg.ffn_dim)
        self.fc2 = Linear(cfg.ffn_dim, cfg.encoder_dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D), half-step residual
        y = self.fc2(F.silu(self.fc1(self.norm(x)), inplace=True))  # (B, T, F) -> (B, T, D)
        return y.mul_(0.5).add_(x)  # 0.5 * y + x


class RotarySelfAttention(nn.Module):
    """MHSA with rotary embeddings applied to the attention INPUT before the q/k projections.

    v is projected from the un-rotated input. No mask, bidirectional.
    """

    def __init__(self, cfg: MusicFMConfig) -> None:
        super().__init__()
        d = cfg.encoder_dim
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.q = Linear(d, d)
        self.k = Linear(d, d)
        self.v = Linear(d, d)
        self.out = Linear(d, d)
        self._qk = DerivedCache(self._fuse_qk)

    def _fuse_qk(self) -> tuple[Tensor, Tensor]:
        """q and k read the same input: one (2D, D) matmul instead of two (D, D) ones."""
        return torch.cat((self.q.weight, self.k.weight)), torch.cat((self.q.bias, self.k.bias))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # (B, T, D); cos/sin (T, hd)
        b, t, d = x.shape
        h, hd = self.num_heads, self.head_dim
        y = self.norm(x)
        yh = y.view(b, t, h, hd)  # (B, T, H, hd)
        cos = cos.to(yh.dtype)[None, :, None, :]
        sin = sin.to(yh.dtype)[None, :, None, :]
        y1, y2 = yh[..., : hd // 2], yh[..., hd // 2 :]
        y_rot = (yh * cos + torch.cat((-y2, y1), dim=-1) * sin).view(b, t, d)
        w_qk, b_qk = self._qk(self.q.parameters(), self.k.parameters())
        q, k = linear(y_rot, w_qk, b_qk).view(b, t, 2, h, hd).permute(2, 0, 3, 1, 4)  # 2 x (B, H, T, hd)
        v = self.v(y).view(b, t, h, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd)
        return self.out(a.transpose(1, 2).reshape(b, t, d)).add_(x)


class ConvModule(nn.Module):
    def __init__(self, cfg: MusicFMConfig) -> None:
        super().__init__()
        d = cfg.encoder_dim
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.pw1 = nn.Conv1d(d, 2 * d, 1, bias=False)
        self.dw = nn.Conv1d(d, d, cfg.conv_kernel, padding=cfg.conv_kernel // 2, groups=d, bias=False)
        self.bn = FrozenBatchNorm(d, cfg.batch_norm_eps)
        self.pw2 = nn.Conv1d(d, d, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D)
        # The 1x1 convs run as matmuls on (B, T, D); the depthwise conv reads the same memory as a
        # channels-last (B, D, 1, T) image, which oneDNN handles much faster than (B, D, T) rows.
        y = F.glu(linear(self.norm(x), self.pw1.weight.squeeze(-1)), dim=-1)  # (B, T, 2D) -> (B, T, D)
        y = y.transpose(1, 2).unsqueeze(2)  # (B, D, 1, T), channels-last strides
        y = F.conv2d(y, self.dw.weight.unsqueeze(2), padding=(0, self.dw.padding[0]), groups=self.dw.groups)
        y = F.silu(self.bn(y)).squeeze(2).transpose(1, 2)  # (B, T, D)
        return linear(y, self.pw2.weight.squeeze(-1)).add_(x)


class ConformerLayer(nn.Module):
    """Macaron layer: half FFN, rotary MHSA, conv module, half FFN, LayerNorm."""

    def __init__(self, cfg: MusicFMConfig) -> None:
        super().__init__()
        self.ffn1 = FeedForward(cfg)
        self.attn = RotarySelfAttention(cfg)
        self.conv = ConvModule(cfg)
        self.ffn2 = FeedForward(cfg)
        self.final_norm = nn.LayerNorm(cfg.encoder_dim, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = self.ffn1(x)
        x = self.attn(x, cos, sin)
        x = self.conv(x)
        x = self.ffn2(x)
        return self.final_norm(x)


class Conformer(nn.Module):
    def __init__(self, cfg: MusicFMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2))  # (hd/2,)
        self.layers = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.encoder_depth))
        self.norm = nn.LayerNorm(cfg.encoder_dim, eps=cfg.layer_norm_eps)
        self._rotary_cache: dict[tuple[int, torch.device, int], tuple[Tensor, Tensor]] = {}

    def reset_buffers(self) -> None:
        hd = self.cfg.head_dim
        exponents = torch.arange(0, hd, 2, dtype=torch.int64).float() / hd
        with torch.no_grad():
            self.inv_freq.copy_(1.0 / (self.cfg.rotary_base**exponents))
        self._rotary_cache.clear()

    def clear_caches(self) -> None:
        """Forget the cached rotary tables (after ``inv_freq`` was overwritten)."""
        self._rotary_cache.clear()

    def rotary(self, t: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin tables (T, hd) in float32, cached by (length, device, buffer contents)."""
        key = (t, device, tensor_key(self.inv_freq))
        hit = self._rotary_cache.get(key)
        if hit is None:
            inv = self.inv_freq.float()
            angle = torch.outer(torch.arange(t, device=device, dtype=inv.dtype), inv)  # (T, hd/2)
            emb = torch.cat((angle, angle), dim=-1)  # (T, hd)
            hit = (emb.cos(), emb.sin())
            if len(self._rotary_cache) > 16:
                self._rotary_cache.clear()
            self._rotary_cache[key] = hit
        return hit

    def forward(self, x: Tensor, wanted: Sequence[int]) -> dict[int, Tensor]:
        """x (B, T, D) from the front end; returns {index: hidden state} for the wanted indices.

        Index 0 is the input, i in 1..L-1 the output of layer i, L the final LayerNorm of layer L's
        output. Layers past the deepest wanted index are not run.
        """
        depth = len(self.layers)
        deepest = max(wanted)
        out: dict[int, Tensor] = {}
        if 0 in wanted:
            out[0] = x
        if deepest == 0:
            return out
        cos, sin = self.rotary(x.shape[1], x.device)
        for i, layer in enumerate(self.layers[:deepest], start=1):
            x = layer(x, cos, sin)
            if i == depth:
                x = self.norm(x)
            if i in wanted:
                out[i] = x
        return out


# --------------------------------------------------------------------------- the model


class MusicFM25Hz(nn.Module):
    """MusicFM 25 Hz encoder for embedding extraction (no quantizer, no prediction head).

    Build one with :meth:`from_checkpoint` or :meth:`from_pretrained`; ``MusicFM25Hz(cfg)``
    gives a deterministic random-weight model (seeded privately; the global RNG is untouched).
    """

    def __init__(
        self,
        config: MusicFMConfig | None = None,
        mel_mean: float = 0.0,
        mel_std: float = 1.0,
        *,
        init: str = "random",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if init not in ("random", "empty"):
            raise ValueError(f"init must be 'random' or 'empty', got {init!r}")
        if not (math.isfinite(mel_mean) and math.isfinite(mel_std) and mel_std > 0):
            raise ValueError(f"mel stats must be finite with std > 0, got mean={mel_mean} std={mel_std}")
        self.config = cfg = config or MusicFMConfig()
        with torch.device("meta"):  # allocate nothing and draw no random numbers yet
            self.mel_frontend = LogMel(cfg, mel_mean, mel_std)
            self.frontend = ConvFrontEnd(cfg)
            self.encoder = Conformer(cfg)
        # like to_empty(device="cpu"), without empty_like on meta tensors (which imports sympy: ~1 s)
        self._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device="cpu"))
        self.mel_frontend.reset_buffers(cfg)
        self.encoder.reset_buffers()
        self.provenance: dict[str, str] = {"source": "random" if init == "random" else "checkpoint"}
        self._model_id: str | None = None
        if init == "random":
            self._init_random(seed)
            self.provenance["seed"] = str(seed)
        self.eval()

    # ---- construction helpers

    @torch.no_grad()
    def _init_random(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # LayerNorm / BatchNorm gamma
                p.fill_(1.0)
            else:
                fan_in = p[0].numel()
                p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
        for name, b in self.named_buffers():
            if name.endswith("running_mean"):
                b.zero_()
            elif name.endswith("running_var"):
                b.fill_(1.0)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | object,
        stats: str | dict | None = None,
        config: MusicFMConfig | str | None = None,
        *,
        map_location: str | torch.device = "cpu",
    ) -> MusicFM25Hz:
        """Load a released ``.pt`` (official key names) or a ``.safetensors`` written by
        ``python -m musicfm.convert``. ``config=None`` infers the sizes from tensor shapes.
        ``stats`` is the stats JSON (path or dict); optional for safetensors that carry it."""
        ckpt = read_checkpoint(checkpoint, stats, config)
        model = cls(ckpt.config, ckpt.mel_mean, ckpt.mel_std, init="empty")
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if ckpt.native:
            check_native_state_dict(ckpt.tensors, shapes)
            weights = ckpt.tensors
        else:
            weights = map_official_state_dict(ckpt.tensors, ckpt.config, shapes)
        model.load_weights(weights)
        model.provenance = dict(ckpt.provenance)
        return model.to(map_location) if str(map_location) != "cpu" else model

    @classmethod
    def from_pretrained(
        cls,
        name: str = "msd",
        *,
        revision: str | None = None,
        cache_dir: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
    ) -> MusicFM25Hz:
        """Fetch (or reuse from the Hugging Face cache) ``pretrained_{name}.pt`` + ``{name}_stats.json``."""
        from .hub import fetch_pretrained

        ckpt, stats = fetch_pretrained(
            name, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only
        )
        return cls.from_checkpoint(ckpt, stats)

    # ---- identity

    @property
    def mel_mean(self) -> float:
        return self.mel_frontend.mean

    @property
    def mel_std(self) -> float:
        return self.mel_frontend.std

    @property
    def is_random(self) -> bool:
        return self.provenance.get("source") == "random"

    @property
    def model_id(self) -> str:
        """Stable id: sha256 of config, mel stats and every weight (name, dtype, shape, bytes)."""
        if self._model_id is None:
            digest = fingerprint(self)
            self._model_id = ("random-" if self.is_random else "musicfm-") + digest[:20]
        return self._model_id

    @torch.no_grad()
    def load_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Copy ``state_dict`` (native keys, already checked for keys and shapes) into the model,
        then forget its id and every derived-weight cache."""
        target = self.state_dict()
        for k, v in state_dict.items():
            target[k].copy_(v.to(target[k].dtype))
        self.encoder.clear_caches()
        self._invalidate_id()

    def _invalidate_id(self) -> None:
        """Called after weights are replaced in place: forget the id and every derived-weight cache."""
        self._model_id = None
        for module in self.modules():
            for value in vars(module).values():
                if isinstance(value, DerivedCache):
                    value.clear()

    # ---- forward API

    @property
    def device(self) -> torch.device:
        return self.mel_frontend.window.device

    def _check_wav(self, wav: Tensor) -> Tensor:
        if not isinstance(wav, Tensor):
            wav = torch.as_tensor(wav)
        if wav.ndim != 2:
            raise ValueError(f"wav must be (B, N) mono audio at 24 kHz, got shape {tuple(wav.shape)}")
        if not wav.is_floating_point():
            raise ValueError(f"wav must be floating point in [-1, 1], got {wav.dtype}")
        n = wav.shape[-1]
        if n < self.config.min_samples:
            raise ValueError(
                f"input too short: {n} samples; MusicFM needs at least {self.config.min_samples} "
                f"samples ({self.config.min_samples / self.config.sample_rate * 1000:.1f} ms at "
                f"{self.config.sample_rate} Hz)"
            )
        return wav.to(self.device, non_blocking=True)

    def mel(self, wav: Tensor) -> Tensor:
        """Normalised log-mel (B, n_mels, N // hop_length), always float32."""
        return self.mel_frontend(self._check_wav(wav))

    def hidden_states(
        self, wav: Tensor, layers: Sequence[int] | None = None, *, precision: str = "fp32"
    ) -> list[Tensor]:
        """Hidden states for ``wav`` (B, N) at 24 kHz: ``encoder_depth + 1`` tensors (B, T, D),
        or only ``layers`` (in the order given). Layers past the deepest asked are not computed.

        ``precision``: "fp32" (default, reference numerics), "bf16" (CPU or CUDA autocast) or
        "fp16" (CUDA autocast). The mel and its normalisation are always float32. Outputs are
        float32 tensors on the model's device.
        """
        depth = self.config.encoder_depth
        wanted = list(range(depth + 1)) if layers is None else [int(i) for i in layers]
        if not wanted:
            raise ValueError("layers must name at least one hidden state")
        bad = [i for i in wanted if not 0 <= i <= depth]
        if bad:
            raise ValueError(f"layer indices {bad} out of range 0..{depth}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        wav = self._check_wav(wav)
        dev = wav.device
        if precision == "fp16" and dev.type != "cuda":
            raise ValueError("fp16 autocast is supported on CUDA only; use bf16 or fp32 on CPU")
        mel = self.mel_frontend(wav)  # (B, M, F) float32
        with precision_context(precision, dev):
            x = self.frontend(mel)  # (B, T, D)
            got = self.encoder(x, set(wanted))
        return [got[i].float() for i in wanted]

    def get_latent(self, wav: Tensor, layer_ix: int = 12, *, precision: str = "fp32") -> Tensor:
        """``hidden_states[layer_ix]``, as the official ``get_latent``: (B, T, D)."""
        return self.hidden_states(wav, [layer_ix], precision=precision)[0]

    def forward(self, wav: Tensor) -> list[Tensor]:
        return self.hidden_states(wav)
