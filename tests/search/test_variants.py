"""End to end search quality: transformed copies of real clips find their source track.

The 12 real clips of ``shared/audio/catalog.csv`` are embedded with ``run_embed`` (real Ray, real
Lance, the small random-weight golden checkpoint), then every file of ``variants.csv`` (a FLAC clip
re-encoded to Vorbis, a copy with the first 3 s cropped, a stereo clip downmixed to mono, a 44.1 kHz
clip resampled to 32 kHz) is queried by audio through ``Store.search``: the store loads its model
from its own run records and embeds the query with the run's window/hop.

Measured with this model (10 s windows, 10 s hop), per setting: rank of the source, cosine
similarity to the source / to the best other track / median of the 11 other tracks, and the
distance ratio (1 - source) / (1 - best other):

==========================  ========  ====  ==========================  =====
variant (transform)         setting   rank  source / best / median      ratio
==========================  ========  ====  ==========================  =====
hw_oriental_reencode        L1 track  1     0.99999 / 0.92704 / 0.82987 .0001
(flac_pcm16 -> ogg_vorbis)  L3 track  1     0.99999 / 0.92911 / 0.82153 .0001
                            L1 win    1     0.99808 / 0.95253 / 0.84645 .040
                            L3 win    1     0.99708 / 0.94462 / 0.86230 .053
hw_city_crop3s              L1 track  1     0.99986 / 0.98983 / 0.80018 .014
(first 3 s cut)             L3 track  1     0.99989 / 0.99344 / 0.79795 .017
                            L1 win    1     0.99922 / 0.99100 / 0.80874 .086
                            L3 win    1     0.99953 / 0.99390 / 0.80248 .077
hw_earthrise_mono           L1 track  1     0.99995 / 0.97522 / 0.75624 .0019
(stereo -> mono)            L3 track  1     0.99997 / 0.97294 / 0.67063 .0013
                            L1 win    1     0.99518 / 0.97554 / 0.78531 .197
                            L3 win    1     0.99626 / 0.98066 / 0.70649 .193
fb_introzik_32k             L1 track  1     0.99997 / 0.97971 / 0.78454 .0014
(44100 -> 32000 Hz)         L3 track  1     0.99999 / 0.99086 / 0.81765 .0014
                            L1 win    1     0.99751 / 0.98297 / 0.80833 .146
                            L3 win    1     0.99738 / 0.99233 / 0.83346 .341
==========================  ========  ====  ==========================  =====

"win" is window level: the query's track vector against every stored window, best window per
track. A random-weight model puts all tracks close together (other tracks reach 0.994), so what
carries information is the rank and the distance ratio: at track level the source is >= 60x
nearer than any other track, at window level >= 2.9x. Each catalog clip queried by its own audio
(layer 3, track level) scores 0.9999999..1.0000001; the best runner-up is 0.99444
(hw_city <-> fb_mainzik_1p). All values were identical over repeated runs (CPU, fp32).
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest

from pipeline.runs.embed import run_embed
from pipeline.runs.settings import EmbedJob
from pipeline.search.reader import AudioQuery, SearchResults, open_store
from tests.conftest import AUDIO

LAYERS = (1, 3)
WINDOW_S = HOP_S = 10.0
N_TRACKS = 12
# (layer, level) settings every variant is queried with.
SETTINGS = [(1, "track"), (3, "track"), (1, "window"), (3, "window")]
# Largest allowed (1 - score(source)) / (1 - score(best other track)); measured worst 0.017 at
# track level and 0.34 at window level (see the module docstring).
MAX_DISTANCE_RATIO = {"track": 0.05, "window": 0.5}

with open(AUDIO / "variants.csv", newline="") as _f:
    VARIANTS = [(r["variant_uri"], r["source_track_id"], r["transform"]) for r in csv.DictReader(_f)]
with open(AUDIO / "catalog.csv", newline="") as _f:
    CATALOG = [(r["track_id"], r["uri"]) for r in csv.DictReader(_f)]


@pytest.fixture(scope="module")
def catalog_store(ray_cluster, audio_dir: Path, golden_dir: Path, tmp_path_factory):
    """The 12 clips embedded once for the module; the store with its model loaded from run records."""
    out = tmp_path_factory.mktemp("variants") / "store"
    job = EmbedJob(
        catalog=str(audio_dir / "catalog.csv"),
        output=str(out),
        checkpoint=str(golden_dir / "checkpoint.pt"),
        stats=str(golden_dir / "stats.json"),
        layers=LAYERS,
        precision="fp32",
        window_s=WINDOW_S,
        hop_s=HOP_S,
        batch_size=4,
        decode_cpus=2,
    )
    report = run_embed(job, progress=False)
    assert report.status == "ok" and report.tracks_ok == N_TRACKS and report.tracks_failed == 0
    return open_store(str(out)), report


@pytest.fixture(scope="module")
def variant_results(catalog_store, audio_dir: Path) -> dict[tuple[str, int, str], SearchResults]:
    """Every variant queried by audio once per (layer, level), all tracks returned."""
    store, _ = catalog_store
    return {
        (uri, layer, level): store.search(
            AudioQuery(str(audio_dir / uri)), layer=layer, k=N_TRACKS, level=level
        )
        for uri, _, _ in VARIANTS
        for layer, level in SETTINGS
    }


def test_variants_csv_is_the_expected_set() -> None:
    """The assertions below were measured on these four variants; a new one needs measuring."""
    assert {(uri, src) for uri, src, _ in VARIANTS} == {
        ("variants/hw_oriental_reencode.ogg", "hw_oriental"),
        ("variants/hw_city_crop3s.ogg", "hw_city"),
        ("variants/hw_earthrise_mono.ogg", "hw_earthrise"),
        ("variants/fb_introzik_32k.ogg", "fb_introzik"),
    }
    assert {src for _, src, _ in VARIANTS} <= {tid for tid, _ in CATALOG}


def test_audio_query_uses_the_stores_own_model_and_settings(catalog_store, variant_results) -> None:
    store, report = catalog_store
    assert store.num_tracks == N_TRACKS and store.layers == list(LAYERS)
    assert store.model is not None and store.model.model_id == report.model_id == store.model_id
    args = store.run_args()
    assert (args["window_s"], args["hop_s"]) == (WINDOW_S, HOP_S)
    for (_, layer, level), res in variant_results.items():
        assert (res.query, res.layer, res.level, res.exact) == ("audio", layer, level, True)
        ids = [h.track_id for h in res]
        assert len(ids) == N_TRACKS and len(set(ids)) == N_TRACKS  # every track, each once
        assert [h.score for h in res] == sorted((h.score for h in res), reverse=True)


@pytest.mark.parametrize(("layer", "level"), SETTINGS)
@pytest.mark.parametrize(("uri", "source", "transform"), VARIANTS, ids=[Path(v[0]).stem for v in VARIANTS])
def test_variant_finds_its_source_first(variant_results, uri, source, transform, layer, level) -> None:
    res = variant_results[(uri, layer, level)]
    ids = [h.track_id for h in res]
    rank = ids.index(source) + 1
    src_score = res[rank - 1].score
    others = [h.score for h in res if h.track_id != source]
    summary = f"{transform}: ranks {ids[:3]} / scores {[round(h.score, 5) for h in res[:3]]}"
    assert rank == 1, summary
    # with margin: the source is several times nearer (cosine distance) than the next track
    ratio = (1.0 - src_score) / (1.0 - max(others))
    assert ratio < MAX_DISTANCE_RATIO[level], f"distance ratio {ratio:.4f}; {summary}"
    # and clearly above the typical other track
    assert src_score > statistics.median(others), summary
    assert src_score - statistics.median(others) > 0.05, summary


@pytest.mark.parametrize(("track_id", "uri"), CATALOG, ids=[tid for tid, _ in CATALOG])
def test_catalog_clip_queried_by_its_own_audio_finds_itself(
    catalog_store, audio_dir: Path, track_id: str, uri: str
) -> None:
    """A plain path string is an audio query; the clip's own track vector comes back at ~1."""
    store, _ = catalog_store
    res = store.search(str(audio_dir / uri), layer=3, k=2)
    assert res.query == "audio" and res[0].track_id == track_id
    assert res[0].score > 0.999
    assert res[1].score < 0.999  # the runner-up does not also pass the bar
