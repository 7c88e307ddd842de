"""Facts about the device the model runs on, and the choices made from them.

* :func:`cpu_bf16_units`: whether this CPU has bf16 matrix units (AMX-BF16, AVX512-BF16), read
  from ``/proc/cpuinfo`` flags. ``--precision auto`` is fp32 on every CPU (bf16 on AMX is
  unmeasured; the figures are in ``docs/sizing_decode.md``); bf16 on CPU is opt-in.
  :func:`require_cpu_bf16`: an explicit ``--precision bf16`` is refused on a CPU without bf16 units
  (``MUSICFM_CPU_FLAGS`` replaces the flags read, to simulate another CPU).
* :func:`batch_from_memory` / :func:`auto_batch_size`: windows per model call from the free GPU
  memory and the measured memory of one window (CUDA); the CPU default otherwise.
* :func:`sdpa_backends`: which ``scaled_dot_product_attention`` kernel the model really runs
  (flash, memory-efficient, cuDNN, math, or the CPU flash kernel), read from the profiler.
* :func:`compile_model`: ``torch.compile`` of the front end and the encoder, in place.

torch is imported inside the functions: decode workers import this package without it.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from musicfm import MusicFM25Hz

__all__ = [
    "CPU_BF16_REFUSAL",
    "CPU_DEFAULT_BATCH",
    "CPU_FLAGS_ENV",
    "auto_batch_size",
    "batch_from_memory",
    "compile_model",
    "cpu_bf16_units",
    "require_cpu_bf16",
    "sdpa_backends",
    "window_bytes",
]

CPU_DEFAULT_BATCH = 8
# Largest batch chosen from memory: beyond this a GPU is saturated and latency only grows.
MAX_AUTO_BATCH = 256
# Share of the free GPU memory a batch may fill (allocator fragmentation, cuBLAS workspaces).
MEMORY_FRACTION = 0.8

_SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_flash_attention_forward": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_efficient_attention_forward": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash_cpu",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused",
}


# --------------------------------------------------------------------------- CPU bf16


def _cpuinfo_flags(text: str) -> frozenset[str]:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


#: Environment variable that replaces this CPU's flags (space-separated, as in ``/proc/cpuinfo``):
#: how tests simulate a CPU without bf16 units, in this process and in the Ray workers it starts.
CPU_FLAGS_ENV = "MUSICFM_CPU_FLAGS"


@functools.lru_cache(maxsize=1)
def _proc_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return _cpuinfo_flags(f.read())
    except OSError:  # not Linux: no flags, so no bf16 by default
        return frozenset()


def _host_flags() -> frozenset[str]:
    forced = os.environ.get(CPU_FLAGS_ENV)
    return frozenset(forced.split()) if forced is not None else _proc_flags()


def cpu_bf16_units(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The bf16 matrix units of this CPU: a subset of ``("amx_bf16", "avx512_bf16")``.

    ``cpuinfo``: text of ``/proc/cpuinfo`` (default: this machine's).
    """
    flags = _host_flags() if cpuinfo is None else _cpuinfo_flags(cpuinfo)
    return tuple(u for u in ("amx_bf16", "avx512_bf16") if u in flags)


#: Why ``--precision bf16`` is refused on a CPU without bf16 units (one line).
CPU_BF16_REFUSAL = (
    "--precision bf16: this CPU has no bf16 units (AVX512-BF16 or AMX-BF16), where bf16 runs on slow "
    "reference kernels (minutes per track with the full-size model); use --precision fp32, or auto "
    "(bf16 only where it was measured faster)"
)


def require_cpu_bf16(cpuinfo: str | None = None) -> None:
    """Raise ``ValueError`` (:data:`CPU_BF16_REFUSAL`) unless this CPU has bf16 units
    (:func:`cpu_bf16_units`): the model would run bf16 on CPU here."""
    if not cpu_bf16_units(cpuinfo):
        raise ValueError(CPU_BF16_REFUSAL)


# --------------------------------------------------------------------------- batch size


def batch_from_memory(
    free_bytes: int,
    per_window_bytes: int,
    fixed_bytes: int = 0,
    fraction: float = MEMORY_FRACTION,
    cap: int = MAX_AUTO_BATCH,
) -> int:
    """Windows per call that fit in ``fraction`` of ``free_bytes``: at least 1, at most ``cap``,
    rounded down to a multiple of 8 from 8 up (tensor-core friendly shapes)."""
    if per_window_bytes <= 0:
        raise ValueError(f"per_window_bytes must be > 0, got {per_window_bytes}")
    room = free_bytes * fraction - fixed_bytes
    b = max(1, min(cap, math.floor(room / per_window_bytes)))
    return b - b % 8 if b >= 8 else b


def window_bytes(
    model: MusicFM25Hz, n_samples: int, precision: str, layers: Sequence[int]
) -> tuple[int, int]:
    """(per-window, fixed) peak bytes of one model call on CUDA, measured with batches 1 and 2
    of ``n_samples`` zeros (the slope is the memory of one more window)."""
    import torch

    dev = model.device
    if dev.type != "cuda":
        raise ValueError("window_bytes measures CUDA memory; the model is on " + str(dev))
    peaks = []
    with torch.inference_mode():
        for b in (1, 2):
            x = torch.zeros((b, n_samples), device=dev)  # (b, N)
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            model.hidden_states(x, layers, precision=precision)
            torch.cuda.synchronize(dev)
            peaks.append(torch.cuda.max_memory_allocated(dev) - base)
            del x
    per = max(1, peaks[1] - peaks[0])
    return per, max(0, peaks[0] - per)


def auto_batch_size(model: MusicFM25Hz, n_samples: int, precision: str, layers: Sequence[int]) -> int:
    """Batch size when none is given: :data:`CPU_DEFAULT_BATCH` off CUDA; on CUDA the most
    windows of ``n_samples`` that fit in the free memory (:func:`batch_from_memory`)."""
    import torch

    dev = model.device
    if dev.type != "cuda":
        return CPU_DEFAULT_BATCH
    per, fixed = window_bytes(model, n_samples, precision, layers)
    free, _total = torch.cuda.mem_get_info(dev)
    # two input batches are in flight while one computes (the copy of the next overlaps)
    return batch_from_memory(free, per + 2 * 4 * n_samples, fixed)


# --------------------------------------------------------------------------- SDPA and compile


def sdpa_backends(model: MusicFM25Hz, precision: str = "fp32", n_samples: int = 48000) -> set[str]:
    """Names of the attention kernels one forward of ``model`` runs at ``precision``: a subset
    of flash / efficient / cudnn / math (CUDA), flash_cpu / math (CPU), read from the profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    x = torch.zeros((1, n_samples), device=model.device)  # (1, N)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model.hidden_states(x, [model.config.encoder_depth], precision=precision)
    return {_SDPA_OPS[e.key] for e in prof.key_averages() if e.key in _SDPA_OPS}


def compile_model(model: MusicFM25Hz, mode: str | None = None, backend: str = "inductor") -> MusicFM25Hz:
    """``torch.compile`` the conv front end and the encoder in place (state-dict keys unchanged;
    the mel stays eager). The first call of each new input length compiles (seconds to minutes:
    77 s for the small golden model on 2 CPU cores). Compiling again replaces the wrapper."""
    model.frontend.compile(mode=mode, backend=backend)
    model.encoder.compile(mode=mode, backend=backend)
    return model


def describe(device: torch.device) -> str:
    """One line naming the device (GPU name and memory, or CPU bf16 units)."""
    import torch

    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB)"
    units = ", ".join(cpu_bf16_units()) or "no bf16 units"
    return f"CPU ({units})"
