"""Snapshots of a store as Lance tags: search stays whole through a model change, earlier models
stay queryable, and a rollback returns the store to an earlier run's state.

Tags, on each vector table (``tracks``, ``windows``, ``frames``):

``search``
    Set while a migration (a refresh whose settings differ from the stored tracks': a new
    checkpoint, other layers or windows) is in progress: the versions of the last complete
    store before it. Readers (:func:`reading_versions`) open these versions, so every query
    answers over the whole catalog from the old model while the new one is built chunk by chunk
    beside it. A killed migration leaves the tag in place; its rerun resumes. When a run ends
    ``ok``, :func:`publish` deletes the tag of ``tracks`` first (that one commit is the switch:
    readers decide from it) and then the others.
``run-<run_id>``
    The versions each ``ok`` run left. The newest ``keep_previous + 1`` are kept
    (``--keep-previous``): a search ``--model`` of an earlier model opens its run's versions, and
    :func:`rollback` restores them. Tagged versions survive version clean-up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.store.commits import retry_write
from pipeline.store.tables import Store

log = logging.getLogger("musicfm.store")

#: Tables whose versions make up a snapshot (``runs``, ``errors`` only grow).
SNAPSHOT_TABLES = ("tracks", "windows", "frames")
SEARCH_TAG = "search"
RUN_TAG_PREFIX = "run-"


def run_tag(run_id: str) -> str:
    return RUN_TAG_PREFIX + run_id


def _tags(ds: Any) -> dict[str, int]:
    return {name: int(t["version"]) for name, t in ds.tags.list().items()}


def _create_tag(store: Store, table: str, name: str, version: int) -> None:
    """Tag ``table`` at ``version``, retried like a commit when the connection broke (a PUT that
    landed, its answer lost, is found on the next try)."""

    def landed() -> bool | None:
        return True if _tags(store.open(table)).get(name) == version else None

    retry_write(f"tag {name} of {table}", lambda: store.open(table).tags.create(name, version), landed)


def _delete_tag(store: Store, table: str, name: str) -> None:
    """Delete the tag ``name`` of ``table`` if the table and the tag are there, retried when the
    connection broke."""

    def landed() -> bool | None:
        return True if name not in _tags(store.open(table)) else None

    ds = store.open(table)
    if ds is not None and name in _tags(ds):
        retry_write(f"removal of tag {name} of {table}", lambda: store.open(table).tags.delete(name), landed)


def pin_for_search(store: Store) -> bool:
    """Tag the current versions ``search`` (a migration starts), unless a tag is already there (a
    resumed migration keeps the complete old store). Returns whether a pin is in place."""
    tracks = store.open("tracks")
    if tracks is None or tracks.count_rows() == 0:
        return False  # nothing to keep whole
    if SEARCH_TAG in _tags(tracks):
        return True
    for name in ("frames", "windows", "tracks"):  # tracks last: readers decide from it
        ds = store.open(name)
        if ds is not None:
            _create_tag(store, name, SEARCH_TAG, ds.version)
    log.info("migration: search pinned to tracks v%d until the new model covers the store", tracks.version)
    return True


def publish(store: Store, run_id: str, keep_previous: int) -> dict[str, int]:
    """A run ended ``ok``: tag its versions ``run-<run_id>``, end a migration's ``search`` pin (the
    switch), and delete the run tags beyond the newest ``keep_previous + 1``. Returns the tagged
    versions."""
    versions: dict[str, int] = {}
    for name in SNAPSHOT_TABLES:
        ds = store.open(name)
        if ds is None:
            continue
        _create_tag(store, name, run_tag(run_id), ds.version)
        versions[name] = ds.version
    for name in ("tracks", "windows", "frames"):  # tracks first: the switch
        _delete_tag(store, name, SEARCH_TAG)
    _prune(store, keep_previous)
    return versions


def _prune(store: Store, keep_previous: int) -> None:
    for run_id in snapshot_runs(store)[keep_previous + 1 :]:
        for table in SNAPSHOT_TABLES:
            _delete_tag(store, table, run_tag(run_id))


@dataclass(frozen=True)
class Snapshot:
    """Versions a reader opens (``None``: the latest) and why."""

    versions: Mapping[str, int | str | None]
    reason: str  # "latest", "migration in progress", "run <run_id>"


def reading_versions(open_table: Any, run_id: str | None = None) -> Snapshot:
    """What a reader opens: the tags of run ``run_id`` when given, else the ``search`` pin of a
    migration in progress, else the latest versions. ``open_table(name)`` opens a table at its
    latest version (None when absent)."""
    tracks = open_table("tracks")
    tags = _tags(tracks) if tracks is not None else {}
    if run_id is not None:
        if run_tag(run_id) not in tags:
            raise KeyError(f"run {run_id} has no snapshot (older than --keep-previous, or not ok)")
        tag, reason = run_tag(run_id), f"run {run_id}"
    elif SEARCH_TAG in tags:
        tag, reason = SEARCH_TAG, "migration in progress"
    else:
        return Snapshot({t: None for t in SNAPSHOT_TABLES}, "latest")
    versions: dict[str, int | str | None] = {"tracks": tag}
    for name in SNAPSHOT_TABLES[1:]:  # a table made after the snapshot was not part of it
        ds = open_table(name)
        versions[name] = tag if ds is not None and tag in _tags(ds) else None
    return Snapshot(versions, reason)


def snapshot_runs(store: Store) -> list[str]:
    """Run ids with a snapshot, newest first."""
    tracks = store.open("tracks")
    return [] if tracks is None else snapshot_runs_of(tracks)


def snapshot_runs_of(tracks: Any) -> list[str]:
    """Run ids with a snapshot, newest first, from the ``tracks`` dataset's tags."""
    tags = sorted(
        ((t["created_at"], n) for n, t in tracks.tags.list().items() if n.startswith(RUN_TAG_PREFIX)),
        reverse=True,
    )
    return [n[len(RUN_TAG_PREFIX) :] for _, n in tags]


def rollback(store: Store, to_run: str | None = None) -> tuple[str, dict[str, int]]:
    """Restore ``tracks``/``windows``/``frames`` to the versions of run ``to_run`` (default: the
    run before the newest snapshot): each becomes a new latest version equal to that run's.
    Returns (run_id, new versions). The caller holds the store's lease."""
    runs = snapshot_runs(store)
    if to_run is None:
        if len(runs) < 2:
            raise ValueError("no earlier run to roll back to (keep one with --keep-previous 1 or more)")
        to_run = runs[1]
    elif to_run not in runs:
        raise ValueError(f"run {to_run} has no snapshot; runs with one: {', '.join(runs) or 'none'}")
    pin_for_search(store)  # readers keep the state before the rollback until it is complete
    out: dict[str, int] = {}
    for name in SNAPSHOT_TABLES:
        ds = store.open(name)
        if ds is None or run_tag(to_run) not in _tags(ds):
            continue
        ds.checkout_version(run_tag(to_run)).restore()
        out[name] = store.open(name).version
    for name in SNAPSHOT_TABLES:  # tracks first: the switch (this also ends a migration in progress)
        _delete_tag(store, name, SEARCH_TAG)
    return to_run, out
