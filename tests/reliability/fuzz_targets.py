"""Decode targets that misbehave on purpose, to prove the fuzz harness isolates crashes and hangs
(kept free of heavy imports: the harness restarts its worker after each crash)."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

from pipeline.io.audio import decode_audio


def misbehaving_decode(path: str, limits=None, deadline_s: float | None = None):
    head = Path(path).read_bytes()[:4]
    if head == b"SEGV":
        ctypes.string_at(0)  # a real segmentation fault in C
    if head == b"ABRT":
        os.abort()
    if head == b"HANG":
        time.sleep(3600)
    if head == b"OOM!":
        return bytearray(1 << 40)  # MemoryError under the worker's RLIMIT_AS
    return decode_audio(path, limits, deadline_s=deadline_s)
