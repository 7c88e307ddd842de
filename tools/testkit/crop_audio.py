"""Cropped, padded and gain-changed copies of the shared clips, cut with soundfile.

Used by the alignment tests (``tests/insights/test_align.py``) and the crop part of
``bench/intelligence.py``. A :class:`Cut` says which part of its source a copy holds: the copy's
time ``t`` is the source's time ``t + offset_s`` (a crop of the first 3 s: ``offset_s = 3``; a
copy with 2 s of lead-in before the source: ``offset_s = -2``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf


@dataclass(frozen=True)
class Cut:
    """A copy of ``source``: ``[start_frac, end_frac]`` of it (fractions of its duration), after
    ``lead_in_s`` seconds of quiet noise (-60 dBFS), scaled by ``gain_db``."""

    copy_id: str
    source: str
    start_frac: float = 0.0
    end_frac: float = 1.0
    lead_in_s: float = 0.0
    gain_db: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.start_frac < self.end_frac <= 1.0:
            raise ValueError(f"{self.copy_id}: need 0 <= start_frac < end_frac <= 1")
        if self.lead_in_s < 0:
            raise ValueError(f"{self.copy_id}: lead_in_s must be >= 0")

    @property
    def fraction(self) -> float:
        """Share of the source the copy holds."""
        return self.end_frac - self.start_frac


@dataclass(frozen=True)
class Planted:
    """A written copy: its id, source, the true offset (copy time + offset = source time), its
    duration and the share of the source it holds."""

    copy_id: str
    source: str
    offset_s: float
    duration_s: float
    fraction: float
    kind: str


def write_cut(src: Path, dst: Path, cut: Cut, seed: int = 0) -> Planted:
    """Write ``cut`` of the audio file ``src`` to ``dst`` (float WAV at the source's rate)."""
    x, sr = sf.read(str(src), dtype="float32", always_2d=True)  # (n, channels)
    n = len(x)
    a, b = int(round(cut.start_frac * n)), int(round(cut.end_frac * n))
    y = x[a:b] * np.float32(10 ** (cut.gain_db / 20))
    lead = int(round(cut.lead_in_s * sr))
    if lead:
        noise = np.random.default_rng(seed).standard_normal((lead, x.shape[1])).astype(np.float32) * 1e-3
        y = np.concatenate([noise, y])
    sf.write(str(dst), y, sr, subtype="FLOAT")
    kind = "gain" if cut.gain_db else ("lead-in" if lead else _crop_kind(cut))
    return Planted(cut.copy_id, cut.source, a / sr - lead / sr, len(y) / sr, cut.fraction, kind)


def _crop_kind(cut: Cut) -> str:
    if cut.start_frac > 0 and cut.end_frac < 1:
        return "crop-both"
    return "crop-start" if cut.start_frac > 0 else ("crop-end" if cut.end_frac < 1 else "copy")


def crop_plan(sources: list[str], fractions: tuple[float, ...], seed: int = 0) -> list[Cut]:
    """For each source and fraction one crop, its position cycling start / end / both sides
    (with an uneven split, so no cut falls on a window boundary); plus, per source, a lead-in
    copy (1.3-4.1 s of quiet noise before the whole source)."""
    rng = np.random.default_rng(seed)
    cuts: list[Cut] = []
    for i, s in enumerate(sources):
        for j, f in enumerate(fractions):
            where = (i + j) % 3
            if where == 0:  # the first part cut off
                a = 1.0 - f
            elif where == 1:  # the last part cut off
                a = 0.0
            else:  # both sides
                a = float(rng.uniform(0.15, 0.85)) * (1.0 - f)
            cuts.append(Cut(f"{s}__c{int(round(f * 100)):02d}_{j}", s, a, min(1.0, a + f)))
        cuts.append(Cut(f"{s}__lead", s, lead_in_s=float(rng.uniform(1.3, 4.1))))
    return cuts


def write_copies(audio: Path, folder: Path, cuts: list[Cut]) -> tuple[list[dict[str, str]], list[Planted]]:
    """Cut every copy from the shared clips (``audio``: the shared audio folder) into
    ``folder/copies``; returns the catalog rows of the copies and what was planted."""
    with open(audio / "catalog.csv", newline="") as f:
        uris = {r["track_id"]: r["uri"] for r in csv.DictReader(f)}
    (folder / "copies").mkdir(parents=True, exist_ok=True)
    rows, planted = [], []
    for k, c in enumerate(cuts):
        uri = f"copies/{c.copy_id}.wav"
        planted.append(write_cut(audio / uris[c.source], folder / uri, c, seed=k))
        rows.append({"track_id": c.copy_id, "uri": uri, "title": planted[-1].kind, "artist": "copy"})
    return rows, planted
