#!/usr/bin/env python
"""Deterministic fuzz corpus for the audio decoder, and a crash-isolating harness to run it.

    python tools/fuzz_corpus.py generate --out /tmp/fuzz --count 1200 --seed 0
    python tools/fuzz_corpus.py check /tmp/fuzz --timeout-s 10 --mem-mb 1024 --workers 2

**Seeds** (``seed_inputs``): one short synthetic file per supported container/codec (WAV PCM16 /
PCM24 / float / u-law / WAVEX, RF64, AIFF, FLAC 16/24, Ogg Vorbis, Ogg Opus, MP3; 1 s, stereo or
mono, several sample rates), plus each real clip in ``--clips`` (default ``shared/audio/clips``;
the first 96 KiB, whole for FLAC, which libsndfile refuses once truncated), so the fuzzed bytes
are those of real encoders. Ogg pages get a fixed
serial number (libsndfile stamps a random one), so the seeds are byte-identical run to run.

**Mutations** (``mutate``), each input from its own ``random.Random(f"{seed}:{index}")``, so any
index can be rebuilt alone: bit flips (anywhere / in the header), byte runs set to 00/FF,
truncation at a random offset (also 0..64 bytes), random insertions, a chunk repeated many times,
splices of two seeds, and *format-aware header lies*: WAV/RF64 channel count 0/65535, sample rate
0/1/2^32-1, bits per sample 0/7/65535, block align 0, data/RIFF sizes 0xFFFFFFFF, unknown codec
tags; FLAC STREAMINFO sample rate 0, 8 channels, 36-bit total samples, zero block sizes, metadata
lengths beyond the file; AIFF channel count, frame count and an 80-bit sample rate of 0 / inf / NaN
/ 1e4000; Vorbis/Opus identification headers with 0/255 channels, rate 0, mapping family 255, huge
pre-skip, huge granule positions (the Ogg page CRC is recomputed so the lie reaches the decoder);
MP3 ID3 sizes and reserved bitrate/sample-rate indices. Up to three mutations are stacked.

**Harness** (``check_files``): each file is decoded by ``pipeline.io.audio.decode_audio`` in a
worker subprocess (a small pool of long-lived workers, ``RLIMIT_AS`` and ``RLIMIT_CPU`` set in the
worker) with a per-file wall-clock limit. A worker that dies (segfault, abort, OOM kill) or hangs
is recorded as ``crash`` / ``hang`` for that file and replaced. Outcomes: ``ok`` (decoded),
``pipeline_error`` (a ``PipelineError`` subclass: the contract), ``exception`` (anything else),
``crash``, ``hang``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import select
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CLIPS = REPO.parent / "shared" / "audio" / "clips"
REAL_PREFIX_BYTES = 96 * 1024

# ----------------------------------------------------------------------------- Ogg CRC

_CRC_TABLE: list[int] = []
for _i in range(256):
    _r = _i << 24
    for _ in range(8):
        _r = ((_r << 1) ^ 0x04C11DB7) if _r & 0x80000000 else (_r << 1)
        _r &= 0xFFFFFFFF
    _CRC_TABLE.append(_r)


def ogg_crc(data: bytes | bytearray) -> int:
    c = 0
    for x in data:
        c = ((c << 8) & 0xFFFFFFFF) ^ _CRC_TABLE[((c >> 24) & 0xFF) ^ x]
    return c


def ogg_pages(data: bytes | bytearray) -> list[tuple[int, int]]:
    """(offset, size) of each complete Ogg page found by scanning for ``OggS``."""
    pages = []
    pos = data.find(b"OggS")
    while pos >= 0 and pos + 27 <= len(data):
        nseg = data[pos + 26]
        if pos + 27 + nseg > len(data):
            break
        size = 27 + nseg + sum(data[pos + 27 : pos + 27 + nseg])
        if pos + size > len(data):
            break
        pages.append((pos, size))
        pos = data.find(b"OggS", pos + size)
    return pages


def fix_ogg(data: bytearray, serial: int | None = 0x4D55534B) -> bytearray:
    """Recompute every complete page's CRC (and set a fixed serial number if ``serial``)."""
    for pos, size in ogg_pages(data):
        if serial is not None:
            data[pos + 14 : pos + 18] = serial.to_bytes(4, "little")
        data[pos + 22 : pos + 26] = b"\0\0\0\0"
        data[pos + 22 : pos + 26] = ogg_crc(data[pos : pos + size]).to_bytes(4, "little")
    return data


# ----------------------------------------------------------------------------- seeds

# name: (extension, soundfile format, subtype, sample rate, channels)
SYNTHETIC = {
    "wav_pcm16": ("wav", "WAV", "PCM_16", 44100, 2),
    "wav_pcm24": ("wav", "WAV", "PCM_24", 48000, 1),
    "wav_float": ("wav", "WAV", "FLOAT", 22050, 2),
    "wav_ulaw": ("wav", "WAV", "ULAW", 8000, 1),
    "wavex_pcm16": ("wav", "WAVEX", "PCM_16", 32000, 3),
    "rf64_pcm16": ("wav", "RF64", "PCM_16", 24000, 1),
    "aiff_pcm16": ("aiff", "AIFF", "PCM_16", 44100, 2),
    "flac_pcm16": ("flac", "FLAC", "PCM_16", 44100, 2),
    "flac_pcm24": ("flac", "FLAC", "PCM_24", 96000, 1),
    "ogg_vorbis": ("ogg", "OGG", "VORBIS", 44100, 2),
    "ogg_opus": ("opus", "OGG", "OPUS", 48000, 2),
    "mp3": ("mp3", "MP3", "MPEG_LAYER_III", 44100, 2),
}


def _signal(sr: int, ch: int, seconds: float = 1.0):
    import numpy as np

    t = np.arange(int(sr * seconds)) / sr
    rng = np.random.default_rng(sr + ch)
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1234.5 * t)
    x = x + 0.05 * rng.standard_normal(t.shape[0])
    return np.stack([x * (0.5 + 0.5 * k / max(1, ch)) for k in range(ch)], 1).astype(np.float32)


def synthetic_seed(name: str) -> bytes:
    import soundfile as sf

    ext, fmt, sub, sr, ch = SYNTHETIC[name]
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=sr, channels=ch, format=fmt, subtype=sub) as f:
        if sub == "FLOAT":  # the PEAK chunk carries a timestamp: leave it out for determinism
            sf._snd.sf_command(f._file, 0x1050, sf._ffi.NULL, 0)  # SFC_SET_ADD_PEAK_CHUNK
        f.write(_signal(sr, ch))
    data = bytearray(buf.getvalue())
    if fmt == "OGG":
        fix_ogg(data)
    return bytes(data)


@dataclass(frozen=True)
class Seed:
    name: str
    ext: str
    data: bytes


def seed_inputs(clips_dir: str | os.PathLike | None = DEFAULT_CLIPS) -> list[Seed]:
    """The unmutated inputs, in a fixed order: synthetic seeds then real clip prefixes."""
    seeds = [Seed(n, SYNTHETIC[n][0], synthetic_seed(n)) for n in SYNTHETIC]
    if clips_dir and Path(clips_dir).is_dir():
        for p in sorted(Path(clips_dir).iterdir()):
            if p.suffix.lower() in (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif"):
                data = p.read_bytes()
                if p.suffix.lower() != ".flac":  # libsndfile refuses a truncated FLAC as a whole
                    data = data[:REAL_PREFIX_BYTES]
                seeds.append(Seed("real_" + p.stem, p.suffix.lstrip(".").lower(), data))
    return seeds


# ----------------------------------------------------------------------------- mutations

_INTERESTING32 = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def _offset(rng: random.Random, n: int, header_bias: float = 0.5) -> int:
    if n <= 1:
        return 0
    if rng.random() < header_bias:
        return rng.randrange(min(n, 512))
    return rng.randrange(n)


def m_bitflip(rng: random.Random, d: bytearray, seed: Seed) -> str:
    k = rng.choice((1, 2, 4, 8, 32))
    if not d:
        return "bitflip (empty)"
    for _ in range(k):
        i = _offset(rng, len(d))
        d[i] ^= 1 << rng.randrange(8)
    return f"bitflip x{k}"


def m_byterun(rng: random.Random, d: bytearray, seed: Seed) -> str:
    i = _offset(rng, len(d))
    n = rng.choice((1, 4, 16, 256, 4096))
    v = rng.choice((0x00, 0xFF, 0x7F, 0x80))
    d[i : i + n] = bytes([v]) * len(d[i : i + n])
    return f"run {v:#04x} x{n} at {i}"


def m_truncate(rng: random.Random, d: bytearray, seed: Seed) -> str:
    cut = rng.randrange(65) if rng.random() < 0.3 else rng.randrange(max(1, len(d)))
    del d[cut:]
    return f"truncate at {cut}"


def m_insert(rng: random.Random, d: bytearray, seed: Seed) -> str:
    i = _offset(rng, len(d))
    n = rng.choice((1, 3, 64, 1000))
    d[i:i] = rng.randbytes(n)
    return f"insert {n} random bytes at {i}"


def m_repeat(rng: random.Random, d: bytearray, seed: Seed) -> str:
    if len(d) < 8:
        return "repeat (too short)"
    i = rng.randrange(len(d) - 4)
    n = rng.choice((4, 64, 512))
    chunk = bytes(d[i : i + n])
    times = rng.choice((10, 200, 2000))
    d[i:i] = chunk * times
    return f"repeat {len(chunk)} bytes x{times} at {i}"


def m_splice(rng: random.Random, d: bytearray, seed: Seed, others: Sequence[Seed] = ()) -> str:
    if not others:
        return "splice (no other seed)"
    o = rng.choice(list(others))
    a = rng.randrange(1, max(2, min(len(d), 2048)))
    b = rng.randrange(max(1, len(o.data)))
    d[a:] = o.data[b:]
    return f"splice {seed.name}[:{a}] + {o.name}[{b}:]"


def _put(d: bytearray, off: int, fmt: str, value: int | float) -> bool:
    size = struct.calcsize(fmt)
    if off < 0 or off + size > len(d):
        return False
    d[off : off + size] = struct.pack(fmt, value)
    return True


def _riff_chunks(d: bytearray) -> dict[bytes, int]:
    """chunk id -> offset of its header, for RIFF/RF64 (little-endian sizes)."""
    out: dict[bytes, int] = {}
    pos = 12
    while pos + 8 <= len(d) and len(out) < 64:
        cid = bytes(d[pos : pos + 4])
        size = struct.unpack_from("<I", d, pos + 4)[0]
        out.setdefault(cid, pos)
        if size == 0xFFFFFFFF:
            break
        pos += 8 + size + (size & 1)
    return out


def _wav_lie(rng: random.Random, d: bytearray) -> str:
    ch = _riff_chunks(d)
    fmt = ch.get(b"fmt ")
    data = ch.get(b"data")
    choices = []
    if fmt is not None:
        f = fmt + 8
        choices += [
            ("channels", f + 2, "<H", rng.choice((0, 3, 255, 1000, 0xFFFF))),
            ("sample rate", f + 4, "<I", rng.choice((0, 1, 7, 0x7FFFFFFF, 0xFFFFFFFF))),
            ("byte rate", f + 8, "<I", rng.choice((0, 0xFFFFFFFF))),
            ("block align", f + 12, "<H", rng.choice((0, 1, 0xFFFF))),
            ("bits per sample", f + 14, "<H", rng.choice((0, 1, 7, 64, 0xFFFF))),
            ("format tag", f, "<H", rng.choice((0, 2, 0x11, 0x55, 0x50, 0x161, 0xFFFE, 0xFFFF))),
            ("fmt size", fmt + 4, "<I", rng.choice((0, 2, 0xFFFFFFF0))),
        ]
    if data is not None:
        choices.append(("data size", data + 4, "<I", rng.choice((0, 1, 0x7FFFFFF0, 0xFFFFFFFF))))
    choices.append(("riff size", 4, "<I", rng.choice((0, 4, 0xFFFFFFFF))))
    if b"ds64" in ch:  # RF64: 64-bit sizes
        ds = ch[b"ds64"] + 8
        choices.append(("ds64 data size", ds + 8, "<Q", rng.choice((0, 1 << 62, (1 << 64) - 1))))
        choices.append(("ds64 sample count", ds + 16, "<Q", rng.choice((0, 1 << 62, (1 << 64) - 1))))
    name, off, f_, v = rng.choice(choices)
    _put(d, off, f_, v)
    return f"wav header: {name} = {v}"


def _flac_lie(rng: random.Random, d: bytearray) -> str:
    if d[:4] != b"fLaC" or len(d) < 42:
        return "flac header (absent)"
    si = 8  # STREAMINFO body: after "fLaC" and the 4-byte block header
    what = rng.randrange(7)
    if what == 0:  # min/max block size
        v = rng.choice((0, 1, 15, 0xFFFF))
        _put(d, si, ">H", v)
        _put(d, si + 2, ">H", v)
        return f"flac streaminfo: block sizes = {v}"
    if what in (1, 2, 3):  # sample rate (20 bits) | channels-1 (3) | bps-1 (5) | total samples (36)
        packed = int.from_bytes(d[si + 10 : si + 18], "big")
        sr = (packed >> 44) & 0xFFFFF
        chm1 = (packed >> 41) & 0x7
        bpsm1 = (packed >> 36) & 0x1F
        total = packed & ((1 << 36) - 1)
        if what == 1:
            sr = rng.choice((0, 1, 0xFFFFF))
            label = f"sample rate = {sr}"
        elif what == 2:
            chm1, bpsm1 = rng.choice(((7, bpsm1), (chm1, 0), (chm1, 31), (7, 31)))
            label = f"channels = {chm1 + 1}, bits = {bpsm1 + 1}"
        else:
            total = rng.choice((0, 1, (1 << 36) - 1))
            label = f"total samples = {total}"
        packed = (sr << 44) | (chm1 << 41) | (bpsm1 << 36) | total
        d[si + 10 : si + 18] = packed.to_bytes(8, "big")
        return "flac streaminfo: " + label
    if what == 4:  # metadata block length beyond the file
        d[5:8] = rng.choice((0xFFFFFF, 0, 1)).to_bytes(3, "big")
        return "flac metadata block length lie"
    if what == 5:  # clear the last-metadata-block flag / set a reserved block type
        d[4] = rng.choice((0x00, 0x7F, 0x06))
        return f"flac block header byte = {d[4]:#04x}"
    # frame header sync + bits in the first frame
    pos = d.find(b"\xff\xf8", 42)
    if pos < 0:
        return "flac frame (absent)"
    d[pos + 2] = rng.randrange(256)
    d[pos + 3] = rng.randrange(256)
    return "flac first frame header bytes randomized"


def _ieee_extended(x: float | str) -> bytes:
    """80-bit big-endian extended float for AIFF sample rates (0, inf, nan, huge)."""
    if x == "inf":
        return b"\x7f\xff\x80" + b"\0" * 7
    if x == "nan":
        return b"\x7f\xff\xc0" + b"\0" * 7
    if x == "huge":
        return b"\x7f\xfe\xff" + b"\xff" * 7
    if x == 0:
        return b"\0" * 10
    m, e = math.frexp(float(x))
    exp = e - 1 + 16383
    mant = int(m * 2 * (1 << 63))
    return struct.pack(">HQ", exp, mant)


def _aiff_lie(rng: random.Random, d: bytearray) -> str:
    pos = d.find(b"COMM")
    if pos < 0:
        return "aiff COMM (absent)"
    c = pos + 8
    what = rng.randrange(5)
    if what == 0:
        v = rng.choice((0, 255, 0xFFFF))
        _put(d, c, ">H", v)
        return f"aiff channels = {v}"
    if what == 1:
        v = rng.choice((0, 0x7FFFFFFF, 0xFFFFFFFF))
        _put(d, c + 2, ">I", v)
        return f"aiff frames = {v}"
    if what == 2:
        v = rng.choice((0, 1, 64, 0xFFFF))
        _put(d, c + 6, ">H", v)
        return f"aiff sample size = {v}"
    if what == 3:
        v = rng.choice((0, 1, "inf", "nan", "huge"))
        d[c + 8 : c + 18] = _ieee_extended(v)
        return f"aiff sample rate = {v}"
    ss = d.find(b"SSND")
    if ss < 0:
        return "aiff SSND (absent)"
    _put(d, ss + 4, ">I", 0xFFFFFFFF)
    return "aiff SSND size = 0xFFFFFFFF"


def _ogg_lie(rng: random.Random, d: bytearray) -> str:
    pages = ogg_pages(d)
    if not pages:
        return "ogg pages (absent)"
    what = rng.randrange(4)
    label = ""
    vpos = d.find(b"\x01vorbis")
    opos = d.find(b"OpusHead")
    if what == 0 and vpos >= 0:
        # vorbis id header: 1 + "vorbis" + version(4) + channels(1) + rate(4) + bitrates(12) + blocksizes(1)
        sub = rng.randrange(4)
        if sub == 0:
            d[vpos + 11] = rng.choice((0, 255))
            label = f"vorbis channels = {d[vpos + 11]}"
        elif sub == 1:
            v = rng.choice((0, 1, 0xFFFFFFFF))
            _put(d, vpos + 12, "<I", v)
            label = f"vorbis rate = {v}"
        elif sub == 2:
            d[vpos + 28] = rng.choice((0x00, 0xFF, 0x66, 0xD6))
            label = f"vorbis blocksizes byte = {d[vpos + 28]:#04x}"
        else:
            _put(d, vpos + 7, "<I", rng.choice((1, 0xFFFFFFFF)))
            label = "vorbis version lie"
    elif what == 0 and opos >= 0:
        # OpusHead: magic(8) version(1) channels(1) pre-skip(2) rate(4) gain(2) family(1) [table]
        sub = rng.randrange(4)
        if sub == 0:
            d[opos + 9] = rng.choice((0, 3, 9, 255))
            label = f"opus channels = {d[opos + 9]}"
        elif sub == 1:
            _put(d, opos + 10, "<H", 0xFFFF)
            label = "opus pre-skip = 65535"
        elif sub == 2:
            _put(d, opos + 12, "<I", rng.choice((0, 0xFFFFFFFF)))
            label = "opus input rate lie"
        else:
            d[opos + 18] = rng.choice((1, 2, 255))
            label = f"opus mapping family = {d[opos + 18]}"
    elif what == 1:
        pos, _ = rng.choice(pages)
        v = rng.choice((0, 1 << 62, (1 << 64) - 1, (1 << 63)))
        _put(d, pos + 6, "<Q", v)
        label = f"ogg granule position = {v} at page {pos}"
    elif what == 2:
        pos, _ = rng.choice(pages)
        d[pos + 5] = rng.choice((0x00, 0x01, 0x02, 0x04, 0x07, 0xFF))
        label = f"ogg header type flags = {d[pos + 5]:#04x}"
    else:
        pos, _ = rng.choice(pages)
        nseg = d[pos + 26]
        if nseg:
            k = pos + 27 + rng.randrange(nseg)
            d[k] = rng.choice((0, 255))
            label = f"ogg lacing value changed at {k}"
        else:
            label = "ogg lacing (none)"
    fix_ogg(d, serial=None)  # the lie must pass the page CRC to reach the decoder
    return label or "ogg (no header found)"


def _mp3_lie(rng: random.Random, d: bytearray) -> str:
    what = rng.randrange(3)
    if what == 0:
        tag = b"ID3\x04\x00\x00" + bytes([0x7F, 0x7F, 0x7F, 0x7F])  # syncsafe size 256 MiB - 1
        d[0:0] = tag
        return "mp3 ID3v2 tag claiming 256 MiB"
    pos = 0
    while True:
        pos = d.find(b"\xff", pos)
        if pos < 0 or pos + 4 > len(d):
            return "mp3 frame (absent)"
        if d[pos + 1] & 0xE0 == 0xE0:
            break
        pos += 1
    if what == 1:
        d[pos + 2] = (d[pos + 2] & 0x0F) | 0xF0  # bitrate index 15 (bad)
        return f"mp3 bitrate index 15 at {pos}"
    d[pos + 2] = (d[pos + 2] & 0xF3) | 0x0C  # sample rate index 3 (reserved)
    return f"mp3 reserved sample rate at {pos}"


def m_header_lie(rng: random.Random, d: bytearray, seed: Seed) -> str:
    head = bytes(d[:12])
    if head[:4] in (b"RIFF", b"RF64"):
        return _wav_lie(rng, d)
    if head[:4] == b"fLaC":
        return _flac_lie(rng, d)
    if head[:4] == b"FORM":
        return _aiff_lie(rng, d)
    if head[:4] == b"OggS":
        return _ogg_lie(rng, d)
    return _mp3_lie(rng, d)


MUTATORS: list[tuple[str, Callable[..., str], float]] = [
    ("bitflip", m_bitflip, 3.0),
    ("byterun", m_byterun, 1.0),
    ("truncate", m_truncate, 2.0),
    ("insert", m_insert, 1.0),
    ("repeat", m_repeat, 0.7),
    ("splice", m_splice, 0.7),
    ("header", m_header_lie, 4.0),
]


@dataclass
class FuzzCase:
    index: int
    name: str
    seed: str
    ext: str
    mutations: list[str] = field(default_factory=list)
    sha256: str = ""
    size: int = 0


def mutate(index: int, seed_value: int, seeds: Sequence[Seed]) -> tuple[FuzzCase, bytes]:
    """The ``index``-th fuzz input (depends only on ``seed_value``, ``index`` and the seeds)."""
    rng = random.Random(f"{seed_value}:{index}")
    seed = seeds[index % len(seeds)]
    data = bytearray(seed.data)
    steps = rng.choice((1, 1, 1, 2, 2, 3))
    names, weights = [m[0] for m in MUTATORS], [m[2] for m in MUTATORS]
    done = []
    for _ in range(steps):
        kind = rng.choices(names, weights)[0]
        fn = dict((m[0], m[1]) for m in MUTATORS)[kind]
        if kind == "splice":
            done.append(fn(rng, data, seed, [s for s in seeds if s.name != seed.name]))
        else:
            done.append(fn(rng, data, seed))
    name = f"{index:05d}-{seed.name}.{seed.ext}"
    case = FuzzCase(index, name, seed.name, seed.ext, done, hashlib.sha256(data).hexdigest(), len(data))
    return case, bytes(data)


def generate(
    out_dir: str | os.PathLike,
    count: int = 1200,
    seed: int = 0,
    clips_dir: str | os.PathLike | None = DEFAULT_CLIPS,
    indices: Iterable[int] | None = None,
    include_seeds: bool = True,
) -> list[FuzzCase]:
    """Write the corpus (``indices`` of ``range(count)``, default all) and ``manifest.json``.

    The unmutated seeds are written too (``seed-<name>.<ext>``, index -1) so the harness can
    prove every format decodes before it is mutated.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seeds = seed_inputs(clips_dir)
    cases: list[FuzzCase] = []
    if include_seeds:
        for s in seeds:
            name = f"seed-{s.name}.{s.ext}"
            (out / name).write_bytes(s.data)
            cases.append(
                FuzzCase(-1, name, s.name, s.ext, [], hashlib.sha256(s.data).hexdigest(), len(s.data))
            )
    for i in range(count) if indices is None else indices:
        case, data = mutate(i, seed, seeds)
        (out / case.name).write_bytes(data)
        cases.append(case)
    manifest = {"seed": seed, "count": count, "cases": [asdict(c) for c in cases]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return cases


def sample_indices(count: int, k: int, seed: int = 0) -> list[int]:
    """A fixed, spread-out sample of ``k`` indices out of ``range(count)``."""
    return sorted(random.Random(f"sample:{seed}").sample(range(count), min(k, count)))


# ----------------------------------------------------------------------------- harness

_WORKER = r"""
import importlib, json, os, resource, sys, time
mem = int(sys.argv[1]); cpu = int(sys.argv[2])
sys.path.insert(0, sys.argv[3])
from pipeline.io.audio import AudioLimits
from pipeline.errors import PipelineError
mod, _, fn = sys.argv[6].partition(":")
decode_audio = getattr(importlib.import_module(mod), fn)
limits = AudioLimits(**json.loads(sys.argv[4]))
# the limit is applied after the imports: it bounds what decoding may add, not the interpreter
if mem > 0:
    with open("/proc/self/status") as f:
        vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + mem, vm + mem))
if cpu > 0:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    path = line.rstrip("\n")
    t0 = time.monotonic()
    try:
        a = decode_audio(path, limits, deadline_s=float(sys.argv[5]) or None)
        out = {"outcome": "ok", "seconds": a.duration_s, "warnings": a.warnings}
    except PipelineError as e:
        out = {"outcome": "pipeline_error", "type": type(e).__name__, "message": str(e)[:300]}
    except BaseException as e:
        out = {"outcome": "exception", "type": type(e).__name__, "message": str(e)[:300]}
    out["wall_s"] = time.monotonic() - t0
    print(json.dumps(out), flush=True)
"""


@dataclass
class Result:
    name: str
    outcome: str  # ok | pipeline_error | exception | crash | hang
    type: str = ""
    message: str = ""
    wall_s: float = 0.0


DEFAULT_TARGET = "pipeline.io.audio:decode_audio"


class _Worker:
    def __init__(
        self, mem_mb: int, cpu_s: int, limits: dict, deadline_s: float, target: str = DEFAULT_TARGET
    ) -> None:
        env = dict(os.environ, PYTHONFAULTHANDLER="0", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WORKER,
                str(mem_mb * 1024 * 1024),
                str(cpu_s),
                str(REPO),
                json.dumps(limits),
                str(deadline_s),
                target,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError("fuzz worker failed to start")

    def run(self, path: str, timeout_s: float) -> dict | None:
        """The worker's result, or None when it died / ran past ``timeout_s`` (then it is killed)."""
        assert self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.write(path + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            self.kill()
            return {"outcome": "hang"}
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            return None
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def check_files(
    paths: Sequence[str | os.PathLike],
    timeout_s: float = 10.0,
    mem_mb: int = 1024,
    cpu_s: int = 30,
    workers: int = 2,
    limits: dict | None = None,
    deadline_s: float = 0.0,
    target: str = DEFAULT_TARGET,
) -> list[Result]:
    """Decode every file in an isolated worker; return one :class:`Result` per path, in order.

    ``target`` (``"module:function"``, called as ``f(path, limits, deadline_s=...)``) replaces
    ``decode_audio``, e.g. to test the harness itself.
    """
    import concurrent.futures as cf

    limits = limits or {}
    paths = [os.fspath(p) for p in paths]
    chunks = [paths[i::workers] for i in range(workers)]

    def run_chunk(chunk: list[str]) -> list[Result]:
        out = []
        w = _Worker(mem_mb, cpu_s, limits, deadline_s, target)
        try:
            for p in chunk:
                t0 = time.monotonic()
                r = w.run(p, timeout_s)
                name = os.path.basename(p)
                if r is None or r.get("outcome") == "hang":
                    rc = w.proc.returncode
                    kind = "hang" if r is not None else "crash"
                    out.append(Result(name, kind, f"returncode {rc}", "", time.monotonic() - t0))
                    w.kill()
                    w = _Worker(mem_mb, cpu_s, limits, deadline_s, target)
                    continue
                out.append(
                    Result(name, r["outcome"], r.get("type", ""), r.get("message", ""), r.get("wall_s", 0.0))
                )
        finally:
            w.kill()
        return out

    with cf.ThreadPoolExecutor(workers) as ex:
        parts = list(ex.map(run_chunk, chunks))
    by_name = {r.name: r for part in parts for r in part}
    return [by_name[os.path.basename(p)] for p in paths]


def summarize(results: Sequence[Result]) -> dict:
    by_outcome: dict[str, int] = {}
    by_type: dict[str, int] = {}
    for r in results:
        by_outcome[r.outcome] = by_outcome.get(r.outcome, 0) + 1
        if r.type:
            by_type[r.type] = by_type.get(r.type, 0) + 1
    walls = sorted(r.wall_s for r in results)
    return {
        "files": len(results),
        "outcomes": by_outcome,
        "error_types": by_type,
        "max_wall_s": walls[-1] if walls else 0.0,
        "failures": [asdict(r) for r in results if r.outcome in ("exception", "crash", "hang")],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fuzz_corpus", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write the corpus and manifest.json")
    g.add_argument("--out", required=True)
    g.add_argument("--count", type=int, default=1200)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--clips", default=str(DEFAULT_CLIPS))
    g.add_argument("--sample", type=int, help="only a fixed sample of this many indices")
    c = sub.add_parser("check", help="decode every file of a corpus directory in isolated workers")
    c.add_argument("dir")
    c.add_argument("--timeout-s", type=float, default=10.0)
    c.add_argument("--mem-mb", type=int, default=1024)
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--json", help="write the summary here")
    args = p.parse_args(argv)
    if args.cmd == "generate":
        idx = sample_indices(args.count, args.sample, args.seed) if args.sample else None
        cases = generate(args.out, args.count, args.seed, args.clips or None, idx)
        print(f"wrote {len(cases)} files to {args.out}")
        return 0
    files = sorted(str(f) for f in Path(args.dir).iterdir() if f.is_file() and f.name != "manifest.json")
    t0 = time.monotonic()
    res = check_files(files, args.timeout_s, args.mem_mb, workers=args.workers)
    summary = summarize(res)
    summary["wall_s"] = time.monotonic() - t0
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
