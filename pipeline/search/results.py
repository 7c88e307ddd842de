"""What a similarity search returns (:class:`SearchHit`, :class:`SearchResults`), the explicit
query kinds (:class:`TrackQuery`, :class:`AudioQuery`), an ANN index's description
(:class:`IndexInfo`) and the search's limits. Re-exported by :mod:`pipeline.search.reader`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_LAYER = 12
#: A long-lived reader (the service, the page) reopens the store's tables at most this often (s).
TABLES_REFRESH_S = 30.0
LEVELS = ("track", "window")
MAX_K = 1000


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SearchHit:
    """One result. ``score`` is the cosine similarity to the query (higher is closer).

    ``metadata`` holds the track's catalog columns (title, artist, ...) plus ``uri``,
    ``duration_s`` and ``num_windows``. Window-level hits carry the best window of the track:
    ``start_s`` / ``end_s`` (seconds) and ``window_ix``; they are ``None`` at track level.
    """

    rank: int
    track_id: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    start_s: float | None = None
    end_s: float | None = None
    window_ix: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.start_s is None:
            for key in ("start_s", "end_s", "window_ix"):
                d.pop(key)
        return d


class SearchResults(list):
    """The hits (a ``list[SearchHit]``, best first) plus how the search ran.

    Attributes: ``exact`` (no ANN index was used), ``index_type`` (``None`` when exact),
    ``nprobes`` / ``refine_factor`` / ``ef`` (the ANN parameters used), ``level``, ``layer``,
    ``k``, ``query`` (``"vector"``, ``"track"`` or ``"audio"``), ``query_track_id``,
    ``elapsed_ms``.
    """

    def __init__(self, hits: Sequence[SearchHit] = (), **info: Any) -> None:
        super().__init__(hits)
        self.exact: bool = bool(info.get("exact", True))
        self.index_type: str | None = info.get("index_type")
        self.nprobes: int | None = info.get("nprobes")
        self.refine_factor: int | None = info.get("refine_factor")
        self.ef: int | None = info.get("ef")
        self.level: str = info.get("level", "track")
        self.layer: int | None = info.get("layer")
        self.k: int | None = info.get("k")
        self.query: str = info.get("query", "vector")
        self.query_track_id: str | None = info.get("query_track_id")
        self.elapsed_ms: float = float(info.get("elapsed_ms", 0.0))

    def info(self) -> dict[str, Any]:
        """How the search ran, as a JSON-able dict (everything but the hits)."""
        return {
            "level": self.level,
            "layer": self.layer,
            "k": self.k,
            "query": self.query,
            "query_track_id": self.query_track_id,
            "exact": self.exact,
            "index_type": self.index_type,
            "nprobes": self.nprobes,
            "refine_factor": self.refine_factor,
            "ef": self.ef,
            "elapsed_ms": round(self.elapsed_ms, 3),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.info(), "hits": [h.to_dict() for h in self]}


@dataclass(frozen=True)
class TrackQuery:
    """Explicit query by ``track_id`` (a plain ``str`` is tried as a track id first)."""

    track_id: str


@dataclass(frozen=True)
class AudioQuery:
    """Explicit query by audio path or URI (a plain ``str`` that is no track id is audio)."""

    uri: str


@dataclass(frozen=True)
class IndexInfo:
    """The ANN index of one vector column, as Lance describes it."""

    name: str
    index_type: str
    metric: str
    num_partitions: int | None
    num_indexed_rows: int


def json_safe(v: Any) -> Any:
    """A value ready for JSON: non-finite floats become ``None``, dates ISO 8601 strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v
