"""Stores for the insights tests, built through the embed job's own functions (``run_embed``, real
Ray and Lance) with the small random-weight golden model, on the shared real clips.

``clip_store``: the 12 clips of ``shared/audio/catalog.csv`` plus the 4 transformed variants
(re-encode, crop, downmix, resample) and two gain copies made here (+6 dB and -6 dB, written with
soundfile), embedded once per session with 5 s windows at a 2.5 s hop (layers 1 and 3).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.embed import EmbedJob, run_embed
from tests.conftest import AUDIO, GOLDEN

LAYERS = (1, 3)
WINDOW_S, HOP_S = 5.0, 2.5
# (copy, source, gain dB): made with soundfile from the source's decoded samples
GAIN_COPIES = [("hw_fruit_plus6db", "hw_fruit", 6.0), ("lc_lincity_minus6db", "lc_lincity", -6.0)]


def read_catalog() -> list[dict[str, str]]:
    with open(AUDIO / "catalog.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_variants() -> list[dict[str, str]]:
    with open(AUDIO / "variants.csv", newline="") as f:
        return list(csv.DictReader(f))


def gain_copy(src: Path, dst: Path, gain_db: float) -> None:
    """``src`` scaled by ``gain_db`` (float WAV, so +6 dB does not clip)."""
    x, sr = sf.read(str(src), dtype="float32", always_2d=True)
    sf.write(str(dst), x * np.float32(10 ** (gain_db / 20)), sr, subtype="FLOAT")


def write_catalog(folder: Path, gain: bool = True, variants: bool = True) -> tuple[Path, dict[str, str]]:
    """Clips (+ variants, + gain copies) copied under ``folder`` with a catalog; returns the
    catalog path and {copy track_id: source track_id}."""
    rows, sources = [], {}
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    for r in read_catalog():
        shutil.copy(AUDIO / r["uri"], folder / r["uri"])
        rows.append({"track_id": r["track_id"], "uri": r["uri"], "title": r["title"], "artist": r["artist"]})
    if variants:
        (folder / "variants").mkdir(exist_ok=True)
        for v in read_variants():
            tid = Path(v["variant_uri"]).stem
            shutil.copy(AUDIO / v["variant_uri"], folder / v["variant_uri"])
            rows.append(
                {"track_id": tid, "uri": v["variant_uri"], "title": f"{v['transform']}", "artist": "copy"}
            )
            sources[tid] = v["source_track_id"]
    if gain:
        uris = {r["track_id"]: r["uri"] for r in read_catalog()}
        for tid, src, db in GAIN_COPIES:
            gain_copy(AUDIO / uris[src], folder / "clips" / f"{tid}.wav", db)
            rows.append(
                {"track_id": tid, "uri": f"clips/{tid}.wav", "title": f"gain {db:+g} dB", "artist": "copy"}
            )
            sources[tid] = src
    cat = folder / "catalog.csv"
    with open(cat, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["track_id", "uri", "title", "artist"])
        w.writeheader()
        w.writerows(rows)
    return cat, sources


def embed(catalog: Path, out: Path, **kw) -> None:
    job = EmbedJob(
        catalog=str(catalog),
        output=str(out),
        checkpoint=str(GOLDEN / "checkpoint.pt"),
        stats=str(GOLDEN / "stats.json"),
        layers=LAYERS,
        precision="fp32",
        window_s=kw.pop("window_s", WINDOW_S),
        hop_s=kw.pop("hop_s", HOP_S),
        batch_size=8,
        decode_cpus=2,
        **kw,
    )
    report = run_embed(job, progress=False)
    assert report.status == "ok" and report.tracks_failed == 0, report


@pytest.fixture(scope="session")
def clip_store(ray_cluster, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(store root, {copy: source}) for clips + variants + gain copies."""
    root = tmp_path_factory.mktemp("insights_clips")
    cat, sources = write_catalog(root / "audio")
    embed(cat, root / "store")
    return root / "store", sources
