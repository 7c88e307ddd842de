"""Cosine ANN indexes: parameters, recall against brute force, prefilters, incremental updates."""

from __future__ import annotations

from pathlib import Path

import lance
import numpy as np
import pytest

from pipeline.errors import UnknownLayerError
from pipeline.search.index import (
    EXACT_MAX_ROWS,
    MIN_INDEX_ROWS,
    build_indexes,
    exact_max_rows,
    index_params,
    pq_sub_vectors,
    search_params,
)
from pipeline.search.reader import open_store
from pipeline.search.synthetic import tracks_table, write_synthetic_store

DIM = 64
N = 4000


def brute_force_ids(vectors: np.ndarray, ids: list[str], q: np.ndarray, k: int) -> list[str]:
    sims = vectors @ q / np.linalg.norm(vectors, axis=1) / np.linalg.norm(q)
    return [ids[i] for i in np.argsort(-sims, kind="stable")[:k]]


def test_pq_sub_vectors() -> None:
    assert pq_sub_vectors(1024) == 64  # 16 dims per code
    assert pq_sub_vectors(256) == 16
    assert pq_sub_vectors(128) == 16  # 8 dims per code below 256 dims
    assert pq_sub_vectors(48) == 6
    assert pq_sub_vectors(40) == 5
    assert pq_sub_vectors(100) == 50  # largest divisor leaving >= 2 dims
    assert pq_sub_vectors(7) == 1


def test_index_params_follow_row_count_and_dimension() -> None:
    p = index_params(200_000, 1024, "IVF_PQ")
    assert p["num_partitions"] == 447 and p["num_sub_vectors"] == 64
    assert (
        index_params(4000, 64, "IVF_PQ")["num_partitions"] == 4000 // MIN_INDEX_ROWS
    )  # sqrt(4000)=63 capped
    assert index_params(10**8, 1024, "IVF_PQ")["num_partitions"] == 4096
    h = index_params(200_000, 1024, "IVF_HNSW_SQ")
    assert h["num_partitions"] == 4 and h["m"] > 0
    with pytest.raises(ValueError, match="index_type"):
        index_params(1000, 64, "FLAT")


def test_search_params_defaults_and_overrides() -> None:
    sp = search_params("IVF_PQ", 447, 10)
    assert sp.nprobes == 20 and sp.refine_factor == 10 and sp.ef is None
    assert search_params("IVF_PQ", 5, 10).nprobes == 5  # capped at the partition count
    assert search_params("IVF_PQ", 447, 10, nprobes=3, refine_factor=2) == type(sp)(3, 2, None)
    h = search_params("IVF_HNSW_SQ", 4, 50)
    assert h.ef >= 4 * 50 and h.nprobes == 4  # all of few partitions (fixed probes miss neighbours)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory):
    """N clustered tracks (x 2 windows), IVF_PQ forced on layer 12 (below the exact threshold)."""
    root = tmp_path_factory.mktemp("indexed")
    syn = write_synthetic_store(
        str(root), n_tracks=N, layers=(12,), dim=DIM, windows_per_track=2, clusters=40
    )
    reports = build_indexes(str(root), index_type="IVF_PQ")
    return root, syn, reports


def near_queries(vectors: np.ndarray, n: int, seed: int) -> np.ndarray:
    """New points in the neighbourhood of stored ones (noise about the size of a cluster)."""
    rng = np.random.default_rng(seed)
    base = vectors[rng.choice(len(vectors), n, replace=False)]
    return (base + 0.8 * rng.standard_normal(base.shape).astype(np.float32) / np.sqrt(base.shape[1])).astype(
        np.float32
    )


def _recall(store, syn, queries: np.ndarray, **kw) -> float:
    hits = 0
    for q in queries:
        res = store.search(q, k=10, **kw)
        hits += len(
            {h.track_id for h in res} & set(brute_force_ids(syn.track_vectors[12], syn.track_ids, q, 10))
        )
    return hits / (10 * len(queries))


def test_ivf_pq_recall_against_brute_force(indexed) -> None:
    root, syn, reports = indexed
    by_table = {(r.table, r.column): r for r in reports}
    assert set(by_table) == {("tracks", "layer_12"), ("windows", "layer_12")}
    tr = by_table[("tracks", "layer_12")]
    assert tr.action == "built" and tr.index_type == "IVF_PQ"
    assert tr.params == {"num_partitions": 15, "num_sub_vectors": 8}
    store = open_store(str(root))
    info = store.index_info("tracks", 12)
    assert info is not None and info.metric == "cosine" and info.num_partitions == 15
    queries = near_queries(syn.track_vectors[12], 40, seed=99)
    res = store.search(queries[0], k=10)
    assert not res.exact and res.index_type == "IVF_PQ" and res.nprobes == 15 and res.refine_factor == 10
    assert _recall(store, syn, queries) >= 0.95
    # a third of the partitions: still high, but Lance's k-means partitioning is not seeded, so
    # which neighbours fall outside the probed partitions varies run to run (0.945 to 1.0 seen)
    assert _recall(store, syn, queries, nprobes=5) >= 0.9
    # scores are exact cosine similarities (re-ranked on the raw vectors)
    v = syn.track_vectors[12]
    i = syn.track_ids.index(res[0].track_id)
    assert res[0].score == pytest.approx(
        float(v[i] @ queries[0] / np.linalg.norm(v[i]) / np.linalg.norm(queries[0])), abs=1e-4
    )
    # fewer probes, no refinement: lower recall (the parameters are really passed)
    assert _recall(store, syn, queries, nprobes=1, refine_factor=1) < 0.95


def test_ivf_hnsw_sq_recall_against_brute_force(tmp_path: Path) -> None:
    syn = write_synthetic_store(str(tmp_path), n_tracks=3000, layers=(12,), dim=DIM, clusters=30)
    (rep,) = build_indexes(str(tmp_path), index_type="IVF_HNSW_SQ")
    assert rep.action == "built" and rep.index_type == "IVF_HNSW_SQ"
    store = open_store(str(tmp_path))
    queries = near_queries(syn.track_vectors[12], 30, seed=98)
    assert store.search(queries[0]).index_type == "IVF_HNSW_SQ"
    assert _recall(store, syn, queries) >= 0.95


def test_prefilter_with_index_returns_k_when_k_match(indexed) -> None:
    root, syn, _ = indexed
    store = open_store(str(root))
    q = syn.track_vectors[12][0]
    few = [syn.track_ids[i] for i in range(5, N, 400)]  # 10 tracks spread over the clusters
    where = "track_id IN (" + ", ".join(f"'{t}'" for t in few) + ")"
    res = store.search(q, k=10, where=where, nprobes=1)
    assert not res.exact and sorted(h.track_id for h in res) == sorted(few)
    res = store.search(q, k=10, where="genre = 'metal'", nprobes=1)
    assert len(res) == 10 and {h.metadata["genre"] for h in res} == {"metal"}
    # window level with a selective track filter and the windows index
    res = store.search(q, k=5, where=where, level="window", nprobes=1)
    assert res.index_type == "IVF_PQ" and len(res) == 5 and {h.track_id for h in res} <= set(few)


def test_rows_added_after_indexing_are_found_and_optimize_is_incremental(tmp_path: Path) -> None:
    syn = write_synthetic_store(str(tmp_path), n_tracks=2000, layers=(12,), dim=DIM, clusters=20)
    build_indexes(str(tmp_path), index_type="IVF_PQ")
    uri = str(tmp_path / "tracks.lance")
    rng = np.random.default_rng(7)
    fresh = rng.standard_normal((3, DIM)).astype(np.float32)
    meta = {"title": ["New A", "New B", "New C"], "artist": [None] * 3, "genre": ["pop"] * 3}
    lance.write_dataset(tracks_table(["newA", "newB", "newC"], {12: fresh}, meta), uri, mode="append")
    # merge_insert: replace the vector of an existing track and insert another track
    upd = rng.standard_normal((2, DIM)).astype(np.float32)
    ds = lance.dataset(uri)
    ds.merge_insert("track_id").when_matched_update_all().when_not_matched_insert_all().execute(
        tracks_table(
            ["trk00007", "newD"],
            {12: upd},
            {"title": ["Moved", "New D"], "artist": [None] * 2, "genre": ["pop"] * 2},
        )
    )
    ds = lance.dataset(uri)
    before = ds.stats.index_stats("layer_12_idx")
    assert before["num_unindexed_rows"] >= 5
    store = open_store(str(tmp_path))
    assert store.num_tracks == 2004
    for tid, v in (("newB", fresh[1]), ("trk00007", upd[0]), ("newD", upd[1])):
        res = store.search(v, k=3, nprobes=1)
        assert not res.exact
        assert res[0].track_id == tid and res[0].score == pytest.approx(1.0, abs=1e-5)
    assert store.search(syn.track_vectors[12][7], k=1)[0].track_id != "trk00007"  # old vector gone
    # a second build updates the index in place (no retraining), after which nothing is unindexed
    (rep,) = build_indexes(str(tmp_path), index_type="auto", tables=["tracks"])
    assert rep.action == "optimized"
    after = lance.dataset(uri).stats.index_stats("layer_12_idx")
    assert after["num_unindexed_rows"] == 0 and after["num_indexed_rows"] == 2004
    store.refresh()
    assert store.search(fresh[2], k=1, nprobes=1)[0].track_id == "newC"


def test_auto_builds_no_index_below_the_threshold(tmp_path: Path) -> None:
    write_synthetic_store(str(tmp_path), n_tracks=300, layers=(6, 12), dim=DIM, windows_per_track=2)
    reports = build_indexes(str(tmp_path))
    assert exact_max_rows(DIM) > 600 and exact_max_rows(1024) == EXACT_MAX_ROWS == 5_000
    assert [(r.table, r.layer, r.action) for r in reports] == [
        ("tracks", 6, "exact"),
        ("tracks", 12, "exact"),
        ("windows", 6, "exact"),
        ("windows", 12, "exact"),
    ]
    store = open_store(str(tmp_path))
    assert store.search("trk00001").exact
    # min_rows lowers the threshold; only the requested layer is indexed
    reports = build_indexes(str(tmp_path), layers=[12], min_rows=500)
    assert [(r.table, r.action) for r in reports] == [("tracks", "exact"), ("windows", "built")]
    store.refresh()
    assert store.search("trk00001", level="window").index_type == "IVF_PQ"
    assert store.search("trk00001", level="window", layer=6).exact


def test_build_indexes_errors(tmp_path: Path) -> None:
    write_synthetic_store(str(tmp_path), n_tracks=100, layers=(12,), dim=DIM)
    with pytest.raises(UnknownLayerError, match="available layers: 12"):
        build_indexes(str(tmp_path), layers=[3])
    with pytest.raises(ValueError, match="index_type"):
        build_indexes(str(tmp_path), index_type="FLAT")
    (rep,) = build_indexes(str(tmp_path), index_type="IVF_PQ")  # 100 rows: too few to train
    assert rep.action == "skipped" and "too few" in rep.reason


def test_indexes_on_s3(s3_server: str) -> None:

    s3_server.client().create_bucket(Bucket="index-store")
    so = {
        "aws_endpoint": s3_server,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "aws_region": "us-east-1",
        "allow_http": "true",
    }
    syn = write_synthetic_store(
        "s3://index-store/emb", n_tracks=1000, layers=(12,), dim=DIM, clusters=10, storage_options=so
    )
    (rep,) = build_indexes("s3://index-store/emb", storage_options=so, index_type="IVF_PQ")
    assert rep.action == "built"
    store = open_store("s3://index-store/emb", storage_options=so)
    res = store.search("trk00003", k=5)
    assert res.index_type == "IVF_PQ" and len(res) == 5
    assert [h.track_id for h in res] == brute_force_ids(
        syn.track_vectors[12], syn.track_ids, syn.track_vectors[12][3], 6
    )[1:]
