"""Similarity search over synthetic stores written with the pipeline's schemas (exact search;
the ANN index side is tests/search/test_index.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from pipeline.errors import (
    InvalidQueryError,
    ModelMismatchError,
    ModelUnavailableError,
    StoreNotFoundError,
    UnknownLayerError,
    UnknownTrackError,
)
from pipeline.schemas import tracks_schema, windows_schema
from pipeline.search.reader import AudioQuery, SearchHit, TrackQuery, open_store
from pipeline.search.synthetic import tracks_table, write_synthetic_store
from tests.conftest import AUDIO, GOLDEN

DIM = 32


def brute_force(vectors: np.ndarray, q: np.ndarray, k: int, exclude: int | None = None) -> list[int]:
    sims = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))
    if exclude is not None:
        sims[exclude] = -np.inf
    return list(np.argsort(-sims, kind="stable")[:k])


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("store")
    syn = write_synthetic_store(
        str(root),
        n_tracks=300,
        layers=(6, 12),
        dim=DIM,
        windows_per_track=4,
        clusters=15,
        run_args={"window_s": 30.0, "hop_s": 30.0},
    )
    return root, syn


@pytest.fixture(scope="module")
def store(store_dir):
    return open_store(str(store_dir[0]))


def test_open_store_reads_layout_from_the_data(store, store_dir) -> None:
    assert store.layers == [6, 12]
    assert store.window_layers == [6, 12]
    assert store.dim == DIM
    assert store.model_id == "musicfm-synthetic"
    assert store.metadata_columns == ["title", "artist", "genre"]
    assert (store.num_tracks, store.num_windows) == (300, 1200)
    d = store.describe()
    assert d["indexes"]["tracks"] == {"6": None, "12": None}
    json.dumps(d)


def test_vector_query_is_exact_cosine_top_k(store, store_dir) -> None:
    syn = store_dir[1]
    q = np.random.default_rng(5).standard_normal(DIM).astype(np.float32)
    for layer in (6, 12):
        res = store.search(q, layer=layer, k=10)
        assert res.exact and res.index_type is None
        vecs = syn.track_vectors[layer]
        want = brute_force(vecs, q, 10)
        assert [h.track_id for h in res] == [syn.track_ids[i] for i in want]
        assert [h.rank for h in res] == list(range(1, 11))
        for h, i in zip(res, want, strict=True):
            cos = float(vecs[i] @ q / np.linalg.norm(vecs[i]) / np.linalg.norm(q))
            assert h.score == pytest.approx(cos, abs=1e-5)
            assert h.metadata["title"] == f"Title {i}" and h.start_s is None
        assert all(a.score >= b.score for a, b in zip(res, res[1:], strict=False))


def test_track_query_excludes_itself(store, store_dir) -> None:
    syn = store_dir[1]
    res = store.search("trk00007", layer=12, k=5)
    assert res.query == "track" and res.query_track_id == "trk00007"
    assert "trk00007" not in [h.track_id for h in res]
    want = brute_force(syn.track_vectors[12], syn.track_vectors[12][7], 5, exclude=7)
    assert [h.track_id for h in res] == [syn.track_ids[i] for i in want]
    assert [h.track_id for h in store.search(TrackQuery("trk00007"), layer=12, k=5)] == [
        h.track_id for h in res
    ]


def test_unknown_track_id_is_a_clear_key_error(store) -> None:
    with pytest.raises(UnknownTrackError) as ei:
        store.search("no-such-track", k=3)
    assert isinstance(ei.value, KeyError)
    assert str(ei.value).startswith("unknown track_id 'no-such-track'")
    with pytest.raises(KeyError):
        store.search(TrackQuery("trk99999"))


def test_unknown_layer_lists_available_layers(store) -> None:
    with pytest.raises(UnknownLayerError, match=r"layer 3 .*available layers: 6, 12"):
        store.search("trk00001", layer=3)
    with pytest.raises(UnknownLayerError, match="available layers: 6, 12"):
        store.search(np.ones(DIM), layer=13, level="window")


def test_default_layer_none_is_the_highest(store) -> None:
    assert store.search("trk00001", layer=None, k=2).layer == 12


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be"),
        ({"k": 1001}, "k must be"),
        ({"level": "frame"}, "level must be"),
        ({"nprobes": 0}, "nprobes"),
        ({"where": "genre = = 'x'"}, "bad where"),
        ({"where": "no_such_column = 1"}, "bad where"),
        ({"where": "no_such_column = 1", "level": "window"}, "bad where"),
    ],
)
def test_invalid_requests(store, kwargs, match) -> None:
    with pytest.raises(InvalidQueryError, match=match):
        store.search("trk00001", **kwargs)


@pytest.mark.parametrize(
    ("vector", "match"),
    [
        (np.zeros(DIM), "all zeros"),
        (np.ones(DIM + 1), "has 33 values"),
        (np.full(DIM, np.nan), "NaN"),
        (np.ones((2, DIM)), "1-D"),
    ],
)
def test_bad_vectors(store, vector, match) -> None:
    with pytest.raises(InvalidQueryError, match=match):
        store.search(vector)


def test_where_is_a_prefilter_that_still_returns_k(store, store_dir) -> None:
    syn = store_dir[1]
    q = syn.track_vectors[12][0]
    # 'metal' is 1 track in 6 (50 rows); a postfilter on the global top 10 would return ~2
    res = store.search(q, k=10, where="genre = 'metal'")
    assert len(res) == 10 and {h.metadata["genre"] for h in res} == {"metal"}
    metal = [i for i, g in enumerate(syn.metadata["genre"]) if g == "metal"]
    want = [metal[j] for j in brute_force(syn.track_vectors[12][metal], q, 10)]
    assert [h.track_id for h in res] == [syn.track_ids[i] for i in want]
    # exactly as many matches as k, and fewer matches than k
    three = "track_id IN ('trk00010', 'trk00020', 'trk00030')"
    assert sorted(h.track_id for h in store.search(q, k=3, where=three)) == [
        "trk00010",
        "trk00020",
        "trk00030",
    ]
    assert len(store.search(q, k=10, where=three)) == 3
    assert len(store.search(q, k=10, where="genre = 'none'")) == 0
    # the query track is left out even when it matches the filter
    res = store.search("trk00004", k=50, where="genre = 'metal'")  # trk00004 is metal
    assert len(res) == 49 and "trk00004" not in {h.track_id for h in res}


def test_window_level_returns_best_window_per_track(store, store_dir) -> None:
    syn = store_dir[1]
    wv = syn.window_vectors[12]
    q = wv[41]  # window 1 of track 10
    res = store.search(q, layer=12, k=8, level="window")
    assert res.level == "window" and len(res) == 8
    ids = [h.track_id for h in res]
    assert len(set(ids)) == 8 and ids[0] == "trk00010"
    assert (res[0].start_s, res[0].end_s, res[0].window_ix) == (30.0, 60.0, 1)
    assert res[0].score == pytest.approx(1.0, abs=1e-5)
    # brute force: best window score of every track, then the top 8 tracks
    sims = wv @ q / np.linalg.norm(wv, axis=1) / np.linalg.norm(q)
    best = sims.reshape(300, 4).max(axis=1)
    assert ids == [syn.track_ids[i] for i in np.argsort(-best, kind="stable")[:8]]
    for h in res:
        i = syn.track_ids.index(h.track_id)
        w = int(np.argmax(sims.reshape(300, 4)[i]))
        assert (h.window_ix, h.start_s) == (w, 30.0 * w)
        assert h.score == pytest.approx(float(best[i]), abs=1e-5)
        assert h.metadata["title"] == f"Title {i}"
        assert h.to_dict()["start_s"] == h.start_s


def test_window_level_dedupes_a_track_that_fills_the_top(tmp_path: Path) -> None:
    """One track with 60 windows all nearer the query than any other window: the over-fetch loop
    must still return k distinct tracks."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal(DIM).astype(np.float32)
    near = q + 0.01 * rng.standard_normal((60, DIM)).astype(np.float32)
    far = rng.standard_normal((40, DIM)).astype(np.float32)
    vecs = np.vstack([near, far])
    tids = ["hog"] * 60 + [f"t{i}" for i in range(40)]
    wix = list(range(60)) + [0] * 40
    schema = windows_schema([12], DIM)
    n = len(tids)
    lance.write_dataset(
        pa.table(
            {
                "track_id": tids,
                "window_ix": pa.array(wix, pa.int32()),
                "start_s": [30.0 * i for i in wix],
                "end_s": [30.0 * i + 30 for i in wix],
                "layer_12": pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), DIM),
                "settings_id": ["s"] * n,
                "run_id": ["r"] * n,
            },
            schema=schema,
        ),
        str(tmp_path / "windows.lance"),
        schema=schema,
    )
    tv = {12: np.vstack([near.mean(0), far])}
    tt = tracks_table(["hog"] + [f"t{i}" for i in range(40)], tv, {"title": [None] * 41})
    lance.write_dataset(tt, str(tmp_path / "tracks.lance"), schema=tt.schema)
    store = open_store(str(tmp_path))
    res = store.search(q, k=5, level="window")
    assert [h.track_id for h in res][0] == "hog" and len({h.track_id for h in res}) == 5
    assert len(store.search(q, k=41, level="window")) == 41  # every track, nothing more
    assert len(store.search(q, k=100, level="window")) == 41
    # the hog as the query: its own windows are skipped
    res = store.search("hog", k=5, level="window")
    assert len(res) == 5 and "hog" not in {h.track_id for h in res}


def test_window_level_where_on_track_or_window_columns(store) -> None:
    res = store.search("trk00003", k=6, level="window", where="genre = 'jazz'")
    assert len(res) == 6 and {h.metadata["genre"] for h in res} == {"jazz"}
    res = store.search("trk00003", k=6, level="window", where="start_s >= 60")
    assert len(res) == 6 and all(h.start_s >= 60 for h in res)
    assert store.search("trk00003", k=6, level="window", where="genre = 'none'") == []


def test_empty_store_gives_empty_results(tmp_path: Path) -> None:
    write_synthetic_store(str(tmp_path), n_tracks=0, layers=(12,), dim=DIM)
    store = open_store(str(tmp_path))
    assert store.num_tracks == 0 and store.layers == [12] and store.model_id is None
    q = np.ones(DIM, np.float32)
    assert store.search(q, k=5) == []
    assert store.search(q, k=5, level="window", where="start_s > 0") == []
    assert store.search(AudioQuery("/nowhere/q.wav")) == []  # nothing to compare: no model needed
    with pytest.raises(UnknownTrackError):
        store.search("trk00000")
    with pytest.raises(UnknownLayerError):
        store.search(q, layer=6)


def test_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="no embedding store"):
        open_store(str(tmp_path / "nope"))
    with pytest.raises(InvalidQueryError, match="no windows.lance"):
        lance.write_dataset(
            tracks_table(["a"], {12: np.ones((1, DIM), np.float32)}, {}), str(tmp_path / "t" / "tracks.lance")
        )
        open_store(str(tmp_path / "t")).search("a", level="window")


def test_store_sees_new_rows_after_refresh(tmp_path: Path) -> None:
    syn = write_synthetic_store(str(tmp_path), n_tracks=50, layers=(12,), dim=DIM)
    store = open_store(str(tmp_path))
    v = -syn.track_vectors[12][0]
    new = tracks_table(["fresh"], {12: v[None, :]}, {"title": ["Fresh"], "artist": [None], "genre": ["pop"]})
    lance.write_dataset(new, str(tmp_path / "tracks.lance"), mode="append")
    assert store.refresh().num_tracks == 51
    assert store.search(v, k=1)[0].track_id == "fresh"


def test_mixed_model_store_compares_like_with_like(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((20, DIM)).astype(np.float32)
    mids = ["model-a"] * 10 + ["model-b"] * 10
    t = tracks_table([f"t{i}" for i in range(20)], {12: v}, {}, model_id=mids)
    lance.write_dataset(t, str(tmp_path / "tracks.lance"))
    store = open_store(str(tmp_path))
    assert store.model_ids == ["model-a", "model-b"] and store.model_id is None
    res = store.search("t3", k=20)
    assert len(res) == 9 and {int(h.track_id[1:]) for h in res} <= set(range(10))
    with pytest.raises(InvalidQueryError, match="mixes models"):
        store.search(v[0])
    assert {int(h.track_id[1:]) for h in store.search(v[0], k=20, model_id="model-b")} == set(range(10, 20))


# --------------------------------------------------------------------------- query by audio


@pytest.fixture(scope="module")
def golden_model():
    from musicfm import MusicFM25Hz

    model = MusicFM25Hz.from_checkpoint(str(GOLDEN / "checkpoint.pt"), str(GOLDEN / "stats.json"))
    assert model.model_id  # computed once
    return model


def test_audio_query_with_another_model_is_refused(store, golden_model) -> None:
    model = golden_model
    assert model.model_id != store.model_id
    with pytest.raises(ModelMismatchError, match="not comparable"):
        store.search(str(AUDIO / "clips" / "hw_fruit.ogg"), k=3, model=model)
    with pytest.raises(ModelMismatchError):
        store.set_model(model)
    with pytest.raises(ModelMismatchError, match=model.model_id):
        store.load_model(str(GOLDEN / "checkpoint.pt"), str(GOLDEN / "stats.json"))


def test_audio_query_without_a_known_model(store) -> None:
    with pytest.raises(ModelUnavailableError, match="--checkpoint"):
        store.search(str(AUDIO / "clips" / "hw_fruit.ogg"), k=3)


def test_audio_query_with_an_unloadable_model(tmp_path: Path) -> None:
    write_synthetic_store(
        str(tmp_path),
        n_tracks=10,
        layers=(12,),
        dim=DIM,
        run_args={"checkpoint": str(tmp_path / "gone.pt"), "stats": None},
    )
    with pytest.raises(ModelUnavailableError, match="cannot load the model .*gone.pt"):
        open_store(str(tmp_path)).search(str(AUDIO / "clips" / "hw_fruit.ogg"))


def test_audio_query_goes_through_the_pipeline_embed_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, golden_model
) -> None:
    """The store's model comes from its run records; the query is embedded by
    pipeline.engine.inference.embed_uri with the store's window/hop and the query layer."""
    from pipeline.engine import inference

    model = golden_model
    args = {
        "checkpoint": str(GOLDEN / "checkpoint.pt"),
        "stats": str(GOLDEN / "stats.json"),
        "model_config": None,
        "window_s": 10.0,
        "hop_s": 5.0,
    }
    syn = write_synthetic_store(
        str(tmp_path), n_tracks=40, layers=(2, 3), dim=48, model_id=model.model_id, run_args=args
    )
    store = open_store(str(tmp_path))
    calls = []

    def fake_embed_uri(uri, model, layers, window_s=30.0, hop_s=30.0, storage_options=None, precision="fp32"):
        calls.append((uri, model.model_id, list(layers), window_s, hop_s))
        return inference.TrackEmbedding(track={lay: syn.track_vectors[lay][5] * 3.0 for lay in layers})

    monkeypatch.setattr(inference, "embed_uri", fake_embed_uri)
    clip = str(AUDIO / "clips" / "hw_fruit.ogg")
    res = store.search(clip, layer=2, k=3)
    assert res.query == "audio"
    assert calls == [(clip, model.model_id, [2], 10.0, 5.0)]
    assert res[0].track_id == "trk00005" and res[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.track_id for h in res] == [
        h.track_id for h in store.search(syn.track_vectors[2][5], layer=2, k=3)
    ]
    assert store.model is not None and store.model.model_id == model.model_id


@pytest.mark.skipif(not (AUDIO / "clips" / "hw_fruit.ogg").exists(), reason="no audio clips")
def test_audio_query_end_to_end_with_the_golden_model(tmp_path: Path, golden_model) -> None:
    """Real decode + window + model (tiny golden checkpoint): a store holding the clip's own
    embedding finds it first with similarity ~1."""
    from pipeline.engine import inference

    model = golden_model
    clip = str(AUDIO / "clips" / "hw_fruit.ogg")
    emb = inference.embed_uri(clip, model, [3], window_s=10.0, hop_s=10.0)
    syn = write_synthetic_store(str(tmp_path), n_tracks=30, layers=(3,), dim=48, model_id=model.model_id)
    vecs = syn.track_vectors[3].copy()
    vecs[12] = emb.track[3]
    t = tracks_table(syn.track_ids, {3: vecs}, syn.metadata, model_id=model.model_id)
    lance.write_dataset(t, os.path.join(str(tmp_path), "tracks.lance"), mode="overwrite")
    store = open_store(str(tmp_path))
    res = store.search(AudioQuery(clip), layer=3, k=3, model=model)
    # the store's runs name no window size: embed_uri's 30 s default gives a slightly different mean
    assert res[0].track_id == "trk00012" and res[0].score > 0.99


def test_hits_serialise_to_json(store) -> None:
    res = store.search("trk00001", k=2, level="window")
    doc = json.loads(json.dumps(res.to_dict()))
    assert doc["level"] == "window" and doc["exact"] is True and len(doc["hits"]) == 2
    assert set(doc["hits"][0]) == {"rank", "track_id", "score", "metadata", "start_s", "end_s", "window_ix"}
    assert "start_s" not in SearchHit(1, "a", 0.5).to_dict()


def test_track_schema_metadata_columns_are_strings() -> None:
    s = tracks_schema([12], DIM, ["title"])
    assert s.field("title").type == pa.string()


# --------------------------------------------------------------------------- other readers


def test_store_is_readable_by_lancedb_duckdb_polars_and_parquet(store_dir, tmp_path: Path) -> None:
    import duckdb
    import lancedb
    import polars as pl
    import pyarrow.dataset as pds
    import pyarrow.parquet as pq

    root, syn = store_dir
    db = lancedb.connect(str(root))
    tbl = db.open_table("tracks")
    assert tbl.count_rows() == 300
    hits = (
        tbl.search(syn.track_vectors[12][9], vector_column_name="layer_12")
        .metric("cosine")
        .limit(3)
        .to_list()
    )
    assert hits[0]["track_id"] == "trk00009"

    arrow = lance.dataset(str(root / "tracks.lance")).to_table(columns=["track_id", "genre", "duration_s"])
    counts = duckdb.sql("SELECT genre, count(*) AS n FROM arrow GROUP BY genre ORDER BY genre").fetchall()
    assert counts == [(g, 50) for g in sorted(set(syn.metadata["genre"]))]
    df = pl.from_arrow(arrow)
    assert df.filter(pl.col("genre") == "jazz").height == 50

    # a Parquet export (what --format parquet writes: a tracks.parquet/ directory of files)
    full = lance.dataset(str(root / "tracks.lance")).to_table()
    out = tmp_path / "tracks.parquet"
    out.mkdir()
    pq.write_table(full.slice(0, 150), out / "part-0.parquet")
    pq.write_table(full.slice(150), out / "part-1.parquet")
    ds = pds.dataset(str(out), format="parquet")
    assert ds.count_rows() == 300
    back = ds.to_table(columns=["track_id", "layer_12"], filter=pds.field("track_id") == "trk00042")
    np.testing.assert_array_equal(
        np.asarray(back.column("layer_12")[0].as_py(), np.float32), syn.track_vectors[12][42]
    )
    assert ds.schema.field("layer_12").type == pa.list_(pa.float32(), DIM)


# --------------------------------------------------------------------------- S3


def test_store_on_s3(s3_server: str) -> None:

    s3_server.client().create_bucket(Bucket="search-store")
    lance_so = {
        "aws_endpoint": s3_server,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "aws_region": "us-east-1",
        "allow_http": "true",
    }
    syn = write_synthetic_store(
        "s3://search-store/emb",
        n_tracks=60,
        layers=(12,),
        dim=DIM,
        windows_per_track=2,
        storage_options=lance_so,
    )
    q = syn.track_vectors[12][11]
    for so in (lance_so, {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}):
        store = open_store("s3://search-store/emb", storage_options=so)
        assert store.layers == [12] and store.num_tracks == 60 and store.num_windows == 120
        res = store.search(q, k=4)
        assert res[0].track_id == "trk00011" and len(res) == 4
        assert (
            store.search("trk00011", k=3, level="window", where="genre = 'rock'")[0].metadata["genre"]
            == "rock"
        )
    with pytest.raises(StoreNotFoundError):
        open_store("s3://search-store/missing", storage_options=lance_so)
