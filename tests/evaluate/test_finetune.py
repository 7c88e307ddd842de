"""Fine-tuning on Ray Train, as a user runs it: two CPU workers (gloo) on the session's cluster,
real clips decoded by the embed job's decode stage, the small golden model with random weights.

One training serves the end-to-end tests: a driver process is SIGKILLed after its first
checkpoint and the same command is run again, which must continue from that checkpoint; the
result must have learned (loss down, backbone weights moved) and embed a catalog through the
real embed job under its own model_id.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pytest
import torch

from pipeline.evaluate.finetune import FinetuneSpec, LabelledTrack
from pipeline.evaluate.finetune_forgetting import forgetting, probe_score
from pipeline.evaluate.finetune_state import CheckpointStore
from tests.conftest import AUDIO, GOLDEN, REPO

CONFIG, STATS = str(GOLDEN / "config.json"), str(GOLDEN / "stats.json")
CLIPS = ["hw_fruit.ogg", "lc_city_blues.flac", "hw_rock.wav", "lc_architectural.wav"]
MAX_STEPS, EVERY, LAYER = 12, 4, 2  # layer 2 of 3: the last Conformer layer takes no part

DRIVER = """
import json, sys
from pipeline.evaluate.finetune import FinetuneSpec, LabelledTrack, run_finetune
args = json.load(open(sys.argv[1]))
args["train"] = tuple(LabelledTrack(**t) for t in args["train"])
r = run_finetune(FinetuneSpec(**args))
json.dump({**r.__dict__, "losses": list(r.losses)}, open(sys.argv[2], "w"))
"""


def _spec_args(output: Path, **over) -> dict:
    train = [{"uri": str(AUDIO / "clips" / c), "label": i % 2} for i, c in enumerate(CLIPS)]
    return dict(checkpoint="random:0", stats=STATS, model_config=CONFIG, train=train, num_classes=2,
                output=str(output), layer=LAYER, lr_backbone=1e-3, lr_head=3e-2, window_s=1.0,
                batch_size=8, max_steps=MAX_STEPS, checkpoint_every=EVERY, num_workers=2, **over)  # fmt: skip


def _driver(tmp: Path, args: dict, name: str, gcs: str) -> tuple[list[str], dict]:
    (tmp / f"{name}.json").write_text(json.dumps(args))
    script = tmp / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "RAY_ADDRESS": gcs, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    return [sys.executable, str(script), str(tmp / f"{name}.json"), str(tmp / f"{name}.out.json")], env


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    """(args, result of the rerun, step of the checkpoint the kill left, rerun's stderr)."""
    tmp = tmp_path_factory.mktemp("finetune")
    gcs = ray_cluster.get_runtime_context().gcs_address
    out = tmp / "out"
    args = _spec_args(out)  # first run: windows streamed from the decode stage every epoch
    cmd, env = _driver(tmp, args, "first", gcs)
    store = CheckpointStore(str(out))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 400
        while store.latest() is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.latest() is not None, proc.communicate(timeout=30)[0].decode()[-4000:]
        os.kill(proc.pid, signal.SIGKILL)  # the driver, mid-training
    finally:
        proc.kill()
        proc.wait()
    killed_at = store.latest()
    assert 0 < killed_at < MAX_STEPS
    assert not (tmp / "first.out.json").exists()
    # the same training again (decoded windows cached this time: another data path, same run)
    cmd, env = _driver(tmp, {**args, "cache_decoded": True}, "second", gcs)
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=500, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return args, json.loads((tmp / "second.out.json").read_text()), killed_at, r.stderr + r.stdout


def test_resumes_from_the_last_checkpoint_after_sigkill(trained) -> None:
    args, res, killed_at, log = trained
    assert res["resumed_from"] >= killed_at > 0  # continued, not restarted from step 0
    assert res["steps"] == MAX_STEPS and len(res["losses"]) == MAX_STEPS  # the killed run's losses kept
    assert f"steps {res['resumed_from']} -> {MAX_STEPS}" in log  # the workers' own account
    assert CheckpointStore(args["output"]).latest() == MAX_STEPS


def _train_set_loss(spec: FinetuneSpec, model: torch.nn.Module) -> float:
    """Cross-entropy of ``model`` over every training window (decoded as the decode stage does)."""
    from pipeline.evaluate.finetune_data import fit_length
    from pipeline.io.audio import decode_audio
    from pipeline.io.windows import WindowSpec, plan_windows

    ws = WindowSpec(window_s=spec.window_s, hop_s=spec.window_s)
    wav, labels = [], []
    for t in spec.train:
        x = decode_audio(t.uri).samples
        for w in plan_windows(x.shape[0], ws):
            wav.append(fit_length(x[w.start : w.end], ws.window_samples))
            labels.append(t.label)
    with torch.no_grad():
        logits = model(torch.from_numpy(np.stack(wav)))  # (n, C)
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(labels)))


def test_training_loss_decreases(trained) -> None:
    from safetensors.torch import load_file

    from musicfm import MusicFM25Hz
    from pipeline.evaluate.finetune_train import build

    args, res = trained[0], trained[1]
    losses = np.array(res["losses"])
    assert np.isfinite(losses).all()
    third = MAX_STEPS // 3
    assert losses[-third:].mean() < losses[:third].mean(), losses  # per-step history, noisy
    # the whole training set, before (base backbone, the seeded initial head) and after
    spec = FinetuneSpec(**{**args, "train": tuple(LabelledTrack(**t) for t in args["train"])})
    model, _ = build(spec, torch.device("cpu"))
    before = _train_set_loss(spec, model.eval())
    model.backbone = MusicFM25Hz.from_checkpoint(res["checkpoint"])
    model.head.load_state_dict(load_file(res["head"]))
    after = _train_set_loss(spec, model.eval())
    assert after < 0.7 * before, (before, after)


def test_backbone_weights_change_where_they_train(trained) -> None:
    from musicfm import MusicFM25Hz
    from pipeline.engine.inference import load_model

    res = trained[1]
    base = load_model("random:0", STATS, CONFIG).state_dict()
    tuned = MusicFM25Hz.from_checkpoint(res["checkpoint"]).state_dict()
    assert base.keys() == tuned.keys()
    moved = {k for k in base if not torch.equal(base[k], tuned[k])}
    for k in ("frontend.proj.weight", "encoder.layers.0.attn.q.weight", "encoder.layers.1.ffn2.fc1.weight"):
        assert k in moved, k
    # hidden state 2 does not depend on Conformer layer 3 nor on the final norm: frozen, unchanged
    assert not {k for k in moved if k.startswith(("encoder.layers.2.", "encoder.norm."))}
    assert res["model_id"] != res["base_model_id"] and res["base_model_id"].startswith("random-")


def test_finetuned_checkpoint_embeds_a_catalog(trained, ray_cluster, tmp_path) -> None:
    res = trained[1]
    catalog = tmp_path / "catalog.csv"
    (tmp_path / "clips").mkdir()
    for c in CLIPS[:2]:  # local URIs must be under the catalog's folder
        shutil.copy(AUDIO / "clips" / c, tmp_path / "clips" / c)
    with open(catalog, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["track_id", "uri"])
        w.writerows([[c.split(".")[0], f"clips/{c}"] for c in CLIPS[:2]])
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    cmd = [sys.executable, str(REPO / "jobs" / "embed_catalog.py"), "--catalog", str(catalog), "--output",
           str(tmp_path / "store"), "--checkpoint", res["checkpoint"], "--layers", "2", "--no-progress"]  # fmt: skip
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    tracks = lance.dataset(str(tmp_path / "store" / "tracks.lance")).to_table().to_pylist()
    assert len(tracks) == 2
    assert {t["model_id"] for t in tracks} == {res["model_id"]}
    assert res["model_id"] != res["base_model_id"]


def test_rerun_of_a_finished_training_trains_no_more(trained) -> None:
    from pipeline.evaluate.finetune import export_result

    args, res, _, _ = trained
    spec = FinetuneSpec(**{**args, "train": tuple(LabelledTrack(**t) for t in args["train"])})
    again = export_result(spec, CheckpointStore(spec.output), MAX_STEPS, MAX_STEPS)
    assert again.model_id == res["model_id"] and list(again.losses) == res["losses"]


def test_checkpoints_of_another_run_are_refused(trained) -> None:
    from pipeline.evaluate.finetune_state import unpack_state
    from pipeline.evaluate.finetune_train import build, make_optimizer

    args = trained[0]
    spec = FinetuneSpec(**{**args, "train": tuple(LabelledTrack(**t) for t in args["train"]), "lr_head": 0.5})
    model, _ = build(spec, torch.device("cpu"))
    store = CheckpointStore(spec.output)
    tensors, meta = store.read(store.latest())
    with pytest.raises(ValueError, match="another fine-tuning run"):
        unpack_state(
            tensors, meta, model.backbone, model.head, make_optimizer(model, spec), spec.run_key(), "x"
        )


def test_forgetting_scores_both_backbones(trained) -> None:
    res = trained[1]
    clips = sorted((AUDIO / "clips").glob("*"))[:4]
    tracks = [LabelledTrack(str(c), i % 2) for i, c in enumerate(clips)]
    rep = forgetting("random:0", res["checkpoint"], tracks, layer=LAYER, stats=STATS, model_config=CONFIG,
                     window_s=5.0)  # fmt: skip
    assert 0.0 <= rep.base_score <= 1.0 and 0.0 <= rep.finetuned_score <= 1.0
    assert rep.base_model_id == res["base_model_id"] and rep.finetuned_model_id == res["model_id"]
    assert rep.folds == 2 and rep.change == rep.finetuned_score - rep.base_score


def test_probe_score_separates_informative_from_shuffled_features() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    x = rng.normal(size=(40, 8)) + 3.0 * y[:, None]
    assert probe_score(x, y)[0] == 1.0
    assert probe_score(rng.normal(size=(40, 8)), y)[0] < 0.8
    with pytest.raises(ValueError, match="2 classes with 2 tracks"):
        probe_score(x[:21], y[:21])


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"num_classes": 1}, "num_classes must be an int >= 2"),
        ({"train": ()}, "non-empty tuple"),
        ({"lr_backbone": 0.0}, "lr_backbone must be a positive number"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"window_s": 0.01}, "at least 0.1 s"),
        ({"layer": -1}, "layer must be an int >= 0"),
        ({"output": ""}, "output must be"),
        ({"train": (LabelledTrack("a.wav", 5),)}, "is not below num_classes"),
    ],
)
def test_spec_validation(over: dict, needle: str) -> None:
    args = {**_spec_args(Path("o")), "train": (LabelledTrack("a.wav", 0),), **over}
    with pytest.raises(ValueError, match=needle):
        FinetuneSpec(**args)


def test_bad_labels_and_layers_are_refused_before_any_work(tmp_path) -> None:
    from pipeline.evaluate.finetune import run_finetune

    with pytest.raises(ValueError, match="label must be a class index"):
        LabelledTrack("a.wav", -1)
    spec = FinetuneSpec(**{**_spec_args(tmp_path), "train": (LabelledTrack("a.wav", 0),), "layer": 4})
    with pytest.raises(ValueError, match="layer 4 exceeds the model depth 3"):
        run_finetune(spec)
    spec = FinetuneSpec(**{**_spec_args(tmp_path), "train": (LabelledTrack("a.wav", 0),),
                           "checkpoint": str(tmp_path / "nope.safetensors")})  # fmt: skip
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        run_finetune(spec)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_checkpoint_store_is_atomic_keeps_the_newest_and_reads_back(where, tmp_path, request) -> None:
    opts: dict = {}
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        output = server.bucket("finetune-ckpt") + "/run"  # bucket names need 3+ characters
        opts = server.options("s3fs")
    else:
        output = str(tmp_path / "run")
    store = CheckpointStore(output, opts)
    assert store.latest() is None
    for step in (4, 8, 12):
        store.write(step, {"w": torch.full((3,), float(step))}, {"step": str(step)})
    assert store.steps() == [8, 12] and store.latest() == 12  # the two newest kept
    tensors, meta = store.read(12)
    assert torch.equal(tensors["w"], torch.full((3,), 12.0)) and meta["step"] == "12"
    if where == "local":  # no temporary file left beside the checkpoints
        assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == [
            "step-000000008.safetensors",
            "step-000000012.safetensors",
        ]


def test_export_to_object_storage_loads_with_the_same_model_id(
    trained, s3_server, tmp_path, monkeypatch
) -> None:
    from pipeline.engine.inference import load_model
    from pipeline.evaluate.finetune import export_result

    args, res = trained[0], trained[1]
    opts = s3_server.options("s3fs")
    output = s3_server.bucket("finetune-out") + "/run"
    spec = FinetuneSpec(**{**args, "train": tuple(LabelledTrack(**t) for t in args["train"]), "output": output,
                           "storage_options": opts})  # fmt: skip
    store = CheckpointStore(output, opts)
    store.write(MAX_STEPS, *CheckpointStore(args["output"]).read(MAX_STEPS))  # as rank 0 writes it
    got = export_result(spec, store, MAX_STEPS, 0)
    assert got.checkpoint == output + "/finetuned.safetensors" and got.head == output + "/head.safetensors"
    monkeypatch.setenv("MUSICFM_CACHE", str(tmp_path / "cache"))
    model = load_model(got.checkpoint, storage_options=opts)  # as the embed job loads --checkpoint s3://...
    assert model.model_id == got.model_id == res["model_id"]


def test_more_workers_than_the_cluster_holds_is_refused_not_a_hang(ray_cluster, tmp_path) -> None:
    from pipeline.evaluate.finetune import run_finetune

    cpus = int(ray_cluster.cluster_resources()["CPU"])
    spec = FinetuneSpec(
        **{**_spec_args(tmp_path), "train": (LabelledTrack("a.wav", 0),), "num_workers": cpus}
    )
    with pytest.raises(ValueError, match=f"need {cpus + 1} CPUs"):
        run_finetune(spec)
    assert not (tmp_path / "checkpoints").exists()
