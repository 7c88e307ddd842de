"""Evaluation sets whose answers are known by construction: MIDI written with ``pretty_midi`` and
rendered with real instrument samples by Debian's ``fluidsynth`` and ``FluidR3_GM.sf2``.

All pieces of a set are laid end to end (1 s apart) in one MIDI file and rendered by ONE
fluidsynth call (loading the 140 MB sound font dominates), then cut into one WAV per piece, with
its JAMS annotation written from the same note list:

* :func:`drum_set` — drum patterns at known tempi (kick + crash on the downbeat): beats with
  metrical positions (``beat`` namespace);
* :func:`triad_set` — diatonic triad progressions in known keys (``chord`` + ``key_mode``);
* :func:`section_set` — sections played by different instruments (``segment_open``);
* :func:`timbre_set` — short phrases by one of four instruments (``tag_open``: the instrument,
  for genre) plus a catalog CSV with ``tags`` (instrument | fast / slow) for tagging.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
SR = 24000
GAP_S = 1.0
PITCHES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
PROGRAMS = {"piano": 0, "organ": 19, "strings": 48, "guitar": 24}


def can_render() -> bool:
    return shutil.which("fluidsynth") is not None and SOUNDFONT.exists()


@dataclass
class Piece:
    name: str
    duration: float
    notes: list[tuple[int, bool, int, float, float, int]] = field(
        default_factory=list
    )  # program, drum, pitch, on, off, vel
    annotations: list[tuple[str, list[tuple[float, float, object]]]] = field(
        default_factory=list
    )  # namespace, obs
    split: str | None = None


def render(pieces: list[Piece], folder: Path) -> list[Path]:
    """WAV (24 kHz mono) + JAMS per piece under ``folder``; returns the WAV paths."""
    import jams
    import pretty_midi

    folder.mkdir(parents=True, exist_ok=True)
    pm = pretty_midi.PrettyMIDI(initial_tempo=120)
    insts: dict[tuple[int, bool], pretty_midi.Instrument] = {}
    offsets, t = [], 0.0
    for p in pieces:
        offsets.append(t)
        for prog, drum, pitch, on, off, vel in p.notes:
            if on >= p.duration - 0.01:
                continue
            inst = insts.setdefault((prog, drum), pretty_midi.Instrument(program=prog, is_drum=drum))
            inst.notes.append(pretty_midi.Note(vel, pitch, t + on, t + min(off, p.duration)))
        t += p.duration + GAP_S
    pm.instruments.extend(insts.values())
    mid, wav = folder / "_all.mid", folder / "_all.wav"
    pm.write(str(mid))
    subprocess.run(["fluidsynth", "-ni", "-g", "0.7", "-r", str(SR), "-F", str(wav), str(SOUNDFONT), str(mid)],
                   check=True, capture_output=True)  # fmt: skip
    audio, sr = sf.read(str(wav), dtype="float32", always_2d=True)
    assert sr == SR
    audio = audio.mean(1)
    audio = np.pad(audio, (0, max(0, int((t + 1) * SR) - len(audio))))
    out = []
    for p, off in zip(pieces, offsets, strict=True):
        path = folder / f"{p.name}.wav"
        sf.write(str(path), audio[int(off * SR) : int(off * SR) + int(p.duration * SR)], SR)
        jam = jams.JAMS()
        jam.file_metadata.duration = p.duration
        for ns, obs in p.annotations:
            ann = jams.Annotation(ns)
            for time, dur, value in obs:
                ann.append(time=time, duration=dur, value=value)
            jam.annotations.append(ann)
        if p.split:
            jam.sandbox.split = p.split
        jam.save(str(folder / f"{p.name}.jams"))
        out.append(path)
    mid.unlink()
    wav.unlink()
    return out


def drum_piece(name: str, bpm: float, duration: float, first: float = 0.25) -> Piece:
    """4/4 drums: kick + crash on 1, snare on 2 and 4, kick on 3, closed hi-hat on eighths."""
    p = Piece(name, duration)
    period = 60.0 / bpm
    obs, k = [], 0
    while first + k * period < duration - 0.1:
        on, pos = first + k * period, k % 4 + 1
        p.notes += [
            (0, True, 42, on, on + 0.05, 70),
            (0, True, 42, on + period / 2, on + period / 2 + 0.05, 50),
        ]
        if pos == 1:
            p.notes += [(0, True, 36, on, on + 0.1, 127), (0, True, 49, on, on + 0.3, 110)]
        elif pos == 3:
            p.notes.append((0, True, 36, on, on + 0.1, 100))
        else:
            p.notes.append((0, True, 38, on, on + 0.1, 110))
        obs.append((on, 0.0, pos))
        k += 1
    p.annotations.append(("beat", obs))
    return p


def drum_set(folder: Path, n: int = 10, duration: float = 8.0) -> list[Path]:
    return render(
        [drum_piece(f"drums_{i:02d}", 80 + 8 * i, duration, 0.2 + 0.05 * (i % 3)) for i in range(n)], folder
    )


def triad(root: int, minor: bool) -> list[int]:
    return [48 + root, 60 + root, 60 + root + (3 if minor else 4), 60 + root + 7]


def triad_piece(
    name: str, tonic: int, minor: bool, duration: float = 12.0, chord_s: float = 1.5, program: int = 0
) -> Piece:
    """Diatonic progression I-vi-IV-V (major) or i-VI-iv-v (minor) repeated, block chords."""
    degrees = (
        [(0, False), (9, True), (5, False), (7, False)]
        if not minor
        else [(0, True), (8, False), (5, True), (7, True)]
    )
    p = Piece(name, duration)
    chords, t, k = [], 0.0, 0
    while t < duration - 1e-6:
        off = min(t + chord_s, duration)
        step, is_min = degrees[k % 4]
        root = (tonic + step) % 12
        p.notes += [(program, False, q, t, off - 0.02, 90) for q in triad(root, is_min)]
        chords.append((t, off - t, f"{PITCHES[root]}:{'min' if is_min else 'maj'}"))
        t, k = off, k + 1
    p.annotations.append(("chord", chords))
    p.annotations.append(("key_mode", [(0.0, duration, f"{PITCHES[tonic]}:{'minor' if minor else 'major'}")]))
    return p


def triad_set(folder: Path, n: int = 10) -> list[Path]:
    keys = [
        (0, False),
        (7, False),
        (2, False),
        (9, True),
        (4, True),
        (5, False),
        (2, True),
        (10, False),
        (0, True),
        (7, True),
    ]
    return render([triad_piece(f"triads_{i:02d}", *keys[i % len(keys)]) for i in range(n)], folder)


def section_piece(name: str, order: list[str], section_s: float = 8.0) -> Piece:
    """Sections of ``section_s`` each, played by the named instruments (piano / organ / strings):
    an arpeggio of C major in every one, so only the instrumentation changes."""
    p = Piece(name, section_s * len(order))
    obs = []
    for j, inst in enumerate(order):
        t0 = j * section_s
        for k in range(int(section_s * 4)):
            on = t0 + k * 0.25
            p.notes.append((PROGRAMS[inst], False, [60, 64, 67, 72][k % 4], on, on + 0.24, 90))
        obs.append((t0, section_s, inst))
    p.annotations.append(("segment_open", obs))
    return p


def section_set(folder: Path, n: int = 6) -> list[Path]:
    orders = [["piano", "organ", "piano"], ["organ", "strings", "organ"], ["strings", "piano", "strings"],
              ["piano", "strings", "organ"], ["organ", "piano", "strings"], ["strings", "organ", "piano"]]  # fmt: skip
    return render([section_piece(f"sections_{i:02d}", orders[i % len(orders)]) for i in range(n)], folder)


def timbre_set(folder: Path, n: int = 12, duration: float = 5.0) -> tuple[list[Path], Path]:
    """Phrases by piano / organ / strings / guitar (genre = the instrument, in ``tag_open``), and
    ``tags.csv`` (track_id, uri, tags = instrument | fast or slow) for tagging."""
    insts = list(PROGRAMS)
    pieces, rows = [], []
    for i in range(n):
        inst, fast = insts[i % 4], (i // 4) % 2 == 0
        p = Piece(f"timbre_{i:02d}", duration)
        step = 0.125 if fast else 0.5
        for k in range(int(duration / step)):
            p.notes.append(
                (PROGRAMS[inst], False, [57, 60, 64, 67, 69][(k + i) % 5], k * step, k * step + step, 95)
            )
        p.annotations.append(("tag_open", [(0.0, duration, inst)]))
        pieces.append(p)
        rows.append(
            {"track_id": p.name, "uri": f"{p.name}.wav", "tags": f"{inst}|{'fast' if fast else 'slow'}"}
        )
    wavs = render(pieces, folder)
    cat = folder.parent / f"{folder.name}_tags.csv"
    with open(cat, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["track_id", "uri", "tags"])
        w.writeheader()
        w.writerows([{**r, "uri": str(folder / r["uri"])} for r in rows])
    return wavs, cat
