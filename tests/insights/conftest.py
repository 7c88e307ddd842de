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

from pipeline.runs.embed import run_embed
from pipeline.runs.settings import EmbedJob
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


def write_catalog(
    folder: Path, gain: bool = True, variants: bool = True, only: set[str] | None = None
) -> tuple[Path, dict[str, str]]:
    """Clips (``only`` these, if given; + variants, + gain copies) copied under ``folder`` with a
    catalog; returns the catalog path and {copy track_id: source track_id}."""
    rows, sources = [], {}
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    for r in read_catalog():
        if only is not None and r["track_id"] not in only:
            continue
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


# --------------------------------------------------------------------------- synthetic stores


def planted_store(
    root: Path,
    n: int = 600,
    dim: int = 32,
    layers: tuple[int, ...] = (6, 12),
    pairs: int = 20,
    triples: int = 5,
    noise: float = 0.02,
    seed: int = 0,
    model_id: str = "musicfm-synthetic",
) -> tuple[Path, list[set[str]]]:
    """A store of ``n`` clustered tracks (``write_synthetic_store``) plus planted near-copies:
    ``pairs`` tracks with one copy and ``triples`` with two; copies are the source vector plus
    noise of norm ~``noise``. Returns the root and the planted groups (sets of track ids)."""
    import lance

    from pipeline.search.synthetic import tracks_table, write_synthetic_store

    syn = write_synthetic_store(
        str(root), n_tracks=n, layers=layers, dim=dim, clusters=12, seed=seed, model_id=model_id
    )
    rng = np.random.default_rng(seed + 99)
    src = rng.choice(n, pairs + triples, replace=False)
    ids, vecs, groups = [], {ix: [] for ix in layers}, []
    for j, i in enumerate(src):
        g = {syn.track_ids[i]}
        for c in range(1 if j < pairs else 2):
            tid = f"copy{j:03d}_{c}"
            ids.append(tid)
            g.add(tid)
            for ix in layers:
                v = syn.track_vectors[ix][i] + noise / np.sqrt(dim) * rng.standard_normal(dim).astype(
                    np.float32
                )
                vecs[ix].append(v / np.linalg.norm(v))
        groups.append(g)
    meta = {"title": [f"Copy {t}" for t in ids], "artist": ["copy"] * len(ids), "genre": ["copy"] * len(ids)}
    tbl = tracks_table(
        ids, {ix: np.stack(v).astype(np.float32) for ix, v in vecs.items()}, meta, model_id=model_id
    )
    lance.write_dataset(tbl, str(root / "tracks.lance"), mode="append")
    return root, groups
