"""Offline demo: a small synthetic catalog in several formats, a random-weight model, the full
pipeline into ``./demo_store``, then a similarity query.

The model has RANDOM weights (no download needed): its ``model_id`` starts with ``random-`` and
the run row records ``random_weights: true``. Similarities are therefore about signal statistics,
not music semantics — the demo shows the machinery, not MusicFM's quality.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil

import numpy as np
import soundfile as sf

from musicfm import MusicFM25Hz, MusicFMConfig
from musicfm.checkpoint import save_safetensors

DEMO_CONFIG = MusicFMConfig(encoder_dim=128, encoder_depth=4, conv_dim=32, num_heads=4, ffn_dim=256)
SR = 44100


def _tone(freqs: list[float], seconds: float, seed: int, beat_hz: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6.28)) / (i + 1) for i, f in enumerate(freqs))
    if beat_hz:
        env = np.exp(-12 * ((t * beat_hz) % 1.0))
        x = x * 0.6 + env * rng.standard_normal(t.shape) * 0.8
    x = x + 0.01 * rng.standard_normal(t.shape)
    return (0.25 * x / np.max(np.abs(x))).astype(np.float32)


def write_catalog(root: str) -> str:
    """Eight short tracks (wav/flac/ogg/mp3, mono and stereo) and a catalog.csv; returns its path."""
    audio = os.path.join(root, "audio")
    os.makedirs(audio, exist_ok=True)
    tracks = [
        ("a_minor_pad", "A minor pad", "ambient", [220.0, 261.6, 329.6], 0.0, "flac"),
        ("c_major_pad", "C major pad", "ambient", [261.6, 329.6, 392.0], 0.0, "ogg"),
        ("kick_loop", "Kick loop", "techno", [55.0], 2.0, "wav"),
        ("fast_kicks", "Fast kicks", "techno", [60.0], 3.0, "mp3"),
        ("high_bells", "High bells", "chime", [1760.0, 2217.0, 2637.0], 0.0, "wav"),
        ("bass_drone", "Bass drone", "drone", [41.2, 82.4], 0.0, "flac"),
    ]
    rows = []
    for k, (tid, title, genre, freqs, beat, fmt) in enumerate(tracks):
        x = _tone(freqs, 12.0 + 3 * k, seed=k, beat_hz=beat)
        data = np.stack([x, 0.8 * x], 1) if k % 2 else x
        path = os.path.join(audio, f"{tid}.{fmt}")
        sf.write(path, data, SR, format={"flac": "FLAC", "ogg": "OGG", "wav": "WAV", "mp3": "MP3"}[fmt])
        rows.append({"track_id": tid, "uri": f"audio/{tid}.{fmt}", "title": title, "genre": genre})
    # A re-encoded, quieter copy of one track: search should find its source first.
    x, _ = sf.read(os.path.join(audio, "kick_loop.wav"), dtype="float32")
    sf.write(os.path.join(audio, "kick_loop_copy.ogg"), 0.5 * x, 32000, format="OGG")
    rows.append(
        {
            "track_id": "kick_loop_copy",
            "uri": "audio/kick_loop_copy.ogg",
            "title": "Kick loop (quiet copy)",
            "genre": "techno",
        }
    )
    # And one broken file, to show how failures are recorded.
    with open(os.path.join(audio, "broken.flac"), "wb") as f:
        f.write(b"fLaC\x00\x00\x00\x22 not really audio")
    rows.append({"track_id": "broken", "uri": "audio/broken.flac", "title": "Broken file", "genre": "none"})
    catalog = os.path.join(root, "catalog.csv")
    with open(catalog, "w", newline="") as f:
        w = csv.DictWriter(f, ["track_id", "uri", "title", "genre"])
        w.writeheader()
        w.writerows(rows)
    return catalog


def write_model(root: str) -> str:
    """A deterministic random-weight model saved as safetensors (stats and config inside)."""
    path = os.path.join(root, "random_musicfm_small.safetensors")
    save_safetensors(MusicFM25Hz(DEMO_CONFIG, mel_mean=6.77, mel_std=18.42, seed=0), path)
    return path


def run_demo(args: argparse.Namespace) -> int:
    from pipeline.runs.embed import run_embed
    from pipeline.runs.settings import embed_job_from_args

    root = os.path.abspath(args.demo_dir)
    inputs = os.path.join(root, "_inputs")
    if os.path.isdir(inputs):
        shutil.rmtree(inputs)
    os.makedirs(inputs)
    catalog = write_catalog(inputs)
    model_path = write_model(inputs)
    print(f"demo: catalog {catalog} (8 rows in 4 formats, one broken on purpose)")
    print(
        f"demo: RANDOM-WEIGHT model {model_path} (no download; vectors show the machinery, not MusicFM quality)"
    )
    args.catalog, args.output = catalog, root
    args.checkpoint, args.stats, args.model_config = model_path, None, None
    if tuple(args.layers) == (7, 12):
        args.layers = (2, 4)
    if args.window_s is None and args.profile is None:
        args.window_s = 10.0
    job = embed_job_from_args(args)
    report = run_embed(job, progress=not args.no_progress)
    print(report.summary())
    from pipeline.search.reader import open_store

    store = open_store(root)
    layer = max(job.layers)
    hits = store.search("kick_loop_copy", layer=layer, k=3)
    print(f"\ntracks most similar to 'kick_loop_copy' (layer {layer}, cosine):")
    for h in hits:
        print(f"  {h.rank}. {h.score:.4f}  {h.track_id:<16} {h.metadata.get('title') or ''}")
    print(
        "\ntry:  .venv/bin/python jobs/search.py --store demo_store --track-id a_minor_pad -k 3 --layer "
        f"{layer}"
    )
    summary = {
        "store": root,
        "run_id": report.run_id,
        "tracks_ok": report.tracks_ok,
        "tracks_failed": report.tracks_failed,
        "top_hit": hits[0].track_id if hits else None,
    }
    print("demo: " + json.dumps(summary))
    return 0 if report.status == "ok" else 3
