"""The search and build-index commands (``jobs/search.py``, ``jobs/build_index.py``, the
``musicfm-search`` / ``musicfm-build-index`` console scripts): flags, argument checks, running
the search / index build, and printing a readable table or JSON.

Exit codes: 0 ok; 2 bad arguments or a request the store refuses (unknown track or layer, wrong
model, bad ``--where``...), always as one line on stderr without a traceback; 1 anything else
(also one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from pipeline.cli import OneLineParser, add_setting, add_store_args, positive_int
from pipeline.errors import SearchError, one_line, redact
from pipeline.search.index import INDEX_TYPES
from pipeline.search.reader import LEVELS, MAX_K, AudioQuery, SearchResults, TrackQuery, open_store

__all__ = [
    "IndexSettings",
    "OneLineArgumentParser",
    "SearchSettings",
    "format_index_reports",
    "format_table",
    "positive_int",
    "run_build_index",
    "run_search",
]


OneLineArgumentParser = OneLineParser  # the jobs' shared parser: one-line errors, exit 2


@dataclass(frozen=True)
class SearchSettings:
    """The search job's settings: how many results, at which level (each default is the knob's
    one; ``-k`` is checked by :func:`k_arg`, ``--level`` by its choices)."""

    k: int = 10
    level: str = "track"


@dataclass(frozen=True)
class IndexSettings:
    """The build_index job's settings: which index, over which tables."""

    index_type: str = "auto"
    tables: tuple[str, ...] = ("tracks", "windows")


def k_arg(text: str) -> int:
    """argparse type for ``-k``: 1..MAX_K."""
    v = positive_int(text)
    if v > MAX_K:
        raise argparse.ArgumentTypeError(f"k must be at most {MAX_K}, got {v}")
    return v


def _fail(prog: str, exc: BaseException, code: int, err: TextIO) -> int:
    err.write(f"{prog}: error: {one_line(redact(str(exc))) or type(exc).__name__}\n")
    return code


# --------------------------------------------------------------------------- search


def _fmt_time(s: float | None) -> str:
    if s is None:
        return ""
    m, sec = divmod(float(s), 60.0)
    return f"{int(m)}:{sec:04.1f}"


def _cut(text: Any, width: int) -> str:
    s = "" if text is None else " ".join(str(text).split())
    return s if len(s) <= width else s[: width - 1] + "…"


def format_table(results: SearchResults, max_width: int = 32) -> str:
    """A readable table: rank, score, track_id, title / artist (when the store has them), window
    (``m:ss.s-m:ss.s`` at window level); then one line on how the search ran."""
    meta_cols = [c for c in ("title", "artist") if any(c in h.metadata for h in results)]
    headers = ["rank", "score", "track_id", *meta_cols]
    window = results.level == "window"
    if window:
        headers.append("window")
    rows = []
    for h in results:
        r = [str(h.rank), f"{h.score:.4f}", _cut(h.track_id, max_width)]
        r += [_cut(h.metadata.get(c), max_width) for c in meta_cols]
        if window:
            r.append(f"{_fmt_time(h.start_s)}-{_fmt_time(h.end_s)}")
        rows.append(r)
    widths = [
        max(len(headers[i]), *(len(r[i]) for r in rows)) if rows else len(headers[i])
        for i in range(len(headers))
    ]
    right = {0, 1}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(headers)] + [line(r) for r in rows]
    if not rows:
        out = ["no results"]
    how = (
        "exact search (no index)"
        if results.exact
        else (
            f"{results.index_type} (nprobes {results.nprobes}, refine {results.refine_factor}"
            + (f", ef {results.ef}" if results.ef else "")
            + ")"
        )
    )
    q = results.query + (f" {results.query_track_id}" if results.query_track_id else "")
    out.append(
        f"# {len(results)} results, query {q}, layer {results.layer}, {results.level} level, {how}, "
        f"{results.elapsed_ms:.1f} ms"
    )
    return "\n".join(out)


def _load_vector(path: str) -> np.ndarray:
    try:
        v = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SearchError(f"cannot read --vector-file {path}: {e}") from None
    v = np.asarray(v)
    if v.ndim == 2 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 1 or not np.issubdtype(v.dtype, np.number):
        raise SearchError(
            f"--vector-file {path} must hold one 1-D numeric vector, got shape {v.shape} {v.dtype}"
        )
    return v.astype(np.float32)


def run_search(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None, prog: str = "search"
) -> int:
    """Run ``jobs/search.py`` with parsed ``args``; print the table (or JSON) to ``out``."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        store = open_store(args.store, args.storage_options, model=args.model)
        query: Any
        if args.track_id is not None:
            query = TrackQuery(args.track_id)
        elif args.vector_file is not None:
            query = _load_vector(args.vector_file)
        else:
            query = AudioQuery(args.audio)
            if args.checkpoint or args.stats or args.model_config:
                store.load_model(args.checkpoint, args.stats, args.model_config, args.device)
        res = store.search(
            query,
            layer=args.layer,
            k=args.k,
            where=args.where,
            level=args.level,
            nprobes=args.nprobes,
            refine_factor=args.refine_factor,
        )
    except SearchError as e:
        return _fail(prog, e, 2, err)
    except Exception as e:  # noqa: BLE001 - one line, no traceback, for any failure
        return _fail(prog, e, 1, err)
    if args.json:
        out.write(json.dumps({"store": store.root, **res.to_dict()}, default=str) + "\n")
    else:
        out.write(format_table(res) + "\n")
    return 0


# --------------------------------------------------------------------------- build index


def format_index_reports(reports: Sequence[Any]) -> str:
    """One line per (table, column): action, index type, parameters, time, reason."""
    if not reports:
        return "no vector columns to index"
    lines = []
    for r in reports:
        params = " ".join(f"{k}={v}" for k, v in r.params.items())
        lines.append(
            f"{r.table}.{r.column}: {r.action}"
            + (f" {r.index_type}" if r.index_type else "")
            + (f" ({params})" if params else "")
            + f", {r.num_rows} rows x {r.dim}, {r.seconds:.1f} s"
            + (f" - {r.reason}" if r.reason else "")
        )
    return "\n".join(lines)


def run_build_index(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None, prog: str = "build_index"
) -> int:
    """Run ``jobs/build_index.py`` with parsed ``args``."""
    from pipeline.search.index import build_indexes

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        reports = build_indexes(
            args.store,
            layers=args.layer,
            storage_options=args.storage_options,
            index_type=args.index_type,
            tables=list(args.tables),
            min_rows=args.min_rows,
            replace=args.replace,
        )
    except (SearchError, ValueError) as e:
        return _fail(prog, e, 2, err)
    except Exception as e:  # noqa: BLE001
        return _fail(prog, e, 1, err)
    if args.json:
        out.write(json.dumps([r.to_dict() for r in reports]) + "\n")
    else:
        out.write(format_index_reports(reports) + "\n")
    return 0


# --------------------------------------------------------------------------- commands


def search_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="search",
        description="Find the tracks most similar to a track, an audio file or a vector.",
        settings=(SearchSettings,),
    )
    add_store_args(p)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--track-id", help="query by a track of the store (left out of the results)")
    q.add_argument("--audio", help="query by an audio file path or URI (embedded with the store's model)")
    q.add_argument("--vector-file", help="query by a vector saved with numpy.save (.npy, shape (D,))")
    p.add_argument("--layer", type=int, default=None, help="layer to compare (default: the store's highest)")
    add_setting(p, "-k", settings=SearchSettings, type=k_arg, help=f"number of results (1..{MAX_K})")
    p.add_argument(
        "--where", default=None, help="SQL predicate on the store's columns, applied before the search"
    )
    add_setting(p, "--level", settings=SearchSettings, choices=LEVELS, stated=False,
                help="compare track vectors or window vectors")  # fmt: skip
    p.add_argument(
        "--nprobes", type=positive_int, default=None, help="IVF partitions to probe (a minimum with --where)"
    )
    p.add_argument("--refine-factor", type=positive_int, default=None, help="re-rank k*F candidates exactly")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--checkpoint", default=None, help="model for --audio (default: the one in the store's run records)"
    )
    p.add_argument("--stats", default=None, help="stats JSON of the --checkpoint")
    p.add_argument("--model-config", default=None, help="model config JSON of the --checkpoint")
    p.add_argument("--device", default=None, help="device for the audio model (default: cuda if available)")
    p.add_argument(
        "--model",
        default=None,
        metavar="MODEL_ID",
        help="search the newest kept run of this model (an earlier model after a change; see "
        "--keep-previous of the refresh job); default: the store's current model",
    )
    return p


def search_main(argv: list[str] | None = None) -> int:
    args = search_parser().parse_args(argv)
    return run_search(args, prog="search")


def _index_type(text: str) -> str:
    v = text.strip().upper()
    if v not in ("AUTO", *INDEX_TYPES):
        raise argparse.ArgumentTypeError(f"expected auto, {', '.join(INDEX_TYPES)}; got {text!r}")
    return v.lower() if v == "AUTO" else v


def _min_rows(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def build_index_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="build_index",
        description="Build cosine ANN indexes over the store's vectors.",
        settings=(IndexSettings,),
    )
    add_store_args(p)
    p.add_argument(
        "--layer",
        type=int,
        action="append",
        default=None,
        help="layer to index (repeatable; default: every layer)",
    )
    add_setting(p, "--index-type", settings=IndexSettings, type=_index_type, stated=False,
                help=f"auto (default), {' or '.join(INDEX_TYPES)}")  # fmt: skip
    add_setting(p, "--tables", settings=IndexSettings, nargs="+", choices=IndexSettings.tables, stated=False,
                help="tables to index (both by default)")  # fmt: skip
    p.add_argument(
        "--min-rows",
        type=_min_rows,
        default=None,
        help="build no index below this many rows (default: exact-search threshold for auto)",
    )
    p.add_argument("--replace", action="store_true", help="retrain existing indexes instead of updating them")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    return p


def build_index_main(argv: list[str] | None = None) -> int:
    args = build_index_parser().parse_args(argv)
    return run_build_index(args, prog="build_index")
