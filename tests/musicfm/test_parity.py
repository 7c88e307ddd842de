"""Golden parity: hidden states and mel match the official implementation (shared/golden)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from musicfm import MusicFM25Hz, MusicFMConfig
from tests.conftest import GOLDEN

CASES = ["case_8s_b2", "case_odd_b1", "case_2s_b1"]
ATOL = 1e-4


@pytest.fixture(scope="module", params=["checkpoint.pt", "checkpoint_legacy_keys.pt"])
def golden_model(request) -> MusicFM25Hz:
    return MusicFM25Hz.from_checkpoint(GOLDEN / request.param, GOLDEN / "stats.json")


def test_config_inferred_from_shapes(golden_model: MusicFM25Hz) -> None:
    ref = MusicFMConfig.from_json(GOLDEN / "config.json")
    assert golden_model.config == ref


@pytest.mark.parametrize("case", CASES)
def test_hidden_states_match_official(golden_model: MusicFM25Hz, case: str) -> None:
    z = np.load(GOLDEN / f"{case}.npz")
    with torch.inference_mode():
        mel = golden_model.mel(torch.from_numpy(z["wav"])).numpy()
        hs = golden_model.hidden_states(torch.from_numpy(z["wav"]))
        db = golden_model.mel_frontend.db(torch.from_numpy(z["wav"])).numpy()
    np.testing.assert_allclose(db, z["mel_db"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(mel, z["mel_norm"], rtol=0, atol=ATOL)
    exp = z["hidden_states"]
    assert len(hs) == exp.shape[0] == golden_model.config.encoder_depth + 1
    for i, h in enumerate(hs):
        assert h.dtype == torch.float32 and tuple(h.shape) == exp[i].shape
        err = float(np.abs(h.numpy().astype(np.float64) - exp[i]).max())
        assert err <= ATOL, f"{case} layer {i}: max abs err {err:.3e}"


def test_check_parity_script_passes(golden_model: MusicFM25Hz) -> None:
    """The golden set's own checker agrees (independent code path)."""
    import sys

    sys.path.insert(0, str(GOLDEN))
    try:
        from check_parity import check_callable
    finally:
        sys.path.remove(str(GOLDEN))
    with torch.inference_mode():
        ok, worst = check_callable(golden_model.hidden_states, golden_model.mel)
    assert ok, worst


def test_decoy_stats_keys_are_ignored(golden_model: MusicFM25Hz) -> None:
    stats = json.loads((GOLDEN / "stats.json").read_text())
    assert golden_model.mel_mean == stats["melspec_2048_mean"]
    assert golden_model.mel_std == stats["melspec_2048_std"]


def test_get_latent_matches_hidden_states(golden_model: MusicFM25Hz) -> None:
    wav = torch.from_numpy(np.load(GOLDEN / "case_odd_b1.npz")["wav"])
    with torch.inference_mode():
        full = golden_model.hidden_states(wav)
        for i in range(len(full)):
            assert torch.equal(golden_model.get_latent(wav, layer_ix=i), full[i])
