"""Checkpoint loading: key maps, strict errors, unsafe pickles, safetensors, full-size layout."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from musicfm import CheckpointError, MusicFM25Hz, MusicFMConfig
from musicfm.checkpoint import official_key_map
from tests.conftest import GOLDEN, REPO

STATS = GOLDEN / "stats.json"


def _golden_sd() -> dict[str, torch.Tensor]:
    return torch.load(GOLDEN / "checkpoint.pt", map_location="cpu", weights_only=True)["state_dict"]


def _save(tmp_path, sd, name="ck.pt"):
    p = tmp_path / name
    torch.save({"state_dict": sd}, p)
    return p


def test_both_key_styles_load_to_identical_tensors() -> None:
    a = MusicFM25Hz.from_checkpoint(GOLDEN / "checkpoint.pt", STATS)
    b = MusicFM25Hz.from_checkpoint(GOLDEN / "checkpoint_legacy_keys.pt", STATS)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_missing_key_listed(tmp_path) -> None:
    sd = _golden_sd()
    del sd["model.conformer.layers.1.self_attn.linear_q.weight"]
    del sd["model.conv.linear.bias"]
    with pytest.raises(CheckpointError) as e:
        MusicFM25Hz.from_checkpoint(_save(tmp_path, sd), STATS)
    msg = str(e.value)
    assert "missing keys (2)" in msg
    assert "model.conformer.layers.1.self_attn.linear_q.weight" in msg and "model.conv.linear.bias" in msg


def test_unexpected_key_listed(tmp_path) -> None:
    sd = _golden_sd()
    sd["model.conformer.layers.0.extra_adapter.weight"] = torch.zeros(3)
    with pytest.raises(
        CheckpointError, match=r"unexpected keys \(1\): model.conformer.layers.0.extra_adapter.weight"
    ):
        MusicFM25Hz.from_checkpoint(_save(tmp_path, sd), STATS)


def test_wrong_shape_listed_with_both_shapes(tmp_path) -> None:
    sd = _golden_sd()
    sd["model.conformer.layers.2.ffn2.output_dense.bias"] = torch.zeros(47)
    cfg = MusicFMConfig.from_json(GOLDEN / "config.json")
    with pytest.raises(
        CheckpointError,
        match=r"wrong shapes \(1\).*ffn2.output_dense.bias: checkpoint \(47,\) vs model \(48,\)",
    ):
        MusicFM25Hz.from_checkpoint(_save(tmp_path, sd), STATS, config=cfg)


def test_every_problem_reported_at_once(tmp_path) -> None:
    sd = _golden_sd()
    del sd["model.conformer.layer_norm.weight"]
    sd["model.bogus"] = torch.zeros(1)
    sd["model.conformer.layers.0.attn_fake"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        MusicFM25Hz.from_checkpoint(_save(tmp_path, sd), STATS, config=GOLDEN / "config.json")
    assert "missing keys (1)" in str(e.value) and "unexpected keys (2)" in str(e.value)


def test_missing_prefix_is_refused(tmp_path) -> None:
    sd = {k[len("model.") :]: v for k, v in _golden_sd().items()}
    with pytest.raises(CheckpointError, match="lack the 'model.' prefix"):
        MusicFM25Hz.from_checkpoint(_save(tmp_path, sd), STATS)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_pickle_is_refused(tmp_path) -> None:
    p = tmp_path / "evil.pt"
    torch.save({"state_dict": _golden_sd(), "payload": _Evil()}, p)
    with pytest.raises(CheckpointError, match="refused to load.*weights_only=True"):
        MusicFM25Hz.from_checkpoint(p, STATS)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match="refused|not a readable"):
        MusicFM25Hz.from_checkpoint(raw, STATS)


def test_stats_errors(tmp_path) -> None:
    bad = tmp_path / "stats.json"
    bad.write_text(json.dumps({"melspec_1024_mean": 1.0, "melspec_1024_std": 2.0}))
    with pytest.raises(CheckpointError, match="missing stats keys melspec_2048_mean, melspec_2048_std"):
        MusicFM25Hz.from_checkpoint(GOLDEN / "checkpoint.pt", bad)
    bad.write_text(json.dumps({"melspec_2048_mean": 1.0, "melspec_2048_std": 0.0}))
    with pytest.raises(CheckpointError, match="positive std"):
        MusicFM25Hz.from_checkpoint(GOLDEN / "checkpoint.pt", bad)
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read stats JSON"):
        MusicFM25Hz.from_checkpoint(GOLDEN / "checkpoint.pt", bad)
    with pytest.raises(CheckpointError, match="needs its stats JSON"):
        MusicFM25Hz.from_checkpoint(GOLDEN / "checkpoint.pt", None)


def test_not_a_checkpoint(tmp_path) -> None:
    p = tmp_path / "x.pt"
    p.write_bytes(b"hello")
    with pytest.raises(CheckpointError):
        MusicFM25Hz.from_checkpoint(p, STATS)
    with pytest.raises(CheckpointError, match="not found"):
        MusicFM25Hz.from_checkpoint(tmp_path / "nope.pt", STATS)


def test_safetensors_round_trip_via_cli(tmp_path) -> None:
    out = tmp_path / "m.safetensors"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "musicfm.convert",
            str(GOLDEN / "checkpoint_legacy_keys.pt"),
            str(out),
            "--stats",
            str(STATS),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    a = MusicFM25Hz.from_checkpoint(GOLDEN / "checkpoint.pt", STATS)
    b = MusicFM25Hz.from_checkpoint(out)  # stats and config carried in the file
    assert b.config == a.config and b.mel_mean == a.mel_mean and b.mel_std == a.mel_std
    assert a.model_id == b.model_id
    wav = torch.from_numpy(np.load(GOLDEN / "case_odd_b1.npz")["wav"])
    with torch.inference_mode():
        for x, y in zip(a.hidden_states(wav), b.hidden_states(wav), strict=True):
            assert torch.equal(x, y)
    r = subprocess.run(
        [sys.executable, "-m", "musicfm.convert", str(GOLDEN / "checkpoint.pt"), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 1 and "stats" in r.stderr and "Traceback" not in r.stderr


def test_safetensors_from_elsewhere_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    p = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(CheckpointError, match="not written by musicfm.convert"):
        MusicFM25Hz.from_checkpoint(p, STATS)


def _full_size_sd(style: str) -> dict[str, torch.Tensor]:
    spec = json.loads((GOLDEN / "full_size_keys.json").read_text())
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for e in spec[style]:
        dtype = getattr(torch, e["dtype"])
        if dtype.is_floating_point:
            t = torch.empty(e["shape"], dtype=dtype)
            t.normal_(0, 0.02, generator=gen) if t.numel() < 20_000_000 else t.zero_()
        else:
            t = torch.full(e["shape"], 1000, dtype=dtype)
        sd[e["key"]] = t
    return sd


@pytest.mark.parametrize("style", ["parametrized", "legacy"])
def test_full_size_layout_loads_strictly(tmp_path, style: str) -> None:
    """A random state dict with every key/shape/dtype of the released checkpoints loads strictly."""
    sd = _full_size_sd(style)
    cfg = MusicFMConfig()
    assert set(official_key_map(cfg)) <= {k[len("model.") :] for k in sd}
    p = _save(tmp_path, sd)
    del sd
    model = MusicFM25Hz.from_checkpoint(p, {"melspec_2048_mean": 6.77, "melspec_2048_std": 18.4})
    assert model.config == cfg
    needed = sum(v.numel() for k, v in model.named_parameters())
    assert needed == 316_343_296  # exactly the parameters the hidden states need


def test_random_weights_stay_labelled_through_safetensors(tmp_path) -> None:
    from musicfm.checkpoint import save_safetensors

    cfg = MusicFMConfig.from_json(GOLDEN / "config.json")
    rnd = MusicFM25Hz(cfg, seed=5)
    save_safetensors(rnd, tmp_path / "r.safetensors")
    back = MusicFM25Hz.from_checkpoint(tmp_path / "r.safetensors")
    assert back.is_random and back.model_id == rnd.model_id and back.model_id.startswith("random-")
