"""The downstream tasks of the MusicFM paper (plus genre): input length, frame rate, what the
reference annotation is, and how labels are encoded for a probe and decoded back to events.

Frame-level tasks (beat, downbeat, chord, structure) are probed per output frame at the task's
rate; track-level tasks (key, tagging, genre) on one vector per track (the token-weighted mean
over the task's windows). Profiles come from :mod:`musicfm.profiles` (beat 6 s at 50 Hz, chord
12 s at 16 Hz, structure 24 s at 8 Hz, key 12 s, tagging 29.1 s one vector); downbeat uses the
beat profile and genre the tagging one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from musicfm.profiles import PROFILES, TaskProfile

PITCHES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
#: The majmin chord vocabulary: "N" and the 24 major/minor triads, as Harte labels.
CHORD_VOCAB: tuple[str, ...] = ("N", *(f"{p}:maj" for p in PITCHES), *(f"{p}:min" for p in PITCHES))
#: The 24 keys, as mir_eval key strings.
KEY_VOCAB: tuple[str, ...] = (*(f"{p} major" for p in PITCHES), *(f"{p} minor" for p in PITCHES))


@dataclass(frozen=True)
class Reference:
    """One track's annotation for one task (only the task's fields are set)."""

    beats: np.ndarray | None = None  # (N,) beat times in seconds
    positions: np.ndarray | None = None  # (N,) metrical position of each beat, 1 = downbeat
    intervals: np.ndarray | None = None  # (M, 2) chord / segment intervals in seconds
    labels: tuple[str, ...] | None = None  # (M,) chord / segment labels
    key: str | None = None  # "C major"
    tags: tuple[str, ...] | None = None  # genre: one tag; tagging: all tags


@dataclass(frozen=True)
class Task:
    """A downstream task: its profile (window, frame rate), level and the probe's output kind."""

    name: str
    profile: TaskProfile
    level: str  # "frame" | "track"
    output: str  # "binary" (one sigmoid per frame), "multiclass", "multilabel"
    primary: str  # the headline metric (Table 1 column)
    namespaces: tuple[str, ...]  # JAMS namespaces (prefixes) that hold the reference

    def __post_init__(self) -> None:
        if self.level not in ("frame", "track") or self.output not in ("binary", "multiclass", "multilabel"):
            raise ValueError(f"invalid task {self}")

    @property
    def frames_hz(self) -> float | None:
        return self.profile.frames_hz if self.level == "frame" else None


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("beat", PROFILES["beat"], "frame", "binary", "f_measure", ("beat",)),
        Task("downbeat", PROFILES["beat"], "frame", "binary", "f_measure", ("beat",)),
        Task("chord", PROFILES["chord"], "frame", "multiclass", "majmin", ("chord",)),
        Task("structure", PROFILES["structure"], "frame", "multiclass", "hr_0.5", ("segment",)),
        Task("key", PROFILES["key"], "track", "multiclass", "weighted_score", ("key",)),
        Task("tagging", PROFILES["tagging"], "track", "multilabel", "roc_auc", ("tag",)),
        Task("genre", PROFILES["tagging"], "track", "multiclass", "accuracy", ("tag", "genre")),
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}") from None


# --------------------------------------------------------------------------- label encoding


def chord_class(label: str) -> int:
    """Index in :data:`CHORD_VOCAB` of a Harte chord label reduced to major/minor triads ("N"
    for no chord and for chords that are neither, as in the majmin evaluation)."""
    import mir_eval

    root, bitmap, _ = mir_eval.chord.encode(label)
    if root < 0:
        return 0
    third_major, third_minor, fifth = bitmap[4], bitmap[3], bitmap[7]
    if third_major and fifth:
        return 1 + root
    if third_minor and fifth:
        return 13 + root
    return 0


def normalize_key(key: str) -> str:
    """A key as mir_eval writes it ("C major", "Eb minor") from "C major", "Eb:minor", "a minor"
    or "C" (major); ValueError for other modes."""
    import mir_eval

    parts = key.replace(":", " ").split()
    if not parts:
        raise ValueError("empty key")
    tonic, mode = parts[0][0].upper() + parts[0][1:], (parts[1] if len(parts) > 1 else "major").lower()
    if mode not in ("major", "minor"):
        raise ValueError(f"key {key!r}: only major/minor keys are probed")
    out = f"{tonic} {mode}"
    mir_eval.key.validate_key(out)
    return out


def key_class(key: str) -> int:
    """Index in :data:`KEY_VOCAB` of a key string ("C major", "Eb:minor", "a minor")."""
    import mir_eval

    tonic, mode = normalize_key(key).split()
    return mir_eval.chord.pitch_class_to_semitone(tonic) % 12 + (12 if mode == "minor" else 0)


def beat_targets(times: np.ndarray, beats: np.ndarray, hz: float) -> np.ndarray:
    """(T,) float targets for frames centred at ``times``: 1 at the frame nearest each beat, 0.5
    at its neighbours (the widened targets of beat-tracking probes), 0 elsewhere."""
    y = np.zeros(len(times), np.float32)
    if len(times) == 0:
        return y
    for b in np.asarray(beats, np.float64):
        i = int(np.argmin(np.abs(times - b)))
        if abs(times[i] - b) > 1.0 / hz:
            continue  # a beat outside the embedded frames
        for j in (i - 1, i + 1):
            if 0 <= j < len(y):
                y[j] = max(y[j], 0.5)
        y[i] = 1.0
    return y


def interval_targets(
    times: np.ndarray, intervals: np.ndarray, classes: Sequence[int], none: int
) -> np.ndarray:
    """(T,) class of the interval holding each frame centre (``none`` outside all intervals)."""
    y = np.full(len(times), none, np.int64)
    for (a, b), c in zip(np.asarray(intervals, np.float64), classes, strict=True):
        y[(times >= a) & (times < b)] = c
    return y


def events_of(task: Task, ref: Reference) -> np.ndarray:
    """Beat times for beat, downbeat times for downbeat."""
    beats = np.asarray(ref.beats, np.float64)
    if task.name == "downbeat":
        if ref.positions is None:
            raise ValueError("no metrical positions: downbeats need beat positions (1 = downbeat)")
        return beats[np.asarray(ref.positions) == 1]
    return beats


# --------------------------------------------------------------------------- decoding


def pick_peaks(prob: np.ndarray, times: np.ndarray, threshold: float, hz: float) -> np.ndarray:
    """Event times from frame probabilities: local maxima above ``threshold`` at least 0.2 s
    apart (``scipy.signal.find_peaks``), the standard decoding of beat activations."""
    from scipy.signal import find_peaks

    peaks, _ = find_peaks(
        np.concatenate([[0.0], prob, [0.0]]), height=threshold, distance=max(1, int(0.2 * hz))
    )
    return np.asarray(times, np.float64)[peaks - 1]


def merge_frames(
    classes: np.ndarray, times: np.ndarray, hz: float, names: Sequence[str]
) -> tuple[np.ndarray, list[str]]:
    """Framewise class labels merged into intervals: ((M, 2) seconds, M labels); each frame
    covers its centre +- half a frame period, the first interval starts at 0."""
    if len(classes) == 0:
        return np.zeros((0, 2)), []
    half = 0.5 / hz
    change = np.flatnonzero(np.diff(classes)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(classes)]])
    iv = np.stack([times[starts] - half, times[ends - 1] + half], axis=1)
    iv[0, 0] = 0.0
    iv = np.maximum(iv, 0.0)
    return iv, [names[int(classes[s])] for s in starts]
