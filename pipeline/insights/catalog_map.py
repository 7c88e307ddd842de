"""A map of the catalog: 2-D coordinates for every track, an interactive HTML page and a PNG.

:func:`catalog_map` reduces one layer's track vectors with PCA (to ``pca_dim`` dimensions,
unit-normalised rows first, so distances follow cosine) and then UMAP (umap-learn, fixed seed,
cosine metric) to two dimensions, stored as ``map_x`` / ``map_y`` in ``tracks``.

Bounded memory for large stores: PCA and UMAP are fitted on a seeded random sample of at most
``fit_sample`` tracks (50,000 by default); every track is then placed with the fitted model
(the membership-weighted mean of the map positions of its nearest fitted points, UMAP's own
placement of new points before its refinement epochs, see :meth:`Reducer.transform`) fragment
group by fragment group (Ray tasks for large stores), so no process holds more than the sample
plus one group of vectors. When the whole store fits in the
sample, the fitted embedding itself is used.

Outputs: a self-contained HTML page (plotly, its JavaScript inlined: nothing is fetched when it
is viewed; hover shows title, artist and track id; colour by any column: metadata or a probe's
``tag_...`` prediction; at most ``plot_max`` points, a seeded sample above that) and a PNG
(matplotlib, every track up to ``png_max``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.insights.vectors import (
    RAY_MIN_ROWS,
    StoreRef,
    check_layers,
    fragment_groups,
    read_fragments,
    run_tasks,
    store_ref,
    to_matrix,
    unit_rows,
)
from pipeline.schemas import layer_column

__all__ = ["MapReport", "MapSettings", "catalog_map", "write_html", "write_png"]

MAX_CATEGORIES = 20  # colours for a categorical column; the rest become "other"


@dataclass(frozen=True)
class MapSettings:
    pca_dim: int = 50
    n_neighbors: int = 15
    min_dist: float = 0.1
    seed: int = 42
    fit_sample: int = 50_000
    plot_max: int = 100_000
    png_max: int = 2_000_000
    group_rows: int = 50_000  # tracks placed per fragment group (bounds memory per task)


@dataclass
class MapReport:
    layer: int
    rows: int = 0
    fit_rows: int = 0
    ray: bool = False
    html: str | None = None
    png: str | None = None
    version: int | None = None
    stage_s: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0

    def summary(self) -> str:
        st = ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_s.items())
        return (
            f"map of {self.rows} tracks (layer {self.layer}, fitted on {self.fit_rows}{', Ray' if self.ray else ''})"
            f" -> map_x/map_y (tracks version {self.version}), {self.html}, {self.png}; {self.wall_s:.1f} s ({st})"
        )


@dataclass
class Reducer:
    """Fitted PCA (mean, components) and UMAP; :meth:`transform` places new vectors."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (P, D)
    umap: Any  # umap.UMAP or None (too few tracks: the first two PCA axes)

    def project(self, x: np.ndarray) -> np.ndarray:
        return (unit_rows(x) - self.mean) @ self.components.T  # (N, P)

    def transform(self, x: np.ndarray, refine: bool = False) -> np.ndarray:
        """2-D places of new vectors (N, D) -> (N, 2).

        Default: UMAP's own placement of a new point before refinement, the membership-weighted
        mean of the map positions of its nearest fitted points (``transform_mode="graph"`` gives
        the weights). ``refine=True`` runs ``UMAP.transform`` in full (its layout epochs: ~20x
        slower, measured 171 s for 20k points on the loaded 2-core dev machine)."""
        p = self.project(x)
        if self.umap is None:
            return p[:, :2].astype(np.float32)
        if refine:
            return np.asarray(self.umap.transform(p), np.float32)
        self.umap.transform_mode = "graph"
        try:
            g = self.umap.transform(p).tocsr()  # (N, n_fit) membership strengths
        finally:
            self.umap.transform_mode = "embedding"
        w = np.asarray(g.sum(axis=1)).ravel()  # (N,)
        xy = np.asarray(g @ self.umap.embedding_, np.float64) / np.where(w > 0, w, 1.0)[:, None]
        lost = np.flatnonzero(w <= 0)  # no fitted point within reach: UMAP's full transform
        if len(lost):
            xy[lost] = self.umap.transform(p[lost])
        return xy.astype(np.float32)


def _principal_axes(u: np.ndarray, mean: np.ndarray, p: int) -> np.ndarray:
    """The first ``p`` principal axes (p, D) of the rows ``u``: eigenvectors of the D x D
    covariance (accumulated in float64 block by block), largest eigenvalue first, each signed so
    that its largest coordinate is positive. A thin SVD of the centred (N, D) sample gives the
    same axes but costs ~N D^2 in LAPACK and a copy of the sample (the 50,000 x 1024 sample of a
    1M-track map sat in it for minutes on the 2-core dev machine); this is one (D, N) x (N, D)
    product and a D x D eigendecomposition."""
    d = u.shape[1]
    cov = np.zeros((d, d), np.float64)
    for s in range(0, len(u), 16384):
        b = (u[s : s + 16384] - mean).astype(np.float64)
        cov += b.T @ b
    w, v = np.linalg.eigh(cov)  # ascending
    axes = v[:, ::-1][:, :p].T  # (p, D)
    big = np.argmax(np.abs(axes), axis=1)
    axes *= np.sign(axes[np.arange(len(axes)), big])[:, None]
    return np.ascontiguousarray(axes, np.float32)


def fit_reducer(x: np.ndarray, s: MapSettings) -> tuple[Reducer, np.ndarray]:
    """Fit PCA + UMAP on ``x`` (N, D); returns the reducer and the sample's 2-D coordinates."""
    u = unit_rows(x)
    mean = u.mean(0)
    n = len(u)
    p = max(2, min(s.pca_dim, u.shape[1], n))
    comps = _principal_axes(u, mean, p)
    if comps.shape[0] < 2:
        comps = np.vstack([comps, np.zeros((2 - comps.shape[0], u.shape[1]), np.float32)])
    proj = (u - mean) @ comps.T
    if n < 5:
        red = Reducer(mean, comps, None)
        return red, proj[:, :2].astype(np.float32)
    import umap

    model = umap.UMAP(
        n_components=2,
        n_neighbors=max(2, min(s.n_neighbors, n // 3)),  # tiny stores: local structure
        min_dist=s.min_dist,
        metric="euclidean",
        random_state=s.seed,
        transform_seed=s.seed,
        n_jobs=1,  # what a seed implies anyway; said explicitly, UMAP does not warn
        init="spectral" if n > 10 else "random",
    )
    emb = model.fit_transform(proj)
    return Reducer(mean, comps, model), np.asarray(emb, np.float32)


def _map_task(fragment_ids: Sequence[int], ref: StoreRef, layer: int, reducer: Reducer) -> pa.Table:
    col = layer_column(layer)
    t = read_fragments(ref, fragment_ids, ["track_id", col])
    xy = reducer.transform(to_matrix(t[col])) if t.num_rows else np.zeros((0, 2), np.float32)
    # a copy of the ids: the column read by Lance shares its allocation with the vectors, so
    # returning it would keep every group's vectors alive (+200 MB per 50k x 1024-d group)
    ids = pa.array(t["track_id"].to_pylist(), pa.string())
    return pa.table({"track_id": ids, "map_x": xy[:, 0], "map_y": xy[:, 1]})


def catalog_map(
    store: str,
    layer: int,
    out_dir: str = ".",
    color_by: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    settings: MapSettings | None = None,
    use_ray: bool | None = None,
    ray_min_rows: int = RAY_MIN_ROWS,
    name: str = "catalog_map",
) -> MapReport:
    """Compute the map, write ``map_x`` / ``map_y`` and ``{out_dir}/{name}.html`` / ``.png``."""
    from pipeline.errors import InvalidQueryError
    from pipeline.insights.vectors import write_track_columns

    t_all = time.perf_counter()
    s = settings or MapSettings()
    ref = store_ref(store, storage_options)
    ds = ref.open()
    check_layers(ds, [layer])
    if color_by and color_by not in ds.schema.names:
        raise InvalidQueryError(
            f"--color-by: no column {color_by!r} in tracks (columns: {', '.join(ds.schema.names)})"
        )
    rep = MapReport(layer=layer)
    n = ds.count_rows()
    rep.rows = n
    if n == 0:
        raise InvalidQueryError("the store has no tracks to map")
    t0 = time.perf_counter()
    rng = np.random.default_rng(s.seed)
    whole = n <= s.fit_sample
    idx = np.arange(n) if whole else np.sort(rng.choice(n, s.fit_sample, replace=False))
    sample = ds.take(idx, columns=["track_id", layer_column(layer)])
    reducer, emb = fit_reducer(to_matrix(sample[layer_column(layer)]), s)
    rep.fit_rows = len(idx)
    rep.stage_s["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if whole:
        coords = pa.table({"track_id": sample["track_id"], "map_x": emb[:, 0], "map_y": emb[:, 1]})
    else:
        if use_ray is None:
            use_ray = n >= ray_min_rows
        n_groups = max(1, n // s.group_rows)
        if use_ray:
            import ray

            from pipeline.flow.runtime import ensure_ray

            ensure_ray()
            n_groups = max(n_groups, 2 * int(ray.cluster_resources().get("CPU", 1)))
        rep.ray = bool(use_ray)
        parts = run_tasks(
            _map_task,
            fragment_groups(ds, n_groups),
            {"ref": ref, "layer": layer, "reducer": reducer},
            bool(use_ray),
        )
        coords = pa.concat_tables(parts)
    rep.stage_s["transform"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rep.version = write_track_columns(ref, coords)
    rep.stage_s["write"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    cols = ["track_id", "map_x", "map_y"] + [c for c in ("title", "artist") if c in ds.schema.names]
    if color_by and color_by not in cols:
        cols.append(color_by)
    table = ref.latest().open().to_table(columns=cols)
    rep.png = write_png(table, os.path.join(out_dir, f"{name}.png"), color_by, s, layer)
    rep.html = write_html(table, os.path.join(out_dir, f"{name}.html"), color_by, s, layer)
    rep.stage_s["plots"] = time.perf_counter() - t0
    rep.wall_s = time.perf_counter() - t_all
    return rep


# --------------------------------------------------------------------------- plots


def _colour_values(table: pa.Table, color_by: str | None) -> tuple[str, list[Any] | np.ndarray | None]:
    """("none" | "numeric" | "category", values) for the colouring column."""
    if not color_by:
        return "none", None
    col = table[color_by]
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        return "numeric", np.asarray(col.to_numpy(zero_copy_only=False), np.float64)
    vals = col.to_pylist()
    vals = [(v[0] if v else None) if isinstance(v, list) else v for v in vals]
    vals = ["(none)" if v is None else str(v) for v in vals]
    counts: dict[str, int] = {}
    for v in vals:
        counts[v] = counts.get(v, 0) + 1
    top = set(sorted(counts, key=lambda k: -counts[k])[: MAX_CATEGORIES - 1])
    if len(counts) > MAX_CATEGORIES:
        vals = [v if v in top else "other" for v in vals]
    return "category", vals


def _subsample(n: int, k: int, seed: int) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def write_png(table: pa.Table, path: str, color_by: str | None, s: MapSettings, layer: int) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    idx = _subsample(table.num_rows, s.png_max, s.seed)
    t = table.take(pa.array(idx))
    x = t["map_x"].to_numpy(zero_copy_only=False)
    y = t["map_y"].to_numpy(zero_copy_only=False)
    size = float(np.clip(2000.0 / max(1, len(x)) ** 0.5, 0.2, 30.0))
    fig, ax = plt.subplots(figsize=(9, 8), dpi=110)
    kind, vals = _colour_values(t, color_by)
    if kind == "numeric":
        sc = ax.scatter(x, y, c=vals, s=size, cmap="viridis", linewidths=0)
        fig.colorbar(sc, ax=ax, label=color_by)
    elif kind == "category":
        cats = sorted(set(vals))  # type: ignore[arg-type]
        cmap = plt.get_cmap("tab20")
        arr = np.asarray(vals, dtype=object)
        for i, c in enumerate(cats):
            m = arr == c
            ax.scatter(x[m], y[m], s=size, color=cmap(i % 20), label=c, linewidths=0)
        ax.legend(markerscale=max(1.0, 6.0 / size), fontsize=7, loc="best", title=color_by)
    else:
        ax.scatter(x, y, s=size, color="#3b6ea8", linewidths=0)
    if table.num_rows <= 40 and "track_id" in t.column_names:
        for xi, yi, tid in zip(x, y, t["track_id"].to_pylist(), strict=True):
            ax.annotate(tid, (xi, yi), fontsize=6, alpha=0.8)
    ax.set_title(f"catalog map: {table.num_rows} tracks, layer {layer} (PCA + UMAP)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_html(table: pa.Table, path: str, color_by: str | None, s: MapSettings, layer: int) -> str:
    import plotly.graph_objects as go

    idx = _subsample(table.num_rows, s.plot_max, s.seed)
    t = table.take(pa.array(idx))
    x = t["map_x"].to_numpy(zero_copy_only=False)
    y = t["map_y"].to_numpy(zero_copy_only=False)
    title = t["title"].to_pylist() if "title" in t.column_names else [None] * len(x)
    artist = t["artist"].to_pylist() if "artist" in t.column_names else [None] * len(x)
    hover = [
        f"{ti or ''}{' — ' + a if a else ''}<br>{tid}"
        for ti, a, tid in zip(title, artist, t["track_id"].to_pylist(), strict=True)
    ]
    kind, vals = _colour_values(t, color_by)
    fig = go.Figure()
    marker: dict[str, Any] = {"size": 5 if len(x) < 20_000 else 3}
    if kind == "category":
        arr = np.asarray(vals, dtype=object)
        h = np.asarray(hover, dtype=object)
        for c in sorted(set(vals)):  # type: ignore[arg-type]
            m = arr == c
            fig.add_trace(go.Scattergl(x=x[m], y=y[m], mode="markers", name=str(c), text=h[m].tolist(),
                                       hovertemplate="%{text}<extra>" + str(c) + "</extra>", marker=marker))  # fmt: skip
    else:
        if kind == "numeric":
            marker = {**marker, "color": vals, "colorscale": "Viridis", "showscale": True,
                      "colorbar": {"title": {"text": color_by}}}  # fmt: skip
        fig.add_trace(go.Scattergl(x=x, y=y, mode="markers", text=hover, hovertemplate="%{text}<extra></extra>",
                                   marker=marker, name="tracks"))  # fmt: skip
    note = "" if len(x) == table.num_rows else f" ({len(x)} shown)"
    fig.update_layout(
        title=f"Catalog map: {table.num_rows} tracks{note}, layer {layer}"
        + (f", colour: {color_by}" if color_by else ""),
        template="plotly_white",
        xaxis={"showticklabels": False},
        yaxis={"showticklabels": False},
        legend={"title": {"text": color_by or ""}},
    )
    fig.write_html(path, include_plotlyjs=True, full_html=True, include_mathjax=False,
                   config={"displaylogo": False})  # fmt: skip
    return path


def settings_json(s: MapSettings) -> str:
    return json.dumps(asdict(s), sort_keys=True)
