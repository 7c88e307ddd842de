"""Loudness normalisation before the model (``--loudness-target-db``): ±6 dB copies of real clips
come (much) closer to their sources and are grouped with them as near-duplicates.

Measured here (small random-weight golden model, 5 s windows, 2.5 s hop; printed by
``test_gain_copies_come_closer_with_loudness_normalisation``) as the cosine distance
``1 - cos(copy, source)`` of the track vectors, without -> with normalisation to -20 dBFS RMS:
see docs/insights.md for the figures.
"""

from __future__ import annotations

import hashlib
import json

import lance
import numpy as np
import pytest

from jobs.embed_catalog import build_parser
from pipeline.engine.inference import EmbedSettings, normalize_loudness
from pipeline.insights.duplicates import find_duplicates
from tests.insights.conftest import GAIN_COPIES, embed, write_catalog

TARGET_DB = -20.0
SOURCES = {src for _, src, _ in GAIN_COPIES}
OTHERS = {"hw_city", "hw_rock", "fb_introzik", "lc_city_blues"}


def track_vectors(store, layer: int) -> dict[str, np.ndarray]:
    t = lance.dataset(str(store / "tracks.lance")).to_table(columns=["track_id", f"layer_{layer}"])
    return {r["track_id"]: np.asarray(r[f"layer_{layer}"], np.float64) for r in t.to_pylist()}


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def loud_store(ray_cluster, tmp_path_factory):
    """The two gain copies, their sources and four other clips, embedded with normalisation."""
    root = tmp_path_factory.mktemp("loud")
    cat, sources = write_catalog(root / "audio", variants=False, only=SOURCES | OTHERS)
    embed(cat, root / "store", loudness_target_db=TARGET_DB)
    return root / "store", sources


def test_settings_id_changes_only_when_loudness_is_set() -> None:
    s = EmbedSettings(layers=(7, 12))
    old_payload = {"model_id": "m", "layers": [7, 12], "window_s": 30.0, "hop_s": 30.0, "frames_hz": None,
                   "precision": "fp32"}  # fmt: skip  # the fingerprint's fields before this option
    old = "s-" + hashlib.sha256(json.dumps(old_payload, sort_keys=True).encode()).hexdigest()[:16]
    assert s.settings_id("m") == old
    loud = EmbedSettings(layers=(7, 12), loudness_target_db=-20.0)
    assert loud.settings_id("m") != old
    assert loud.settings_id("m") != EmbedSettings(layers=(7, 12), loudness_target_db=-14.0).settings_id("m")
    with pytest.raises(ValueError, match="loudness_target_db"):
        EmbedSettings(loudness_target_db=3.0)


def test_normalize_loudness_removes_gain() -> None:
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal((2, 24000))).astype(np.float32)  # (B, N)
    louder = x * np.float32(10 ** (6 / 20))
    a, b = normalize_loudness(x, TARGET_DB), normalize_loudness(louder, TARGET_DB)
    assert np.allclose(a, b, rtol=1e-5, atol=1e-7)
    rms_db = 20 * np.log10(np.sqrt(np.mean(a.astype(np.float64) ** 2, axis=1)))
    assert np.allclose(rms_db, TARGET_DB, atol=1e-3)
    silence = np.zeros((1, 100), np.float32)
    assert np.array_equal(normalize_loudness(silence, TARGET_DB), silence)


def test_cli_flag_is_checked(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--catalog", "c.csv", "--output", "o", "--loudness-target-db", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--loudness-target-db: expected a level in dBFS within [-80, 0]" in err
    args = build_parser().parse_args(["--catalog", "c.csv", "--output", "o", "--loudness-target-db", "-23"])
    assert args.loudness_target_db == -23.0


def test_gain_copies_come_closer_with_loudness_normalisation(clip_store, loud_store) -> None:
    plain, _ = clip_store
    loud, _ = loud_store
    for layer in (1, 3):
        pv, lv = track_vectors(plain, layer), track_vectors(loud, layer)
        for copy, src, db in GAIN_COPIES:
            d_plain = 1 - cos(pv[copy], pv[src])
            d_loud = 1 - cos(lv[copy], lv[src])
            nearest_other = min(1 - cos(lv[src], lv[o]) for o in OTHERS)
            print(f"layer {layer} {copy} ({db:+g} dB): 1-cos {d_plain:.2e} -> {d_loud:.2e}; "
                  f"nearest other track {nearest_other:.2e}")  # fmt: skip
            assert d_loud < 0.01 * d_plain  # at least 100x closer
            assert d_loud < 0.1 * nearest_other  # and far nearer than any other track


def test_gain_copies_grouped_with_their_sources(loud_store) -> None:
    store, sources = loud_store
    for layer in (1, 3):
        table, _ = find_duplicates(str(store), layer, write=False)
        pairs = {frozenset((r["track_id"], r["match_track_id"])) for r in table.to_pylist()}
        assert pairs == {frozenset((c, s)) for c, s in sources.items()}
