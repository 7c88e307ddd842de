"""Shapes, layer subsets, determinism, RNG hygiene, precision and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from musicfm import MusicFM25Hz, MusicFMConfig
from tests.conftest import GOLDEN


@pytest.fixture(scope="module")
def model() -> MusicFM25Hz:
    return MusicFM25Hz.from_checkpoint(GOLDEN / "checkpoint.pt", GOLDEN / "stats.json")


@pytest.mark.parametrize("n", [1025, 1200, 48000, 50017, 79321, 120000, 192001])
def test_shape_arithmetic(model: MusicFM25Hz, n: int) -> None:
    wav = torch.randn(2, n, generator=torch.Generator().manual_seed(n)) * 0.1
    t_mel = n // 240
    t = math.ceil(math.ceil(t_mel / 2) / 2)
    assert model.config.num_tokens(n) == t
    with torch.inference_mode():
        assert tuple(model.mel(wav).shape) == (2, 128, t_mel)
        hs = model.hidden_states(wav)
    assert len(hs) == model.config.encoder_depth + 1
    assert all(tuple(h.shape) == (2, t, model.config.encoder_dim) for h in hs)


def test_spec_table_full_size_shapes() -> None:
    cfg = MusicFMConfig()
    assert [cfg.num_tokens(n) for n in (720000, 120000, 48000, 79321)] == [750, 125, 50, 83]
    assert cfg.min_samples == 1025 and cfg.mel_bins_after_conv == 32


def test_too_short_input_is_a_clear_error(model: MusicFM25Hz) -> None:
    with pytest.raises(ValueError, match="at least 1025 samples"):
        model.hidden_states(torch.zeros(1, 1024))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        model.hidden_states(torch.zeros(4800))
    with pytest.raises(ValueError, match="floating point"):
        model.hidden_states(torch.zeros(1, 4800, dtype=torch.int16))


def test_layer_subset_equals_full_run_and_keeps_order(model: MusicFM25Hz) -> None:
    wav = torch.from_numpy(np.load(GOLDEN / "case_odd_b1.npz")["wav"])
    with torch.inference_mode():
        full = model.hidden_states(wav)
        sub = model.hidden_states(wav, layers=[2, 0, 3])
    assert torch.equal(sub[0], full[2]) and torch.equal(sub[1], full[0]) and torch.equal(sub[2], full[3])
    with pytest.raises(ValueError, match="out of range"):
        model.hidden_states(wav, layers=[4])


def test_layers_past_the_deepest_are_not_computed(model: MusicFM25Hz) -> None:
    calls: list[int] = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o, ix=ix: calls.append(ix))
        for ix, layer in enumerate(model.encoder.layers)
    ]
    try:
        with torch.inference_mode():
            model.hidden_states(torch.randn(1, 9600) * 0.1, layers=[1])
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0]


def test_deterministic(model: MusicFM25Hz) -> None:
    wav = torch.randn(1, 24000, generator=torch.Generator().manual_seed(3)) * 0.3
    with torch.inference_mode():
        a = model.hidden_states(wav)
        b = model.hidden_states(wav)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_batch_items_independent(model: MusicFM25Hz) -> None:
    wav = torch.randn(3, 24000, generator=torch.Generator().manual_seed(5)) * 0.3
    with torch.inference_mode():
        batched = model.hidden_states(wav, layers=[3])[0]
        single = model.hidden_states(wav[1:2], layers=[3])[0]
    torch.testing.assert_close(batched[1:2], single, rtol=0, atol=1e-5)


def test_construction_does_not_touch_global_rng() -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state().clone()
    a = MusicFM25Hz(MusicFMConfig.from_json(GOLDEN / "config.json"), seed=3)
    MusicFM25Hz.from_checkpoint(GOLDEN / "checkpoint.pt", GOLDEN / "stats.json")
    assert torch.equal(torch.get_rng_state(), before)
    b = MusicFM25Hz(MusicFMConfig.from_json(GOLDEN / "config.json"), seed=3)
    assert a.model_id == b.model_id and a.model_id.startswith("random-")
    c = MusicFM25Hz(MusicFMConfig.from_json(GOLDEN / "config.json"), seed=4)
    assert c.model_id != a.model_id


def test_random_model_buffers_match_checkpoint_buffers() -> None:
    """Freshly computed window / filterbank / inv_freq equal the official ones stored in the checkpoint."""
    fresh = MusicFM25Hz(MusicFMConfig.from_json(GOLDEN / "config.json"))
    loaded = MusicFM25Hz.from_checkpoint(GOLDEN / "checkpoint.pt", GOLDEN / "stats.json")
    for name in ("mel_frontend.window", "mel_frontend.fb", "encoder.inv_freq"):
        assert torch.equal(fresh.state_dict()[name], loaded.state_dict()[name]), name


def test_model_id_stable_and_weight_sensitive() -> None:
    a = MusicFM25Hz.from_checkpoint(GOLDEN / "checkpoint.pt", GOLDEN / "stats.json")
    b = MusicFM25Hz.from_checkpoint(GOLDEN / "checkpoint_legacy_keys.pt", GOLDEN / "stats.json")
    assert a.model_id == b.model_id and a.model_id.startswith("musicfm-")
    with torch.no_grad():
        b.encoder.layers[0].attn.q.weight[0, 0] += 1e-3
    b._invalidate_id()
    assert a.model_id != b.model_id


def test_bf16_cpu_drift_is_small(model: MusicFM25Hz) -> None:
    wav = torch.from_numpy(np.load(GOLDEN / "case_8s_b2.npz")["wav"])
    with torch.inference_mode():
        ref = model.hidden_states(wav)
        low = model.hidden_states(wav, precision="bf16")
    for i, (r, lo) in enumerate(zip(ref, low, strict=True)):
        assert lo.dtype == torch.float32
        rel = float((lo - r).norm() / r.norm())
        assert rel < 0.05, f"layer {i}: relative drift {rel:.3f}"
    with pytest.raises(ValueError, match="CUDA only"):
        model.hidden_states(wav, precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        model.hidden_states(wav, precision="int8")


def test_mel_stays_fp32_under_autocast(model: MusicFM25Hz) -> None:
    wav = torch.from_numpy(np.load(GOLDEN / "case_odd_b1.npz")["wav"])
    with torch.inference_mode():
        ref = model.mel(wav)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model.mel(wav)
    assert got.dtype == torch.float32 and torch.equal(got, ref)


def test_config_json_round_trip_and_validation(tmp_path) -> None:
    cfg = MusicFMConfig.from_json(GOLDEN / "config.json")
    p = tmp_path / "c.json"
    p.write_text(cfg.to_json())
    assert MusicFMConfig.from_json(p) == cfg
    p.write_text('{"encoder_dim": 64}')
    assert MusicFMConfig.from_json(p).encoder_depth == 12  # missing keys take defaults
    p.write_text('{"encoder_dimm": 64}')
    with pytest.raises(ValueError, match="unknown MusicFMConfig keys: encoder_dimm"):
        MusicFMConfig.from_json(p)
    with pytest.raises(ValueError, match="not divisible"):
        MusicFMConfig(encoder_dim=50, num_heads=4)


@pytest.mark.parametrize(("b", "n"), [(1, 1025), (3, 79321), (2, 720000), (300, 4800)])
def test_cpu_mel_equals_one_stft_over_the_batch(model: MusicFM25Hz, b: int, n: int) -> None:
    """The CPU front end (frames in cache-sized steps, re^2 + im^2) gives the float32 values of a
    plain float64 ``torch.stft`` of the whole batch, for one frame, odd lengths and batches larger
    than the frames per step."""
    fe = model.mel_frontend
    wav = torch.from_numpy(np.random.default_rng(n).standard_normal((b, n)).astype(np.float32) * 0.3)
    with torch.inference_mode():
        z = torch.stft(
            wav.double(),
            fe.n_fft,
            fe.hop_length,
            window=fe.window.double(),
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )  # (B, K, F + 1)
        mel = torch.matmul(z.abs().pow(2.0).transpose(-1, -2), fe.fb.double()).transpose(-1, -2)
        ref = (10.0 * torch.log10(torch.clamp(mel, min=1e-10)))[..., :-1].float()
        got = fe.db(wav)
    assert got.shape == ref.shape == (b, 128, n // fe.hop_length) and got.is_contiguous()
    assert (got - ref).abs().max().item() <= 1e-5
