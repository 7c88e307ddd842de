"""Benchmark: Lance ANN indexes vs exact search (and faiss-cpu when importable).

Usage (from the repo root)::

    python bench/search.py                    # 200,000 x 1024, the default
    python bench/search.py --n 20000 --queries 100

N synthetic *clustered* unit-norm vectors (Gaussian clusters around random centres, like
embeddings of a catalog with many similar tracks) are written to a Lance table shaped like
``tracks.lance``; held-out queries from the same clusters are searched with k=10 and compared
with exact numpy search (recall@10 = |ANN top-10 ∩ exact top-10| / 10, averaged).

For each configuration it prints: build time, p50 / p95 single-query latency (sequential, one
query at a time through ``lance.LanceDataset.to_table(nearest=...)``, i.e. what
``Store.search`` does), queries per second (1 / mean latency) and recall@10. Rows: exact numpy
in memory (the lower bound), Lance flat (exact, no index), IVF_PQ and IVF_HNSW_SQ with the
parameters of :func:`pipeline.search.index.index_params` for a few ``nprobes`` / ``refine_factor`` /
``ef`` (``*`` marks the defaults of :func:`pipeline.search.index.search_params`), ``Store.search`` itself
with the defaults (it also fetches the metadata columns) and with a ``where`` prefilter (recall
against the exact filtered top-10), and faiss IVF-Flat / HNSW (in memory) if ``faiss`` imports.

``--vectors clips`` replaces the synthetic clusters with real-shaped vectors: window means (layer
12, 2 s windows every 1 s) of every clip in ``shared/audio`` (clips and variants) from a MusicFM
model (``--clip-model full``: the full-size config, random weights, 1024-d; ``golden``: the small
golden checkpoint, 48-d), each copied with Gaussian noise (``--noise`` times the median distance
between a window vector and its nearest other window vector) to ``--n`` rows; queries are fresh noisy
copies. These keep what synthetic clusters lack: the common direction and the low intrinsic
dimension of real embeddings. The base vectors are cached in ``--workdir`` (or ``$TMPDIR``).

Goal: recall@10 >= 0.95 at p50 <= 10 ms at 200k on a 2-core machine.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from any directory
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from pipeline.schemas import layer_column  # noqa: E402
from pipeline.search.index import index_params, search_params  # noqa: E402


@dataclass
class Row:
    method: str
    params: str
    build_s: float | None
    p50_ms: float
    p95_ms: float
    qps: float
    recall: float


def clustered(n: int, dim: int, clusters: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around ``clusters`` random centres; also returns the centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    step = 20_000
    for s in range(0, n, step):
        m = min(step, n - s)
        lab = rng.integers(0, clusters, m)
        x = centres[lab] + (spread / math.sqrt(dim)) * rng.standard_normal((m, dim)).astype(np.float32)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, centres


def queries_from(centres: np.ndarray, q: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dim = centres.shape[1]
    lab = rng.integers(0, len(centres), q)
    x = centres[lab] + (spread / math.sqrt(dim)) * rng.standard_normal((q, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clip_window_vectors(model_kind: str, cache_dir: str) -> np.ndarray:
    """(W, D) float32 window means (layer 12 / the last layer) of every shared clip and variant."""
    cache = os.path.join(cache_dir, f"clip-windows-{model_kind}.npy")
    if os.path.exists(cache):
        return np.load(cache)
    from musicfm import MusicFM25Hz, MusicFMConfig
    from pipeline.engine.inference import EmbedSettings, WindowEmbedder, load_model
    from pipeline.io.audio import decode_audio
    from tools.testkit.paths import require_shared

    shared = str(require_shared())
    if model_kind == "golden":
        g = os.path.join(shared, "golden")
        model = load_model(os.path.join(g, "checkpoint.pt"), os.path.join(g, "stats.json"), device="cpu")
    else:
        model = MusicFM25Hz(MusicFMConfig(), seed=0).eval()
    layer = model.config.encoder_depth
    emb = WindowEmbedder(model, EmbedSettings(layers=(layer,), window_s=2.0, hop_s=1.0))
    files = sorted(
        os.path.join(d, f)
        for d in (os.path.join(shared, "audio", "clips"), os.path.join(shared, "audio", "variants"))
        if os.path.isdir(d)
        for f in os.listdir(d)
        if f.rsplit(".", 1)[-1] in ("wav", "flac", "ogg", "opus", "mp3")
    )
    out = []
    for f in files:
        x = decode_audio(f).samples
        wins = [x[s : s + 48_000] for s in range(0, x.shape[0] - 48_000 + 1, 24_000)]
        out += [r.means[layer] for r in emb.embed(wins)]
    vecs = np.stack(out).astype(np.float32)  # (W, D)
    np.save(cache, vecs)
    return vecs


def real_shaped(
    base: np.ndarray, n: int, q: int, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """``n`` data and ``q`` query unit vectors: noisy copies of the rows of ``base`` (W, D); the noise
    is ``noise`` x the median nearest-neighbour distance among the base rows (returned)."""
    rng = np.random.default_rng(seed)
    d2 = (base * base).sum(1)[:, None] + (base * base).sum(1)[None, :] - 2 * base @ base.T  # (W, W)
    np.fill_diagonal(d2, np.inf)
    nn = float(np.median(np.sqrt(np.maximum(d2.min(1), 0))))
    sigma = noise * nn / math.sqrt(base.shape[1])

    def copies(m: int) -> np.ndarray:
        x = base[rng.integers(0, len(base), m)] + sigma * rng.standard_normal((m, base.shape[1])).astype(
            np.float32
        )
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return copies(n), copies(q), nn


def exact_topk(data: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), 64):
        sims = queries[s : s + 64] @ data.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1)
        out[s : s + 64] = np.take_along_axis(part, order, 1)
    return out


def recall(found: Sequence[Sequence[int]], truth: np.ndarray, k: int) -> float:
    return float(
        np.mean([len(set(f[:k]) & set(t[:k].tolist())) / k for f, t in zip(found, truth, strict=True)])
    )


def timed(fn: Callable[[np.ndarray], list[int]], queries: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    fn(queries[0])  # warm-up (opens index files, fills caches)
    res, lat = [], []
    for q in queries:
        t = time.perf_counter()
        res.append(fn(q))
        lat.append(time.perf_counter() - t)
    return res, np.asarray(lat)


def row(method: str, params: str, build_s: float | None, lat: np.ndarray, rec: float) -> Row:
    return Row(
        method,
        params,
        build_s,
        1e3 * float(np.percentile(lat, 50)),
        1e3 * float(np.percentile(lat, 95)),
        1.0 / float(lat.mean()),
        rec,
    )


def print_table(rows: list[Row], title: str) -> None:
    print(f"\n{title}")
    hdr = f"| {'method':<24} | {'params':<34} | {'build s':>8} | {'p50 ms':>7} | {'p95 ms':>7} | {'q/s':>7} | {'recall@10':>9} |"
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        b = "" if r.build_s is None else f"{r.build_s:.1f}"
        print(
            f"| {r.method:<24} | {r.params:<34} | {b:>8} | {r.p50_ms:>7.2f} | {r.p95_ms:>7.2f} | {r.qps:>7.1f} | {r.recall:>9.3f} |"
        )
    sys.stdout.flush()


def lance_rows(
    data: np.ndarray, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace, workdir: str
) -> list[Row]:
    import lance

    from pipeline.search.reader import open_store
    from pipeline.search.synthetic import GENRES, tracks_table

    n, dim = data.shape
    col = layer_column(12)
    uri = os.path.join(workdir, "tracks.lance")
    ids = [str(i) for i in range(n)]
    genres = [GENRES[i % len(GENRES)] for i in range(n)]
    meta = {
        "title": [f"Title {i}" for i in range(n)],
        "artist": [f"Artist {i % 97}" for i in range(n)],
        "genre": genres,
    }
    reuse = args.reuse and os.path.isdir(uri) and lance.dataset(uri).count_rows() == n
    if reuse:  # same seed and n: the same vectors, written by an earlier run
        ds = lance.dataset(uri)
    else:
        table = tracks_table(ids, {12: data}, meta)
        ds = lance.write_dataset(table, uri, schema=table.schema, mode="overwrite", max_rows_per_file=1 << 20)
        del table
    rows: list[Row] = []
    # prefiltered truth: genre 'jazz' (1 row in 6)
    jazz = np.flatnonzero(np.asarray(genres) == "jazz")
    truth_jazz = jazz[exact_topk(data[jazz], queries, args.k)]

    def run(nearest_extra: dict, ds=None) -> Callable[[np.ndarray], list[int]]:
        def fn(q: np.ndarray) -> list[int]:
            t = ds.to_table(
                columns=["track_id", "_distance"],
                nearest={"column": col, "q": q, "k": args.k, "metric": "cosine", **nearest_extra},
            )
            return [int(x) for x in t.column("track_id").to_pylist()]

        return fn

    def via_store(where: str | None = None) -> Callable[[np.ndarray], list[int]]:
        store = open_store(workdir)

        def fn(q: np.ndarray) -> list[int]:
            return [int(h.track_id) for h in store.search(q, layer=12, k=args.k, where=where)]

        return fn

    nq_flat = min(len(queries), args.flat_queries)
    res, lat = timed(run({"use_index": False}, ds), queries[:nq_flat])
    rows.append(
        row("lance flat (exact)", f"{nq_flat} queries", None, lat, recall(res, truth[:nq_flat], args.k))
    )
    print_table(rows, "partial")

    for itype in args.index_types:
        params = index_params(n, dim, itype)
        have = [x.index_type.upper() for x in ds.describe_indices() if list(x.field_names) == [col]]
        build: float | None = None
        if not (reuse and have == [itype]):
            t0 = time.perf_counter()
            ds.create_index(col, metric="cosine", replace=True, **params)
            build = time.perf_counter() - t0
        ds = lance.dataset(uri)
        parts = len(ds.get_ivf_model(f"{col}_idx").centroids)
        desc = ",".join(f"{k}={v}" for k, v in params.items() if k != "index_type")
        how = "reused from the workdir" if build is None else f"built in {build:.1f} s"
        print(f"{itype}: {how} ({desc}; {parts} partitions)", flush=True)
        d = search_params(itype, parts, args.k)
        if "HNSW" in itype:
            grid = sorted(
                {(d.nprobes, d.ef, d.refine_factor), (1, 100, 2), (2, 100, 1), (2, 200, 2), (parts, 100, 2)}
            )
            for npb, ef, rf in grid:
                npb = min(npb, parts)
                res, lat = timed(run({"nprobes": npb, "ef": ef, "refine_factor": rf}, ds), queries)
                mark = "*" if (npb, ef, rf) == (d.nprobes, d.ef, d.refine_factor) else ""
                rows.append(
                    row(
                        f"lance {itype}{mark}",
                        f"nprobes={npb} ef={ef} refine={rf}",
                        build,
                        lat,
                        recall(res, truth, args.k),
                    )
                )
                print_table(rows[-1:], "partial")
        else:
            grid = {(d.nprobes, d.refine_factor), (10, 10), (20, 1), (20, 5), (20, 20), (40, 10)}
            for npb, rf in sorted({(min(a, parts), b) for a, b in grid}):
                res, lat = timed(run({"nprobes": npb, "refine_factor": rf}, ds), queries)
                mark = "*" if (npb, rf) == (d.nprobes, d.refine_factor) else ""
                rows.append(
                    row(
                        f"lance {itype}{mark}",
                        f"nprobes={npb} refine={rf}",
                        build,
                        lat,
                        recall(res, truth, args.k),
                    )
                )
                print_table(rows[-1:], "partial")
            # adaptive probing (what a filtered query uses), unfiltered here, for reference
            res, lat = timed(
                run({"minimum_nprobes": d.nprobes, "refine_factor": d.refine_factor}, ds), queries
            )
            rows.append(
                row(
                    f"lance {itype}",
                    f"minimum_nprobes={d.nprobes} refine={d.refine_factor}",
                    build,
                    lat,
                    recall(res, truth, args.k),
                )
            )
        # what users get: Store.search with the defaults (+ metadata columns), and with a prefilter
        res, lat = timed(via_store(), queries)
        rows.append(row(f"Store.search {itype}", "defaults", build, lat, recall(res, truth, args.k)))
        res, lat = timed(via_store("genre = 'jazz'"), queries)
        rows.append(
            row(
                f"Store.search {itype}",
                "defaults, where genre='jazz' (1/6)",
                build,
                lat,
                recall(res, truth_jazz, args.k),
            )
        )
        print_table(rows[-2:], "partial")
    return rows


def faiss_rows(data: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int) -> list[Row]:
    try:
        import faiss
    except ImportError:
        print("faiss not importable: skipping the faiss rows (pip install faiss-cpu)")
        return []
    n, dim = data.shape
    rows: list[Row] = []
    nlist = max(1, int(round(math.sqrt(n))))
    t0 = time.perf_counter()
    quant = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quant, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    train = data[np.random.default_rng(0).choice(n, min(n, 256 * nlist), replace=False)]
    ivf.train(train)
    ivf.add(data)
    build = time.perf_counter() - t0
    for nprobe in (8, 16, 32):
        ivf.nprobe = nprobe
        res, lat = timed(lambda q: ivf.search(q[None, :], k)[1][0].tolist(), queries)
        rows.append(
            row("faiss IVF-Flat", f"nlist={nlist} nprobe={nprobe}", build, lat, recall(res, truth, k))
        )
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 40
    hnsw.add(data)
    build = time.perf_counter() - t0
    for ef in (32, 64, 128):
        hnsw.hnsw.efSearch = ef
        res, lat = timed(lambda q: hnsw.search(q[None, :], k)[1][0].tolist(), queries)
        rows.append(row("faiss HNSW-Flat", f"M=32 efSearch={ef}", build, lat, recall(res, truth, k)))
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=200_000, help="number of vectors (default 200000)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--clusters", type=int, default=2000, help="number of Gaussian clusters")
    p.add_argument("--spread", type=float, default=1.0, help="cluster radius relative to the centre norm")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--flat-queries", type=int, default=20, help="queries for the (slow) Lance flat search")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--index-types", nargs="+", default=["IVF_PQ", "IVF_HNSW_SQ"])
    p.add_argument("--no-faiss", action="store_true")
    p.add_argument("--workdir", default=None, help="where to write the Lance table (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--vectors",
        choices=["synthetic", "clips"],
        default="synthetic",
        help="synthetic clusters (default) or real-shaped: noisy copies of window vectors of the shared clips",
    )
    p.add_argument(
        "--clip-model", choices=["full", "golden"], default="full", help="model for --vectors clips"
    )
    p.add_argument(
        "--noise", type=float, default=0.5, help="--vectors clips: noise / median nearest-neighbour distance"
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the table (and an index of the same type) left in --workdir by an earlier run",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-search-")
    os.makedirs(workdir, exist_ok=True)
    try:
        t0 = time.perf_counter()
        if args.vectors == "clips":
            base = clip_window_vectors(args.clip_model, args.workdir or tempfile.gettempdir())
            data, queries, nn = real_shaped(base, args.n, args.queries, args.noise, args.seed)
            args.dim = data.shape[1]
            what = (
                f"{args.n} x {args.dim} real-shaped: noisy copies of {len(base)} window vectors of the shared clips "
                f"({args.clip_model} model, layer 12 / last; noise {args.noise} x median NN distance {nn:.3g})"
            )
        else:
            data, centres = clustered(args.n, args.dim, args.clusters, args.spread, args.seed)
            queries = queries_from(centres, args.queries, args.spread, args.seed + 1)
            what = f"{args.n} x {args.dim} in {args.clusters} clusters (spread {args.spread})"
        truth = exact_topk(data, queries, args.k)
        print(
            f"data: {what}, {args.queries} queries, k={args.k}; generated in {time.perf_counter() - t0:.1f} s; "
            f"{os.cpu_count()} CPUs",
            flush=True,
        )
        rows: list[Row] = []
        res, lat = timed(
            lambda q: np.argsort(-(data @ q))[: args.k].tolist(), queries[: min(50, len(queries))]
        )
        rows.append(
            row("numpy exact (memory)", "matmul + sort", None, lat, recall(res, truth[: len(res)], args.k))
        )
        rows += lance_rows(data, queries, truth, args, workdir)
        if not args.no_faiss:
            rows += faiss_rows(data, queries, truth, args.k)
        print_table(rows, f"n={args.n} dim={args.dim} k={args.k} ('*' = default search parameters)")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
