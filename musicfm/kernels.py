"""Inference kernels of :mod:`musicfm.model`: the CPU matmul through oneDNN, caches of tensors
derived from weights, and the autocast / TF32 settings of each precision.

Kept apart from the model file so that it reads as the architecture; nothing here changes the
numerics of :mod:`musicfm.model` (the code was moved, not rewritten).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PRECISIONS",
    "DerivedCache",
    "Linear",
    "autocast_off",
    "linear",
    "precision_context",
    "tensor_key",
]

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def autocast_off(device: torch.device) -> Iterator[None]:
    """Autocast off on ``device`` for the block (a no-op when it is not on)."""
    if torch.is_autocast_enabled(device.type):
        with torch.autocast(device.type, enabled=False):
            yield
    else:
        yield


# --------------------------------------------------------------------------- CPU matmul


# oneDNN's matmul (what torch.compile uses for CPU linears) runs the fp32 Conformer GEMMs ~15 % faster
# than the default MKL sgemm on the AMD EPYC we benchmark on (bench/model_forward.py); same fp32 math,
# another summation order (~1e-6 relative). MUSICFM_CPU_LINEAR=mkl switches back to F.linear.
_ONEDNN_LINEAR = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and os.environ.get("MUSICFM_CPU_LINEAR", "onednn").lower() != "mkl"
)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, through oneDNN for CPU float32 inference (no autocast, no autograd)."""
    if (
        _ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()  # inductor picks its own GEMM (and needs F.linear here)
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) that calls :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def tensor_key(t: Tensor) -> tuple:
    """Identity of a tensor's current contents: storage, in-place version (inference tensors have none)."""
    return (t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.device)


class DerivedCache:
    """Inference-time tensors computed from parameters/buffers (e.g. BatchNorm folded into a conv).

    ``cache(*sources)`` returns ``build()``, rebuilt when any source tensor changes (in-place update,
    ``.to()``, dtype) or after :meth:`clear`. With autograd on and a source requiring grad, it is built
    fresh on every call so gradients still reach the parameters.
    """

    def __init__(self, build: Callable[[], Any]) -> None:
        self.build = build
        self.clear()

    def clear(self) -> None:
        self.key: tuple | None = None
        self.value: Any = None

    def __call__(self, *sources: Iterable[Tensor]) -> Any:
        tensors = [t for group in sources for t in group]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return self.build()
        key = tuple(tensor_key(t) for t in tensors)
        if key != self.key:
            with torch.inference_mode(False), torch.no_grad(), autocast_off(tensors[0].device):
                self.value = self.build()
            self.key = key
        return self.value


@contextlib.contextmanager
def precision_context(precision: str, dev: torch.device) -> Iterator[None]:
    """The numerics of a forward at ``precision`` on ``dev``: "fp32" turns autocast (and TF32 on
    CUDA) off; "bf16" / "fp16" autocast to that dtype."""
    if precision == "fp32":
        if dev.type == "cuda":  # reference numerics: no TF32 in convolutions or matmuls
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            try:
                with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), autocast_off(dev):
                    yield
            finally:
                torch.backends.cuda.matmul.allow_tf32 = prev
        else:
            with autocast_off(dev):
                yield
    else:
        with torch.autocast(dev.type, dtype=_AUTOCAST_DTYPES[precision]):
            yield
