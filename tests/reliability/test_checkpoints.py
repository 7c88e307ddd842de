"""Hostile checkpoints at the pipeline level (the loader itself: tests/musicfm/test_checkpoint.py;
SHA-256 pinning of downloads: tests/musicfm/test_hub.py).

* ``--checkpoint evil.pt`` (a pickle whose payload would write a marker file): the job stops with
  one line, and the payload never ran;
* wrong shapes / missing / unexpected keys: refused with every problem listed, in one line.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pipeline.runs.model_info import probe_model
from pipeline.runs.settings import EmbedJob
from tests.conftest import REPO
from tools.testkit.reliability import CKPT, JOB, STATS, job_kwargs, tone


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _golden() -> dict:
    return torch.load(CKPT, map_location="cpu", weights_only=True)


def test_evil_checkpoint_is_one_line_and_runs_nothing(ray_cluster, tmp_path) -> None:
    import soundfile as sf

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({**_golden(), "payload": _Payload(str(marker))}, evil)
    cat = tmp_path / "cat"
    cat.mkdir()
    sf.write(cat / "a.wav", tone(2.0), 24000)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    r = subprocess.run(
        [sys.executable, JOB, "--catalog", str(cat), "--output", str(tmp_path / "store")]
        + ["--checkpoint", str(evil), "--stats", STATS, "--layers", "1,3", "--no-progress"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("embed_catalog: error: ") and "refused to load" in last, r.stderr
    assert "weights_only=True" in last and "Traceback" not in r.stderr
    assert not marker.exists(), "the pickle payload ran"
    assert not (tmp_path / "store" / "tracks.lance").exists()


def test_wrong_shapes_and_keys_are_listed(tmp_path) -> None:
    ck = _golden()
    sd = dict(ck["state_dict"])
    gone = "model.conformer.layers.1.ffn1.output_dense.weight"
    del sd[gone]
    shaped = "model.conformer.layers.0.ffn2.output_dense.weight"
    sd[shaped] = torch.zeros(7, 3)
    sd["model.something_unexpected"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": sd}, bad)
    job = EmbedJob(catalog="unused.csv", output=str(tmp_path / "o"), **job_kwargs(checkpoint=str(bad)))
    with pytest.raises(ValueError) as ei:
        probe_model(job, gpus=0)
    msg = str(ei.value)
    assert type(ei.value).__name__ == "CheckpointError"
    for needle in (gone, shaped, "something_unexpected"):
        assert needle in msg, msg
    assert "(7, 3)" in msg and "\n" not in msg, msg  # all of it, on the one line the CLI prints
