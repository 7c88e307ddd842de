"""Faults of the system fail the run; bad input stays an error row (issue: fail loudly).

Real Ray, real Lance, the real small checkpoint made broken on purpose, real audio files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import torch

from pipeline.commands.runs import embed_parser
from pipeline.errors import RunFailed
from pipeline.exits import DEFAULT_MAX_ERROR_RATE, EXIT_ERROR_RATE, EXIT_FAILED
from pipeline.flow.stages import EmbedStage
from pipeline.runs.embed import run_embed
from pipeline.runs.settings import EmbedJob
from tests.conftest import GOLDEN, REPO

CKPT, STATS = str(GOLDEN / "checkpoint.pt"), str(GOLDEN / "stats.json")
JOB = str(REPO / "jobs" / "embed_catalog.py")
POISON = 0.123456  # a track whose first sample is this value makes PoisonedEmbedStage fail its window


def _tone(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 24000)) / 24000
    return (0.2 * np.sin(2 * np.pi * 110 * (1 + seed) * t) + 0.02 * rng.standard_normal(t.size)).astype(
        np.float32
    )


def _catalog(d: Path, n: int, poisoned: tuple[int, ...] = (), broken: int = 0) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        x = _tone(2.0, i)
        if i in poisoned:
            x[0] = POISON
        sf.write(d / f"t{i}.wav", x, 24000, subtype="FLOAT")
    for i in range(broken):
        (d / f"broken{i}.wav").write_bytes(b"RIFF not really audio" * 10)
    return d


def _job(catalog: Path, out: Path, **kw) -> EmbedJob:
    base = dict(catalog=str(catalog), output=str(out), checkpoint=CKPT, stats=STATS, layers=(1, 3),
                precision="fp32", window_s=1.0, hop_s=1.0, batch_size=8, decode_cpus=1)  # fmt: skip
    base.update(kw)
    return EmbedJob(**base)


def _checkpoint(tmp: Path, name: str, edit) -> str:
    sd = torch.load(CKPT, map_location="cpu", weights_only=True)
    edit(sd["state_dict"])
    path = tmp / name
    torch.save(sd, path)
    return str(path)


def _run_job(ray_cluster, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    return subprocess.run([sys.executable, JOB, *args, "--no-progress"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


class PoisonedEmbedStage(EmbedStage):
    """The real model stage, whose model fails on windows that start with :data:`POISON`."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        real = self.model.hidden_states

        def hidden_states(x, layers, precision="fp32"):  # x: (B, N)
            if any(abs(float(x[b, 0]) - POISON) < 1e-6 for b in range(x.shape[0])):
                raise RuntimeError("the model cannot take this window")
            return real(x, layers, precision=precision)

        self.model.hidden_states = hidden_states


class BrokenEmbedStage(EmbedStage):
    """The real model stage, whose model fails on every window the same way (a checkpoint that
    loads but does not fit, say)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)

        def hidden_states(x, layers, precision="fp32"):  # x: (B, N)
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

        self.model.hidden_states = hidden_states


def test_the_default_error_budget_is_half_and_documented() -> None:
    assert EmbedJob(catalog="c", output="o").max_error_rate == DEFAULT_MAX_ERROR_RATE == 0.5
    assert embed_parser().parse_args(["--catalog", "c", "--output", "o"]).max_error_rate == 0.5
    assert "--max-error-rate" in embed_parser().format_help()


def test_a_bad_window_is_one_error_row_and_its_batch_neighbours_are_stored(ray_cluster, tmp_path) -> None:
    cat = _catalog(tmp_path / "cat", 4, poisoned=(2,))
    report = run_embed(_job(cat, tmp_path / "store"), progress=False, model_stage=PoisonedEmbedStage)
    assert report.status == "ok" and report.tracks_ok == 3 and report.tracks_failed == 1
    tracks = lance.dataset(str(tmp_path / "store" / "tracks.lance")).to_table()
    assert sorted(Path(u).name for u in tracks["uri"].to_pylist()) == ["t0.wav", "t1.wav", "t3.wav"]
    errors = lance.dataset(str(tmp_path / "store" / "errors.lance")).to_table().to_pylist()
    assert [(Path(e["uri"]).name, e["stage"], e["error_type"]) for e in errors] == [
        ("t2.wav", "model", "RuntimeError")
    ]
    assert "cannot take this window" in errors[0]["message"]


def test_a_model_that_fails_on_every_window_fails_the_run_and_stores_nothing(ray_cluster, tmp_path) -> None:
    cat = _catalog(tmp_path / "cat", 4)
    with pytest.raises(
        RunFailed,
        match=r"ModelError: (every window of a batch of|the model's first \d+ windows failed the same way)",
    ):
        run_embed(_job(cat, tmp_path / "store"), progress=False, model_stage=BrokenEmbedStage)
    assert not (tmp_path / "store" / "tracks.lance").exists()
    runs = lance.dataset(str(tmp_path / "store" / "runs.lance")).to_table().to_pylist()
    assert runs[-1]["status"] == "failed" and "ModelError" in runs[-1]["report_json"]


def test_a_checkpoint_with_a_nan_weight_is_refused_before_any_work(ray_cluster, tmp_path) -> None:
    def nan_weight(sd):
        sd["model.conformer.layers.1.ffn1.intermediate_dense.weight"][3, 5] = float("nan")

    ckpt = _checkpoint(tmp_path, "nan.pt", nan_weight)
    cat = _catalog(tmp_path / "cat", 2)
    r = _run_job(ray_cluster, "--catalog", str(cat), "--output", str(tmp_path / "store"),
                 "--checkpoint", ckpt, "--stats", STATS, "--layers", "1,3")  # fmt: skip
    assert r.returncode == EXIT_FAILED, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("embed_catalog: error: ") and "NaN/Inf" in last and "Traceback" not in r.stderr
    assert "ffn1.intermediate_dense.weight" in last
    assert not (tmp_path / "store" / "tracks.lance").exists()


def test_non_finite_model_output_fails_the_run_and_nothing_non_finite_is_stored(
    ray_cluster, tmp_path
) -> None:
    def overflow(sd):  # finite weights whose output overflows float32: Inf in the last layer
        sd["model.conformer.layer_norm.weight"].fill_(3e38)
        sd["model.conformer.layer_norm.bias"].fill_(3e38)

    ckpt = _checkpoint(tmp_path, "overflow.pt", overflow)
    cat = _catalog(tmp_path / "cat", 4)
    r = _run_job(ray_cluster, "--catalog", str(cat), "--output", str(tmp_path / "store"),
                 "--checkpoint", ckpt, "--stats", STATS, "--layers", "1,3", "--window-s", "1")  # fmt: skip
    assert r.returncode == EXIT_FAILED, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert "ModelError" in last and "NaN/Inf for" in last, r.stderr
    for name in ("tracks", "windows"):
        path = tmp_path / "store" / f"{name}.lance"
        assert not path.exists() or lance.dataset(str(path)).count_rows() == 0
    runs = lance.dataset(str(tmp_path / "store" / "runs.lance")).to_table()
    assert runs["status"].to_pylist() == ["failed"]


def test_a_run_where_every_track_fails_exits_non_zero_whatever_the_budget(ray_cluster, tmp_path) -> None:
    cat = _catalog(tmp_path / "cat", 0, broken=3)
    r = _run_job(ray_cluster, "--catalog", str(cat), "--output", str(tmp_path / "store"),
                 "--checkpoint", CKPT, "--stats", STATS, "--layers", "1,3", "--max-error-rate", "1.0")  # fmt: skip
    assert r.returncode == EXIT_ERROR_RATE, (r.stdout, r.stderr)
    assert "every track failed (3 of 3)" in r.stdout
    runs = lance.dataset(str(tmp_path / "store" / "runs.lance")).to_table()
    assert runs["status"].to_pylist() == ["failed"]
    errors = lance.dataset(str(tmp_path / "store" / "errors.lance")).to_table()
    assert errors.num_rows == 3 and set(errors["stage"].to_pylist()) == {"decode"}
    assert pa.compute.all(pa.compute.is_valid(errors["message"])).as_py()
