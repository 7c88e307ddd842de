"""Decoder fuzzing: mutated files of every supported format through decode_audio, each in an
isolated worker process (RLIMIT_AS, CPU limit, wall-clock limit): no crash, no hang, and every
input either decodes or raises a PipelineError (which the pipeline turns into an error row).

CI decodes a fixed sample of the corpus plus the unmutated seeds; --run-slow decodes all of it
and two more seeds' worth (tools/fuzz_corpus.py, deterministic from the seed).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import AUDIO
from tools.fuzz_corpus import check_files, generate, sample_indices, summarize

COUNT = 1200
CI_SAMPLE = 120
TIMEOUT_S, MEM_MB = 20.0, 1024


def _run(tmp_path, count: int, seed: int, indices=None) -> dict:
    cases = generate(tmp_path, count=count, seed=seed, clips_dir=AUDIO / "clips", indices=indices)
    res = check_files([tmp_path / c.name for c in cases], timeout_s=TIMEOUT_S, mem_mb=MEM_MB, workers=2)
    s = summarize(res)
    seeds = [r for c, r in zip(cases, res, strict=True) if c.index < 0]
    assert seeds and all(r.outcome == "ok" for r in seeds), [r for r in seeds if r.outcome != "ok"]
    assert not s["failures"], json.dumps(s["failures"][:10], indent=1)
    assert set(s["outcomes"]) <= {"ok", "pipeline_error"}
    assert s["outcomes"].get("ok", 0) > len(seeds) and s["outcomes"].get("pipeline_error", 0) > 0
    print(f"fuzz seed {seed}: {s['files']} files {s['outcomes']} max {s['max_wall_s']:.2f} s")
    return s


def test_fuzz_sample_never_crashes_hangs_or_escapes(tmp_path) -> None:
    _run(tmp_path, COUNT, 0, sample_indices(COUNT, CI_SAMPLE))


def test_corpus_is_deterministic(tmp_path) -> None:
    idx = sample_indices(COUNT, 30, seed=1)
    a = generate(tmp_path / "a", count=COUNT, seed=0, clips_dir=AUDIO / "clips", indices=idx)
    b = generate(tmp_path / "b", count=COUNT, seed=0, clips_dir=AUDIO / "clips", indices=idx)
    assert [(c.name, c.sha256) for c in a] == [(c.name, c.sha256) for c in b]
    kinds = {m.split()[0] for c in a for m in c.mutations}
    assert len(kinds) >= 5, kinds


def test_harness_isolates_crashes_hangs_and_stray_exceptions(tmp_path) -> None:
    files = []
    for name, head in (
        ("segv", b"SEGV"),
        ("abrt", b"ABRT"),
        ("hang", b"HANG"),
        ("oom", b"OOM!"),
        ("junk", b"RIFF"),
    ):
        p = tmp_path / f"{name}.wav"
        p.write_bytes(head + b"\0" * 64)
        files.append(p)
    files.append(AUDIO / "clips" / "hw_fruit.ogg")  # a good file after all that: the pool recovered
    res = check_files(
        files,
        timeout_s=5.0,
        mem_mb=512,
        workers=1,
        target="tests.reliability.fuzz_targets:misbehaving_decode",
    )
    got = {r.name: (r.outcome, r.type) for r in res}
    assert got["segv.wav"][0] == "crash" and "-11" in got["segv.wav"][1]
    assert got["abrt.wav"][0] == "crash" and "-6" in got["abrt.wav"][1]
    assert got["hang.wav"][0] == "hang"
    assert got["oom.wav"] == ("exception", "MemoryError")
    assert got["junk.wav"] == ("pipeline_error", "DecodeError")
    assert got["hw_fruit.ogg"][0] == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fuzz_full_corpus(tmp_path, seed: int) -> None:
    _run(tmp_path, COUNT if seed == 0 else 2000, seed)
