"""Decoding under a hard memory limit (RLIMIT_AS in a subprocess, relative to its size after
imports): a 10-minute 6-channel 48 kHz file needs ~690 MB to decode naively (``soundfile.read``)
but ~60 MB of output at 24 kHz mono. Under a 300 MB limit the naive read fails and the pipeline's
block decode (``DecodeStage``, i.e. fetch + decode + windows) succeeds; under a 40 MB limit the
same file becomes a ``MemoryError`` *error row* and the next file still decodes in that process.

(A worker the kernel OOM-kills instead is the poison-file path: see test_faults.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import soundfile as sf

from tests.conftest import REPO
from tools.testkit.reliability import tone

SR, CH, MINUTES = 48000, 6, 10

_SCRIPT = r"""
import gc, json, resource, sys
sys.path.insert(0, sys.argv[1])
import numpy as np, soundfile as sf
from pipeline.io.audio import AudioLimits
from pipeline.flow.inference import EmbedSettings
from pipeline.flow.stages import DecodeStage

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

def limit(extra_mb):
    cap = status("VmSize") + extra_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))

big, small = sys.argv[2], sys.argv[3]
stage = DecodeStage(EmbedSettings(layers=(1,), window_s=30.0, hop_s=30.0), AudioLimits(), None, 600.0)
out = {}
limit(300)
try:
    x = sf.read(big, dtype="float32")[0]
    out["naive"] = f"decoded {x.shape}"
    del x
except MemoryError:
    out["naive"] = "MemoryError"
gc.collect()
limit(300)  # again, from the current size: the failed read may have left address space mapped
rss0 = status("VmRSS")
rows = stage._guarded({"track_id": "big", "uri": big, "metadata_json": "{}"})
out["big_300"] = [r["kind"] for r in rows].count("window"), rows[0].get("error_type")
out["big_300_hwm_mb"] = (status("VmHWM") - rss0) / 2**20
del rows
gc.collect()
limit(40)
rows = stage._guarded({"track_id": "big", "uri": big, "metadata_json": "{}"})
out["big_40"] = [r["kind"] for r in rows], rows[0]["error_type"], rows[0]["stage"], rows[0]["message"]
rows = stage._guarded({"track_id": "small", "uri": small, "metadata_json": "{}"})
out["small_40"] = [r["kind"] for r in rows].count("window")
print(json.dumps(out))
"""


def _big_file(path) -> None:
    with sf.SoundFile(path, "w", samplerate=SR, channels=CH, format="FLAC", subtype="PCM_16") as f:
        t = np.arange(SR // 2) / SR
        for k in range(MINUTES * 6):  # 10 s blocks: a tone burst then silence (a small file)
            x = np.zeros((SR * 10, CH), np.float32)
            x[: SR // 2, :] = (0.2 * np.sin(2 * np.pi * 220 * (1 + k % 5) * t))[:, None]
            f.write(x)


def test_block_decode_fits_where_a_naive_decode_does_not(tmp_path) -> None:
    big, small = tmp_path / "big.flac", tmp_path / "small.wav"
    _big_file(big)
    sf.write(small, tone(3.0), 24000)
    # one malloc arena: otherwise each new thread's arena reserves 64+ MB of address space and
    # RLIMIT_AS measures glibc's reservations rather than what decoding uses
    r = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(REPO), str(big), str(small)],
        env={**os.environ, "MALLOC_ARENA_MAX": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["naive"] == "MemoryError", out  # the premise: a whole-file read does not fit
    assert out["big_300"] == [MINUTES * 2, None], out  # 20 windows of 30 s, no error
    kinds, etype, stage, msg = out["big_40"]
    assert kinds == ["error"] and etype == "MemoryError" and stage == "decode", out
    assert out["small_40"] == 1, out  # the worker goes on
    print(f"decode of a 10-min 6-ch 48 kHz file: peak +{out['big_300_hwm_mb']:.0f} MB")


def test_out_of_memory_while_copying_windows_is_an_error_row(tmp_path, monkeypatch) -> None:
    """MemoryError after decoding (copying the windows out) stays this track's error row; before
    the fix it escaped the stage and failed the whole run."""
    import pipeline.flow.stages as stages
    from pipeline.flow.inference import EmbedSettings
    from pipeline.io.audio import AudioLimits

    def no_memory(samples, wins):
        raise MemoryError("simulated")

    sf.write(tmp_path / "a.wav", tone(3.0), 24000)
    monkeypatch.setattr(stages, "copy_windows", no_memory)
    stage = stages.DecodeStage(EmbedSettings(layers=(1,), window_s=1.0, hop_s=1.0), AudioLimits(), None)
    rows = stage._guarded({"track_id": "a", "uri": str(tmp_path / "a.wav"), "metadata_json": "{}"})
    assert [(r["kind"], r["stage"], r["error_type"]) for r in rows] == [("error", "decode", "MemoryError")]
