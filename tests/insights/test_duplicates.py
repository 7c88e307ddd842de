"""Near-duplicate groups: real transformed copies of the shared clips (embedded through the embed
job with the random-weight golden model) and synthetic stores with planted copies."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from pipeline.commands.insights import find_duplicates_main
from pipeline.insights.duplicates import Criterion, _gap_rows, find_duplicates, gap_matches, read_duplicates
from pipeline.search.index import build_indexes
from pipeline.search.synthetic import tracks_table
from tests.insights.conftest import HOP_S, WINDOW_S, planted_store, read_catalog, read_variants

SHARED_VARIANTS = {Path(v["variant_uri"]).stem: v["source_track_id"] for v in read_variants()}
CLIPS = {r["track_id"] for r in read_catalog()}


def groups_of(table: pa.Table) -> dict[str, str]:
    out = {}
    for r in table.to_pylist():
        out[r["track_id"]] = out[r["match_track_id"]] = r["group_id"]
    return out


@pytest.mark.parametrize(
    ("layer", "level", "align"),
    [
        (1, "track", "auto"),  # candidates confirmed by window alignment (the default)
        (1, "track", "off"),  # track vectors alone: the gap test
        (3, "track", "off"),
        (1, "window", "auto"),
        (3, "window", "auto"),
    ],
)
def test_shared_variants_grouped_with_their_sources_and_nothing_else(clip_store, layer, level, align) -> None:
    """Layer 3 of the random-weight model is left to the gap test at track level: aligned, its
    windows put fb_mainzik_1p and hw_city nearer than the median candidate by 20x (measured in
    bench/intelligence.py's crops part; see docs/insights.md)."""
    store, sources = clip_store
    table, report = find_duplicates(str(store), layer, level=level, criterion=Criterion(align=align))
    assert (report.aligned > 0) == (level == "track" and align == "auto")
    g = groups_of(table)
    for copy, src in SHARED_VARIANTS.items():  # re-encode, crop, downmix, resample
        assert copy in g and g[copy] == g[src], (copy, src, table.to_pylist())
    for r in table.to_pylist():  # every pair is a copy and its source: distinct clips never grouped
        a, b = r["track_id"], r["match_track_id"]
        assert sources.get(a) == b or sources.get(b) == a, (a, b)
        assert r["group_id"] == min(g_id for g_id, gg in g.items() if gg == g[a])  # smallest id
    assert report.exact and report.queried == (18 if level == "track" else report.queried)
    assert read_duplicates(str(store)).num_rows == table.num_rows


def test_distinct_clips_alone_never_grouped(clip_store) -> None:
    """Gap ratio nearest/second-nearest between distinct clips stays far above the margin."""
    store, sources = clip_store
    for layer in (1, 3):
        _, report = find_duplicates(str(store), layer, write=False)
        # the median track has no copy: its nearest neighbour is no closer than ~1/4 of the second
        assert report.gap_ratio_quantiles["p50"] > 3 * Criterion().margin


def test_window_level_finds_the_crop_at_its_offset(clip_store) -> None:
    store, _ = clip_store
    table, _ = find_duplicates(str(store), 1, level="window", write=False)
    rows = [
        r for r in table.to_pylist() if {r["track_id"], r["match_track_id"]} == {"hw_city", "hw_city_crop3s"}
    ]
    assert len(rows) == 1
    r = rows[0]
    # the crop starts 3 s into its source: crop time t ~ source time t + 3
    want = 3.0 if r["track_id"] == "hw_city_crop3s" else -3.0
    assert abs(r["offset_s"] - want) <= WINDOW_S, r
    assert r["windows"] >= 2
    crop_span = (
        (r["start_s"], r["end_s"])
        if r["track_id"] == "hw_city_crop3s"
        else (r["match_start_s"], r["match_end_s"])
    )
    src_span = (
        (r["match_start_s"], r["match_end_s"])
        if r["track_id"] == "hw_city_crop3s"
        else (r["start_s"], r["end_s"])
    )
    assert (
        0.0 <= crop_span[0] < crop_span[1] <= 27.0 + 1e-6 and 0.0 <= src_span[0] < src_span[1] <= 30.0 + 1e-6
    )
    assert abs((src_span[0] - crop_span[0]) - 3.0) <= WINDOW_S
    assert HOP_S < WINDOW_S


def test_gap_criterion_and_absolute_threshold() -> None:
    crit = Criterion()
    assert gap_matches(np.array([0.999, 0.9, 0.89]), crit) == 1  # d 0.001 vs 0.1: 100x nearer
    assert gap_matches(np.array([0.999, 0.9989, 0.9, 0.89, 0.88]), crit) == 2  # two copies, then the gap
    assert gap_matches(np.array([0.95, 0.9, 0.89]), crit) == 0  # 0.05 vs 0.1: no gap
    # one far outlier at the end of a short list is no gap: at most half the list can match
    assert gap_matches(np.array([0.99, 0.989, 0.988, 0.5]), crit) == 0
    assert gap_matches(np.array([0.95, 0.9, 0.89]), Criterion(threshold=0.895)) == 2
    with pytest.raises(ValueError):
        Criterion(margin=1.5)


def test_absolute_threshold_replaces_the_criterion(clip_store) -> None:
    store, _ = clip_store
    table, report = find_duplicates(str(store), 3, criterion=Criterion(threshold=-1.0), write=False)
    # every neighbour passes a cut at -1: the 18 tracks become one group
    assert report.groups == 1 and report.tracks_in_groups == 18
    assert '"threshold": -1.0' in table["criterion"][0].as_py()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_store(tmp_path_factory.mktemp("planted") / "store")


def planted_pairs(groups: list[set[str]]) -> set[frozenset[str]]:
    return {frozenset((a, b)) for g in groups for a in g for b in g if a < b}


def test_planted_groups_found_exactly(planted) -> None:
    root, groups = planted
    table, report = find_duplicates(str(root), 12, write=False)
    found = {frozenset((r["track_id"], r["match_track_id"])) for r in table.to_pylist()}
    want = planted_pairs(groups)
    assert found == want
    g = groups_of(table)
    for grp in groups:
        assert len({g[t] for t in grp}) == 1
    assert report.groups == len(groups)


def test_ann_index_and_ray_tasks_give_the_same_groups(planted, ray_cluster) -> None:
    root, groups = planted
    reps = build_indexes(str(root), layers=[12], tables=["tracks"], index_type="IVF_PQ", min_rows=256)
    assert reps[0].action in ("built", "rebuilt", "optimized")
    exact, _ = find_duplicates(str(root), 12, use_index=False, write=False)
    ann, rep_ann = find_duplicates(str(root), 12, write=False)
    ray_t, rep_ray = find_duplicates(str(root), 12, use_ray=True, use_index=False, write=False)
    assert not rep_ann.exact and rep_ann.method == "ivf-batched" and rep_ray.ray
    key = ["track_id", "match_track_id", "group_id"]
    assert ann.select(key).to_pylist() == exact.select(key).to_pylist()
    assert ray_t.select(key).to_pylist() == exact.select(key).to_pylist()
    assert {frozenset((r["track_id"], r["match_track_id"])) for r in exact.to_pylist()} == planted_pairs(
        groups
    )


def test_gap_test_of_all_rows_at_once_equals_the_row_by_row_test() -> None:
    rng = np.random.default_rng(3)
    sims = np.sort(1.0 - rng.exponential(0.05, (400, 8)) ** rng.uniform(0.5, 3, (400, 1)), axis=1)[:, ::-1]
    sims[::7, 1] = sims[::7, 0] - 1e-4  # pairs of copies
    sims[::5, 5:] = -np.inf  # short lists
    sims[::11, 1:] = -np.inf  # one neighbour only
    for crit in (Criterion(), Criterion(margin=0.3), Criterion(threshold=0.97)):
        ratio, m = _gap_rows(sims.astype(np.float32), crit)
        for i, row in enumerate(sims.astype(np.float32)):
            s = row[np.isfinite(row)]
            assert m[i] == gap_matches(s, crit), (i, row)
            if len(s) >= 2:
                assert ratio[i] == pytest.approx((1.0 - s[0]) / max(1e-12, 1.0 - s[1]), rel=1e-4, abs=1e-6)
            else:
                assert np.isnan(ratio[i])


def test_batched_ivf_search_probes_nprobes_partitions_and_finds_the_copies(tmp_path, monkeypatch) -> None:
    """An index of ~6 partitions searched with nprobes 2: the batched search of the partitions
    and Lance's own per-query search find the same pairs as exact search."""
    import pipeline.search.index as index_mod

    root, groups = planted_store(tmp_path / "store", n=1500, pairs=20, triples=6)
    ds = lance.dataset(str(root / "tracks.lance"))
    ds.create_index("layer_12", metric="cosine", index_type="IVF_PQ", num_partitions=6, num_sub_vectors=4)
    real = index_mod.search_params
    monkeypatch.setattr(index_mod, "search_params", lambda t, p, k, **kw: real(t, p, k, nprobes=2))
    exact, rep_x = find_duplicates(str(root), 12, use_index=False, write=False)
    batched, rep_b = find_duplicates(str(root), 12, write=False)
    # the vectors over max_corpus_bytes: one Lance query per track (as ann_mode="lance")
    per_query, rep_l = find_duplicates(str(root), 12, write=False, max_corpus_bytes=1000)
    assert (rep_x.method, rep_b.method, rep_l.method) == ("exact", "ivf-batched", "lance")
    assert rep_b.nprobes == 2 and rep_b.partitions >= 4  # Lance may train a few less than asked
    assert f"2 of {rep_b.partitions} IVF partitions, batched" in rep_b.summary()
    with pytest.raises(ValueError, match="ann_mode"):
        find_duplicates(str(root), 12, write=False, ann_mode="fast")
    key = ["track_id", "match_track_id", "group_id"]
    want = exact.select(key).to_pylist()
    assert batched.select(key).to_pylist() == want
    assert per_query.select(key).to_pylist() == want
    assert {frozenset((r["track_id"], r["match_track_id"])) for r in exact.to_pylist()} == planted_pairs(
        groups
    )
    # the neighbour lists of the batched search: exact within the probed partitions
    assert rep_b.gap_ratio_quantiles["p50"] == pytest.approx(rep_x.gap_ratio_quantiles["p50"], abs=0.05)


def test_incremental_after_new_and_removed_tracks(tmp_path: Path) -> None:
    root, groups = planted_store(tmp_path / "store", n=300, pairs=5, triples=2)
    first, _ = find_duplicates(str(root), 12)
    ds = lance.dataset(str(root / "tracks.lance"))
    # a refresh: one copy of a grouped track leaves, a new copy of an ungrouped track arrives later
    gone = sorted(groups[0] - {min(groups[0])})[0]
    ds.delete(f"track_id = '{gone}'")
    src = ds.to_table(filter="track_id = 'trk00001'")
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)
    vecs = {}
    for ix in (6, 12):
        v = np.asarray(src[f"layer_{ix}"][0].as_py(), np.float32)
        vecs[ix] = (v + 0.003 * np.random.default_rng(ix).standard_normal(v.shape).astype(np.float32))[None]
    tbl = tracks_table(
        ["late_copy"], vecs, {"title": ["late"], "artist": ["x"], "genre": ["x"]}, run_id="run-2"
    )
    tbl = tbl.set_column(
        tbl.schema.get_field_index("embedded_at"),
        "embedded_at",
        pa.array([later], tbl.schema.field("embedded_at").type),
    )
    lance.write_dataset(tbl, str(root / "tracks.lance"), mode="append")
    inc, rep = find_duplicates(str(root), 12, incremental=True, write=False)
    assert rep.incremental and rep.queried == 1  # only the new track was queried
    full, _ = find_duplicates(str(root), 12, write=False)
    pairs = lambda t: {frozenset((r["track_id"], r["match_track_id"])) for r in t.to_pylist()}  # noqa: E731
    assert pairs(inc) == pairs(full)
    assert frozenset(("late_copy", "trk00001")) in pairs(inc)
    assert not any(gone in p for p in pairs(inc)) and any(gone in p for p in pairs(first))


def test_incremental_without_a_previous_run_is_refused(tmp_path: Path) -> None:
    root, _ = planted_store(tmp_path / "store", n=100, pairs=2, triples=0)
    err = io.StringIO()
    assert find_duplicates_main(["--store", str(root), "--incremental"], err=err) == 2
    assert err.getvalue().startswith("find_duplicates: error: --incremental needs a previous run")


@pytest.mark.parametrize(
    ("argv", "msg"),
    [
        (["--level", "frame"], "argument --level: invalid choice"),
        (["--threshold", "1.5"], "argument --threshold: expected a cosine"),
        (["--margin", "0"], "argument --margin: expected a number in (0, 1)"),
        (["--layer", "7"], "layer 7 is not in tracks.lance; available layers: 6, 12"),
        (["-k", "0"], "argument -k: expected an integer >= 1"),
        (["--align", "maybe"], "argument --align: invalid choice"),
        (["--align", "on"], "--align on needs windows.lance with layer 12"),
    ],
)
def test_cli_errors_are_one_line(planted, capsys, argv, msg) -> None:
    root, _ = planted
    err = io.StringIO()
    with pytest.raises(SystemExit) if msg.startswith("argument") else _nothing():
        code = find_duplicates_main(["--store", str(root), *argv], err=err)
        assert code == 2
    text = err.getvalue() or capsys.readouterr().err
    assert text.count("\n") == 1 and msg in text and text.startswith("find_duplicates: error: ")


class _nothing:  # noqa: N801 - a no-op context manager
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_cli_run_writes_duplicates_lance(planted) -> None:
    root, groups = planted
    out = io.StringIO()
    assert find_duplicates_main(["--store", str(root), "--layer", "6", "--no-index"], out=out) == 0
    assert out.getvalue().startswith(f"{len(groups)} groups")
    t = read_duplicates(str(root))
    assert set(t["layer"].to_pylist()) == {6} and set(t["level"].to_pylist()) == {"track"}
