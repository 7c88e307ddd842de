"""Evaluation datasets in the field's own formats, read into one shape (:class:`EvalDataset`).

* a ``mirdata`` dataset name with a local ``--data-home`` (GTZAN, GiantSteps key, Beatles,
  Harmonix, ... in mirdata's layout; nothing is downloaded: tracks whose audio is not under the
  data home are left out and counted);
* a folder of audio files, each with a ``<stem>.jams`` annotation beside it (any custom set);
* a catalog CSV / Parquet with ``uri`` and a label column (track-level tasks only).

Splits: the dataset's official split where it has one (mirdata's ``get_track_splits``, a JAMS
``sandbox.split``, a catalog ``split`` column), otherwise a seeded split (70/15/15), stratified
by label for single-label track tasks; how it was made is recorded (:attr:`EvalDataset.split_info`).

A task that does not match the dataset's annotations is refused before any work; a missing or
malformed annotation is a one-line :class:`DatasetError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.evaluate.tasks import Reference, Task, key_class, normalize_key

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".aiff", ".aif", ".m4a", ".opus")
SPLITS = ("train", "valid", "test")
#: The seeded split's cycle (70/15/15): any 3 consecutive tracks cover all three splits.
_CYCLE = ("train", "valid", "test", *("train",) * 6, "valid", "test", *("train",) * 5, "valid", "test", "train", "train", "train")  # fmt: skip


class DatasetError(ValueError):
    """A dataset that cannot be evaluated (one line, naming the file)."""


class TaskMismatch(DatasetError):
    """The dataset has no annotations for the task."""


@dataclass(frozen=True)
class EvalTrack:
    track_id: str
    audio: str  # absolute local path (or URI)
    ref: Reference
    split: str | None = None  # official split, when the dataset has one
    source: str = ""  # the annotation file


@dataclass(frozen=True)
class EvalDataset:
    name: str
    root: str  # the folder holding the audio (the embed job's allowed prefix)
    tracks: tuple[EvalTrack, ...]
    split_info: dict[str, Any] = field(default_factory=dict)
    absent: int = 0  # mirdata tracks whose audio is not under the data home

    def __post_init__(self) -> None:
        if not self.tracks:
            raise DatasetError(f"dataset {self.name}: no tracks with audio and annotations")

    def split(self, name: str) -> list[EvalTrack]:
        return [t for t in self.tracks if t.split == name]


def load_dataset(
    spec: str,
    task: Task,
    *,
    data_home: str | None = None,
    version: str | None = None,
    label_column: str | None = None,
    seed: int = 0,
) -> EvalDataset:
    """Read ``spec`` (mirdata name, JAMS folder or catalog file) for ``task`` and assign splits."""
    if os.path.isdir(spec):
        ds = load_jams_folder(spec, task)
    elif spec.endswith((".csv", ".parquet")):
        ds = load_catalog(spec, task, label_column)
    else:
        ds = load_mirdata(spec, task, data_home, version)
    return assign_splits(ds, task, seed)


# --------------------------------------------------------------------------- JAMS


def reference_from_jams(path: str, task: Task) -> tuple[Reference, str | None]:
    """The task's reference (and the ``sandbox.split``, if any) from a JAMS file; DatasetError
    naming the file when it is missing, malformed or holds no annotation of the task's namespaces."""
    import jams

    try:
        jam = jams.load(path, validate=False)
    except FileNotFoundError:
        raise DatasetError(f"missing annotation {path}") from None
    except Exception as e:  # jams raises JSON, schema and parse errors of many types
        raise DatasetError(f"malformed annotation {path}: {' '.join(str(e).split())[:200]}") from None
    anns = [a for a in jam.annotations if a.namespace.startswith(task.namespaces)]
    if not anns:
        have = sorted({a.namespace for a in jam.annotations}) or ["none"]
        raise TaskMismatch(
            f"{path} has no {'/'.join(task.namespaces)} annotation for task {task.name} "
            f"(namespaces: {', '.join(have)})"
        )
    try:
        return _jams_reference(anns[0], task), getattr(jam.sandbox, "split", None)
    except (ValueError, TypeError, KeyError) as e:
        raise DatasetError(f"malformed annotation {path}: {e}") from None


def _jams_reference(ann: Any, task: Task) -> Reference:
    obs = list(ann.data)
    if task.name in ("beat", "downbeat"):
        times = np.array([o.time for o in obs], np.float64)
        pos = [o.value for o in obs]
        positions = None if any(p is None for p in pos) else np.array(pos, np.int64)
        if task.name == "downbeat" and positions is None:
            raise ValueError("beat annotation without metrical positions (downbeats need value = 1)")
        return Reference(beats=times, positions=positions)
    if task.name in ("chord", "structure"):
        iv, labels = ann.to_interval_values()
        return Reference(intervals=np.asarray(iv, np.float64).reshape(-1, 2), labels=tuple(map(str, labels)))
    if task.name == "key":
        longest = max(obs, key=lambda o: o.duration)
        return Reference(key=normalize_key(str(longest.value)))
    tags = tuple(str(o.value) for o in obs)
    return Reference(tags=tags[:1] if task.name == "genre" else tags)


def load_jams_folder(folder: str, task: Task) -> EvalDataset:
    """Every audio file under ``folder`` with its ``<stem>.jams`` beside it."""
    root = os.path.abspath(folder)
    audio = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
    if not audio:
        raise DatasetError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {root}")
    tracks = []
    for a in audio:
        jpath = str(a.with_suffix(".jams"))
        ref, split = reference_from_jams(jpath, task)
        tid = str(a.relative_to(root).with_suffix("")).replace(os.sep, "/")
        tracks.append(EvalTrack(tid, str(a), ref, _split_name(split), jpath))
    return EvalDataset(os.path.basename(root.rstrip("/")), root, tuple(tracks))


# --------------------------------------------------------------------------- catalog


def load_catalog(path: str, task: Task, label_column: str | None) -> EvalDataset:
    """A CSV / Parquet catalog with ``uri`` (relative to the catalog's folder) and a label
    column (genre: ``genre``, key: ``key``, tagging: ``tags`` separated by ``|``)."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if task.level != "track":
        raise TaskMismatch(
            f"task {task.name} needs timed annotations (JAMS or mirdata); {path} holds track labels only"
        )
    try:
        rows = (pq.read_table(path) if path.endswith(".parquet") else pcsv.read_csv(path)).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for unreadable catalogs
        raise DatasetError(f"cannot read catalog {path}: {' '.join(str(e).split())[:200]}") from None
    col = label_column or {"genre": "genre", "key": "key", "tagging": "tags"}[task.name]
    if not rows or "uri" not in rows[0] or col not in rows[0]:
        raise TaskMismatch(f"catalog {path} needs columns uri and {col} for task {task.name}")
    root = os.path.dirname(os.path.abspath(path))
    tracks = []
    for i, r in enumerate(rows):
        label = r[col]
        if label is None or str(label).strip() == "":
            raise DatasetError(f"catalog {path} row {i + 1}: empty {col}")
        audio = r["uri"] if os.path.isabs(str(r["uri"])) else os.path.join(root, str(r["uri"]))
        tid = str(r.get("track_id") or Path(str(r["uri"])).stem)
        tracks.append(EvalTrack(tid, audio, _label_reference(task, str(label), f"{path} row {i + 1}"),
                                _split_name(r.get("split")), path))  # fmt: skip
    return EvalDataset(Path(path).stem, root, tuple(tracks))


def _label_reference(task: Task, label: str, where: str) -> Reference:
    if task.name == "key":
        try:
            return Reference(key=normalize_key(label))
        except (ValueError, IndexError) as e:
            raise DatasetError(f"{where}: bad key {label!r} ({e})") from None
    if task.name == "tagging":
        return Reference(tags=tuple(t.strip() for t in label.replace(";", "|").split("|") if t.strip()))
    return Reference(tags=(label.strip(),))


# --------------------------------------------------------------------------- mirdata

#: mirdata track attributes holding each task's reference, tried in order.
MIRDATA_ATTRS: dict[str, tuple[str, ...]] = {
    "beat": ("beats",), "downbeat": ("beats",), "chord": ("chords",), "key": ("key", "keys"),
    "structure": ("sections",), "genre": ("genre",), "tagging": ("tags", "genre"),
}  # fmt: skip


def load_mirdata(name: str, task: Task, data_home: str | None, version: str | None = None) -> EvalDataset:
    """A mirdata dataset in its layout under ``data_home`` (its index: mirdata's own copy, or the
    index file of the same name placed in ``data_home``)."""
    if not data_home:
        raise DatasetError(
            f"dataset {name!r} is not a folder or catalog file; as a mirdata name it needs --data-home"
        )
    import mirdata

    try:
        ds = mirdata.initialize(name, data_home=data_home, version=version or "default")
    except ValueError as e:
        raise DatasetError(f"mirdata: {e}") from None
    if not os.path.exists(ds.index_path):
        local = os.path.join(data_home, os.path.basename(ds.index_path))
        if not os.path.exists(local):
            raise DatasetError(
                f"mirdata index of {name} not found: put {os.path.basename(ds.index_path)} in {data_home}"
            )
        ds.index_path = local
    first = ds.track(ds.track_ids[0])
    attrs = [a for a in MIRDATA_ATTRS[task.name] if hasattr(type(first), a)]
    if not attrs:
        raise TaskMismatch(
            f"mirdata {name} has no {'/'.join(MIRDATA_ATTRS[task.name])} annotations for task {task.name}"
        )
    official = _official_splits(ds)
    tracks, absent = [], 0
    for tid in ds.track_ids:
        tr = ds.track(tid)
        if not tr.audio_path or not os.path.exists(tr.audio_path):
            absent += 1
            continue
        ref, source = _mirdata_reference(tr, attrs[0], task)
        tracks.append(EvalTrack(tid, os.path.abspath(tr.audio_path), ref, official.get(tid), source))
    return EvalDataset(name, os.path.abspath(data_home), tuple(tracks), absent=absent)


def _official_splits(ds: Any) -> dict[str, str]:
    try:
        splits = ds.get_track_splits()
    except (NotImplementedError, AttributeError):
        return {}
    return {tid: _split_name(s) for s, ids in splits.items() for tid in ids}


def _mirdata_reference(tr: Any, attr: str, task: Task) -> tuple[Reference, str]:
    path = getattr(tr, f"{attr}_path", None) or getattr(tr, f"{attr.rstrip('s')}s_path", None) or tr.track_id
    if isinstance(path, str) and "/" in path and not os.path.exists(path):
        raise DatasetError(f"missing annotation {path}")
    try:
        value = getattr(tr, attr)
    except Exception as e:  # mirdata loaders raise csv/parse/IO errors of many types
        raise DatasetError(f"malformed annotation {path}: {' '.join(str(e).split())[:200]}") from None
    if value is None:
        raise DatasetError(f"missing annotation {path}")
    return _convert(value, task, str(path)), str(path)


def _convert(value: Any, task: Task, where: str) -> Reference:
    if task.name in ("beat", "downbeat"):
        pos = getattr(value, "positions", None)
        if task.name == "downbeat" and pos is None:
            raise DatasetError(f"{where}: beats without positions (downbeats need them)")
        return Reference(
            beats=np.asarray(value.times, np.float64), positions=None if pos is None else np.asarray(pos)
        )
    if task.name in ("chord", "structure"):
        return Reference(
            intervals=np.asarray(value.intervals, np.float64), labels=tuple(map(str, value.labels))
        )
    if task.name == "key":
        if isinstance(value, str):
            return _label_reference(task, value, where)
        iv = np.asarray(value.intervals)
        return _label_reference(task, str(value.keys[int(np.argmax(iv[:, 1] - iv[:, 0]))]), where)
    tags = [value] if isinstance(value, str) else list(value)
    return Reference(tags=tuple(tags[:1]) if task.name == "genre" else tuple(tags))


# --------------------------------------------------------------------------- splits


def _split_name(value: Any) -> str | None:
    if value is None or str(value).strip() == "":
        return None
    v = str(value).strip().lower()
    return {
        "validation": "valid",
        "val": "valid",
        "dev": "valid",
        "training": "train",
        "testing": "test",
    }.get(v, v)


def stratum(task: Task, ref: Reference) -> str:
    """The label a seeded split is stratified by ("" for multi-label and frame tasks)."""
    if task.name == "key":
        return str(key_class(ref.key or ""))
    if task.name == "genre":
        return (ref.tags or ("",))[0]
    return ""


def assign_splits(ds: EvalDataset, task: Task, seed: int) -> EvalDataset:
    """Keep the official split when every track has one (a missing valid split is carved from
    train with ``seed``); otherwise a seeded, stratified 70/15/15 split."""
    import dataclasses

    have = [t.split for t in ds.tracks]
    if all(s in SPLITS for s in have) and "test" in have:
        tracks = list(ds.tracks)
        if "valid" not in have:
            train = [t for t in tracks if t.split == "train"]
            carved = _seeded([t.track_id for t in train], [""] * len(train), seed, ("train", "valid"))
            tracks = [dataclasses.replace(t, split=carved.get(t.track_id, t.split)) for t in tracks]
        info = {"source": "official", "seed": seed, "valid_carved_from_train": "valid" not in have}
    else:
        labels = [stratum(task, t.ref) for t in ds.tracks]
        split = _seeded([t.track_id for t in ds.tracks], labels, seed, SPLITS)
        tracks = [dataclasses.replace(t, split=split[t.track_id]) for t in ds.tracks]
        info = {"source": "seeded", "seed": seed, "stratified": any(labels), "fractions": [0.7, 0.15, 0.15]}
    info["sizes"] = {s: sum(t.split == s for t in tracks) for s in SPLITS}
    out = dataclasses.replace(ds, tracks=tuple(tracks), split_info=info)
    for s in SPLITS:
        if not out.split(s):
            raise DatasetError(f"dataset {ds.name}: the {s} split is empty ({len(tracks)} tracks)")
    return out


def _seeded(ids: Sequence[str], labels: Sequence[str], seed: int, names: Sequence[str]) -> dict[str, str]:
    """Tracks ordered by label (shuffled within), then dealt along the 70/15/15 cycle, so every
    label's tracks spread over the splits in proportion."""
    rng = np.random.default_rng(seed)
    order = sorted(range(len(ids)), key=lambda i: (labels[i], rng.random()))
    cycle: Callable[[int], str] = (lambda k: _CYCLE[k % len(_CYCLE)]) if len(names) == 3 else (
        lambda k: "valid" if k % 5 == 1 else "train")  # fmt: skip
    return {ids[i]: cycle(k) for k, i in enumerate(order)}
