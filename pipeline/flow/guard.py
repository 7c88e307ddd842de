"""What the model stage does when the model fails or misbehaves: a fault of the system stops the
run (:class:`pipeline.errors.ModelError`), a bad input becomes an error row.

::

    a batch fails ── out of memory ─────────▶ halve the batch size (down to 1) and run it again
                 ── a bug in our code ───────▶ ModelError (TypeError, AttributeError, ...)
                 ── a device fault ──────────▶ ModelError (CUDA / cuDNN / cuBLAS errors)
                 ── anything else ───────────▶ each window alone: the ones that still fail are
                                               error rows, unless every window of the batch fails
                                               the same way, or the actor's first windows all
                                               fail the same way, or MAX_FAILURES_IN_ROW windows
                                               fail one after the other: ModelError
    a window's output has NaN/Inf ───────────▶ an error row (``non_finite_output``), unless most
                                               windows so far have: ModelError (a broken
                                               checkpoint or device, not a bad catalog)

:func:`check_finite_table` is the last check before a table of vectors is written: a non-finite
value reaching it is a bug, and stops the run.

A :class:`ModelError` carries its cause in its message (``"... : RuntimeError: ..."``) and is raised
``from None``: the run's one-line reason (:func:`pipeline.errors.root_cause`) is then the
ModelError, not the exception it was sorted from.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline.errors import ModelError, NonFiniteOutput, one_line, redact
from pipeline.schemas import parse_layer_column

if TYPE_CHECKING:
    from pipeline.engine.inference import WindowEmbedder, WindowResult

log = logging.getLogger("musicfm.model")

#: Exceptions that are bugs in our code, never one input's fault.
CODE_ERRORS: tuple[type[BaseException], ...] = (
    TypeError,
    AttributeError,
    NameError,
    KeyError,
    IndexError,
    AssertionError,
    ImportError,
    NotImplementedError,
)

#: Windows failing alone one after the other (no success between them) before the run stops.
MAX_FAILURES_IN_ROW = 8

#: Non-finite windows (at least this many, and more than this share of all windows seen by one
#: model actor) that make a broken model, not bad inputs.
NON_FINITE_MIN_WINDOWS = 2
NON_FINITE_MAX_SHARE = 0.5

_DEVICE_FAULT_MARKERS = ("cuda error", "cudnn", "cublas", "device-side assert", "nccl", "hip error")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device (or host) ran out of memory."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is there wherever a model runs
        pass
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def is_device_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is a fault of the accelerator (it persists: retrying the inputs is useless)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _DEVICE_FAULT_MARKERS)


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return one_line(redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__), 500)


def non_finite_layers(res: WindowResult) -> list[int]:
    """The layers whose pooled vector or frames of ``res`` hold a NaN or an Inf."""
    bad = [lay for lay, v in res.means.items() if not np.isfinite(v).all()]
    for lay, f in (res.frames or {}).items():
        if lay not in bad and not np.isfinite(f).all():
            bad.append(lay)
    return sorted(bad)


class ModelGuard:
    """Runs windows through a :class:`~pipeline.engine.inference.WindowEmbedder` and applies the
    rules of this module. One per model actor: its counters span the actor's batches."""

    def __init__(self, embedder: WindowEmbedder) -> None:
        self.embedder = embedder
        self.failures_in_row = 0
        self.windows_ok = 0  # windows the model computed (finite or not)
        self.last_failure = ""
        self.same_failures_in_row = 0
        self.windows_seen = 0
        self.windows_non_finite = 0

    def run(self, audio: Sequence[np.ndarray]) -> list[WindowResult | BaseException]:
        """One outcome per window of ``audio`` (in order): its result, or the exception that makes
        it an error row. Raises :class:`ModelError` for a fault of the system."""
        if not audio:
            return []
        return [self._check(o) for o in self._attempt(audio)]

    def _attempt(self, audio: Sequence[np.ndarray]) -> list[WindowResult | BaseException]:
        try:
            out: list[WindowResult | BaseException] = list(self.embedder.embed(audio))
        except Exception as e:  # sorted below: a fault of the system raises, a bad input is an outcome
            return self._recover(audio, e)
        self.failures_in_row = self.same_failures_in_row = 0
        self.windows_ok += len(out)
        return out

    def _recover(self, audio: Sequence[np.ndarray], exc: Exception) -> list[WindowResult | BaseException]:
        n = len(audio)
        if isinstance(exc, CODE_ERRORS):
            raise ModelError(f"the model stage hit a bug: {_line(exc)}") from None
        if is_out_of_memory(exc):
            return self._smaller_batches(audio, exc)
        if is_device_fault(exc):
            raise ModelError(f"device fault in the model stage: {_line(exc)}") from None
        if n == 1:
            line = _line(exc)
            self.failures_in_row += 1
            self.same_failures_in_row = self.same_failures_in_row + 1 if line == self.last_failure else 1
            self.last_failure = line
            if not self.windows_ok and self.same_failures_in_row >= 2:
                raise ModelError(
                    f"the model's first {self.same_failures_in_row} windows failed the same way, each "
                    f"alone: {line}"
                ) from None
            if self.failures_in_row >= MAX_FAILURES_IN_ROW:
                raise ModelError(
                    f"{self.failures_in_row} windows in a row failed in the model, each alone: {_line(exc)}"
                ) from None
            log.warning("model: one window failed alone and becomes an error row: %s", _line(exc))
            return [exc]
        outs = [self._attempt([a])[0] for a in audio]  # one by one: isolate the bad input
        failed = [o for o in outs if isinstance(o, BaseException)]
        if len(failed) == n and len({_line(f) for f in failed}) == 1:
            raise ModelError(
                f"every window of a batch of {n} failed, alone too, with the same error: {_line(failed[0])}"
            ) from None
        return outs

    def _smaller_batches(
        self, audio: Sequence[np.ndarray], exc: Exception
    ) -> list[WindowResult | BaseException]:
        cur = min(self.embedder.max_batch, len(audio))
        if cur <= 1:
            raise ModelError(
                f"out of memory with one window per model call: {_line(exc)} "
                "(use a shorter --window-s, another --precision, or a device with more memory)"
            ) from None
        self.embedder.max_batch = cur // 2
        log.warning("model: out of memory at %d windows per call; retrying at %d", cur, cur // 2)
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass
        return self._attempt(audio)

    def _check(self, outcome: WindowResult | BaseException) -> WindowResult | BaseException:
        if isinstance(outcome, BaseException):
            return outcome
        self.windows_seen += 1
        bad = non_finite_layers(outcome)
        if not bad:
            return outcome
        self.windows_non_finite += 1
        nf, seen = self.windows_non_finite, self.windows_seen
        if nf >= NON_FINITE_MIN_WINDOWS and nf > NON_FINITE_MAX_SHARE * seen:
            raise ModelError(
                f"the model produced NaN/Inf for {nf} of {seen} windows: the checkpoint or the device "
                "is broken (nothing non-finite was stored)"
            )
        return NonFiniteOutput(f"the model's output for this window has NaN/Inf values (layers {bad})")


def check_finite_table(tbl: pa.Table, what: str) -> None:
    """Raise :class:`ModelError` when a vector column (``layer_*``) of ``tbl`` holds a NaN or an
    Inf: the last check before ``what`` is written (the model stage turns such windows into error
    rows, so reaching this is a bug)."""
    for name in tbl.column_names:
        if parse_layer_column(name) is None:
            continue
        col = tbl.column(name)
        for chunk in col.chunks:
            values = chunk.flatten() if hasattr(chunk, "flatten") else chunk
            arr = values.to_numpy(zero_copy_only=False)
            if arr.size and not np.isfinite(arr).all():
                raise ModelError(f"non-finite values in {what}.{name} before the write (nothing was written)")
