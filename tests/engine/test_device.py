"""The model stage's device side on CPU: staging and readback, batch size, SDPA kernel report,
torch.compile, and --precision auto on CPUs with bf16 units (drift of bf16 against fp32 on real clips)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from musicfm import MusicFM25Hz, MusicFMConfig, frame_pool
from pipeline.engine.device import (
    CPU_BF16_REFUSAL,
    CPU_DEFAULT_BATCH,
    CPU_FLAGS_ENV,
    auto_batch_size,
    batch_from_memory,
    compile_model,
    cpu_bf16_units,
    sdpa_backends,
)
from pipeline.engine.inference import EmbedSettings, WindowEmbedder, load_model, resolve_precision
from pipeline.engine.staging import Readback, Stager, pool_batch
from pipeline.io.audio import decode_audio
from tests.conftest import AUDIO, GOLDEN

CKPT, STATS = str(GOLDEN / "checkpoint.pt"), str(GOLDEN / "stats.json")
CLIPS = sorted((AUDIO / "clips").glob("*.*"))


@pytest.fixture(scope="module")
def golden() -> MusicFM25Hz:
    return load_model(CKPT, STATS, device="cpu")


@pytest.fixture(scope="module")
def decoded() -> dict[str, np.ndarray]:
    return {p.stem: decode_audio(p).samples for p in CLIPS}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# --------------------------------------------------------------------------- CPU bf16 units


XEON_FLAGS = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
ZEN4_FLAGS = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
OLD_FLAGS = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n"


def test_bf16_units_are_read_from_cpuinfo_flags() -> None:
    assert cpu_bf16_units(XEON_FLAGS) == ("amx_bf16", "avx512_bf16")
    assert cpu_bf16_units(ZEN4_FLAGS) == ("avx512_bf16",)
    assert cpu_bf16_units(OLD_FLAGS) == () and cpu_bf16_units("") == ()


def test_auto_precision_is_fp32_on_every_cpu_and_never_changes_explicit_choices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # bf16 on AMX is unmeasured (docs/sizing_decode.md): auto stays fp32 on a CPU that has it too
    for flags in ("fpu avx512_bf16 amx_bf16 amx_tile", "fpu avx512_bf16", "fpu avx2"):
        monkeypatch.setenv(CPU_FLAGS_ENV, flags)
        assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        resolve_precision("fp16", "cpu")


NO_BF16_UNITS = cpu_bf16_units() == ()
NEEDS_BF16_UNITS = pytest.mark.skipif(
    NO_BF16_UNITS,
    reason="this CPU has no bf16 units (AVX512-BF16 / AMX-BF16): bf16 runs on reference kernels "
    "(minutes), and the jobs refuse --precision bf16 here",
)


def test_bf16_is_refused_on_a_cpu_without_bf16_units(golden, monkeypatch) -> None:
    bf16 = EmbedSettings(layers=(1,), window_s=2, hop_s=2, precision="bf16")
    monkeypatch.setenv(CPU_FLAGS_ENV, "fpu sse avx2 avx512f")  # an AVX-512 CPU without BF16 (Zen 3, Ice Lake)
    assert cpu_bf16_units() == ()
    with pytest.raises(ValueError) as e:
        WindowEmbedder(golden, bf16)
    assert str(e.value) == CPU_BF16_REFUSAL and "\n" not in CPU_BF16_REFUSAL
    assert "--precision fp32" in CPU_BF16_REFUSAL
    WindowEmbedder(golden, EmbedSettings(layers=(1,), window_s=2, hop_s=2))  # fp32 runs anywhere
    WindowEmbedder(golden, bf16, allow_slow_bf16=True)  # a query of a bf16 store may
    for flags in ("fpu avx512_bf16", "fpu amx_bf16 amx_tile"):
        monkeypatch.setenv(CPU_FLAGS_ENV, flags)
        assert WindowEmbedder(golden, bf16).settings.precision == "bf16"


def test_bf16_pooled_vectors_stay_within_cosine_1e4_of_fp32_on_real_clips(golden, decoded) -> None:
    """Golden small model: every clip (its first 20 s as 10 s windows and a 100k-sample tail), all
    hidden states. Runs on every CPU (reference kernels where there are no bf16 units)."""
    layers = tuple(range(golden.config.encoder_depth + 1))
    worst = 1.0
    for x in decoded.values():
        head = x[:480_000]
        wins = [head[s : s + 240_000] for s in range(0, head.shape[0] - 240_000 + 1, 240_000)]
        wins.append(x[-100_000:])
        ref = WindowEmbedder(golden, EmbedSettings(layers=layers, window_s=10, hop_s=10)).embed(wins)
        low = WindowEmbedder(
            golden,
            EmbedSettings(layers=layers, window_s=10, hop_s=10, precision="bf16"),
            allow_slow_bf16=True,
        )
        for a, b in zip(ref, low.embed(wins), strict=True):
            for lay in layers:
                assert not np.array_equal(a.means[lay], b.means[lay]) or lay == 0  # bf16 really ran
                worst = min(worst, _cos(a.means[lay], b.means[lay]))
    assert worst >= 0.9999, worst


@NEEDS_BF16_UNITS
def test_bf16_full_size_model_stays_within_cosine_1e4_of_fp32(decoded) -> None:
    """Full-size config (D=1024, all 12 layers and their drift), random weights, 1 s (25 tokens)
    of three real clips: the width and depth of the released model at a few seconds of CPU."""
    model = MusicFM25Hz(MusicFMConfig(), seed=0).eval()
    layers = tuple(range(13))
    wins = [decoded[k][24_000:48_000] for k in ("hw_city", "fb_mainzik_2p", "lc_city_blues")]
    ref = WindowEmbedder(model, EmbedSettings(layers=layers, window_s=1, hop_s=1)).embed(wins)
    low = WindowEmbedder(model, EmbedSettings(layers=layers, window_s=1, hop_s=1, precision="bf16")).embed(
        wins
    )
    cos = [_cos(a.means[lay], b.means[lay]) for a, b in zip(ref, low, strict=True) for lay in layers]
    assert min(cos) >= 0.9999, min(cos)
    assert min(cos) < 1.0  # the two precisions differ: the test can see drift


# --------------------------------------------------------------------------- batch size


def test_batch_from_memory() -> None:
    gib = 2**30
    # 80 GiB free, 1 GiB a window: 0.8 * 80 = 64
    assert batch_from_memory(80 * gib, gib) == 64
    # rounded down to a multiple of 8 from 8 up
    assert batch_from_memory(80 * gib, 3 * gib // 2) == 40  # floor(64 / 1.5) = 42 -> 40
    assert batch_from_memory(10 * gib, gib) == 8
    assert batch_from_memory(8 * gib, gib) == 6  # below 8: as many as fit
    # fixed memory (weights' workspaces) comes off first; never below 1, never above the cap
    assert batch_from_memory(80 * gib, gib, fixed_bytes=32 * gib) == 32
    assert batch_from_memory(gib, 10 * gib) == 1
    assert batch_from_memory(10_000 * gib, 1, cap=256) == 256
    with pytest.raises(ValueError):
        batch_from_memory(gib, 0)


def test_batch_size_defaults_to_8_on_cpu(golden) -> None:
    assert auto_batch_size(golden, 240_000, "fp32", (1, 3)) == CPU_DEFAULT_BATCH == 8
    assert WindowEmbedder(golden, EmbedSettings(layers=(1, 3))).max_batch == 8
    assert WindowEmbedder(golden, EmbedSettings(layers=(1, 3)), max_batch=3).max_batch == 3
    with pytest.raises(ValueError, match="max_batch"):
        WindowEmbedder(golden, EmbedSettings(layers=(1, 3)), max_batch=0)


# --------------------------------------------------------------------------- staging and readback


def test_pool_batch_stacks_every_layer_in_one_tensor(golden, decoded) -> None:
    x = torch.from_numpy(np.stack([decoded["hw_city"][:48_000], decoded["hw_rock"][:48_000]]))
    with torch.inference_mode():
        hs = golden.hidden_states(x, [1, 3])  # 2 x (B, T, D)
        means = pool_batch(hs, None)
        both = pool_batch(hs, 7)
    t, d = hs[0].shape[1:]
    assert means.shape == (2, 2, d) and both.shape == (2, 2, 8, d)
    for k, h in enumerate(hs):
        assert torch.equal(means[k], h.mean(dim=1))
        assert torch.equal(both[k, :, 0], h.mean(dim=1))
        assert torch.equal(both[k, :, 1:], frame_pool(h, 7))
    back = Readback(both)
    assert back.done is None  # CPU: no copy, no event
    assert np.array_equal(back.result(), both.numpy())


def test_stager_on_cpu_stacks_once_and_copies_nothing(decoded) -> None:
    stager = Stager(torch.device("cpu"))
    assert stager.stream is None
    arrays = [decoded["hw_city"][:1000], decoded["hw_rock"][:1000].astype(np.float64)]
    host = stager.host_batch(arrays)
    assert host.shape == (2, 1000) and host.dtype == torch.float32 and not host.is_pinned()
    assert np.array_equal(host.numpy(), np.stack(arrays).astype(np.float32))
    staged = stager.to_device(host)
    assert staged.ready is None and stager.acquire(staged).data_ptr() == host.data_ptr()


def test_embedder_matches_direct_model_calls_bit_for_bit(golden, decoded) -> None:
    """Batches of equal lengths, in input order, pooled as before the one-copy readback."""
    x = decoded["hw_city"]
    wins = [x[s : s + 48_000] for s in range(0, 480_000, 48_000)] + [x[:30_000], x[5:30_005]]
    order = [0, 10, 1, 2, 11, 3, 4, 5, 6, 7, 8, 9]
    wins = [wins[i] for i in order]
    emb = WindowEmbedder(
        golden, EmbedSettings(layers=(3, 1), window_s=2, hop_s=2, frames_hz=4.0), max_batch=4
    )
    got = emb.embed(wins)
    assert emb.model_seconds > 0 and emb.device_seconds > 0
    # the embedder's batches: lengths 48000 in groups of 4, 4, 2 and the two 30000-sample windows
    full = [i for i, w in enumerate(wins) if w.shape[0] == 48_000]
    batches = [full[0:4], full[4:8], full[8:10], [i for i, w in enumerate(wins) if w.shape[0] == 30_000]]
    with torch.inference_mode():
        for idx in batches:
            hs = golden.hidden_states(torch.from_numpy(np.stack([wins[i] for i in idx])), [3, 1])
            for b, i in enumerate(idx):
                r = got[i]
                assert r.n_tokens == hs[0].shape[1]
                for k, lay in enumerate((3, 1)):
                    assert np.array_equal(r.means[lay], hs[k].mean(dim=1)[b].numpy())
                    nf = r.frames[lay].shape[0]
                    assert np.array_equal(r.frames[lay], frame_pool(hs[k], nf)[b].numpy())
                assert r.frame_times.shape == (nf,)


# --------------------------------------------------------------------------- SDPA, compile


def test_sdpa_backend_is_reported_from_the_kernels_that_ran(golden) -> None:
    used = sdpa_backends(golden, "fp32")
    # CPU: torch's flash kernel for CPU (never the unfused math path for this shape)
    assert used == {"flash_cpu"}, used
    assert sdpa_backends(golden, "bf16") == {"flash_cpu"}


def test_compile_option_keeps_settings_id_and_the_vectors(decoded) -> None:
    plain = EmbedSettings(layers=(1, 3), window_s=2, hop_s=2)
    compiled = EmbedSettings(layers=(1, 3), window_s=2, hop_s=2, compile=True)
    assert compiled.settings_id("m") == plain.settings_id("m") and compiled == plain
    model = load_model(CKPT, STATS, device="cpu")
    wins = [decoded["hw_city"][s : s + 48_000] for s in range(0, 192_000, 48_000)]
    ref = WindowEmbedder(model, plain).embed(wins)
    compile_model(model, backend="eager")  # dynamo graph capture, without code generation
    got = WindowEmbedder(model, plain).embed(wins)
    for a, b in zip(ref, got, strict=True):
        for lay in (1, 3):
            assert _cos(a.means[lay], b.means[lay]) >= 0.9999
            np.testing.assert_allclose(a.means[lay], b.means[lay], atol=1e-4)


@pytest.mark.slow
def test_compile_with_inductor_on_cpu(decoded) -> None:
    """``compile=True`` (inductor; ~80 s of code generation for the small model on 2 cores)."""
    model = load_model(CKPT, STATS, device="cpu")
    wins = [decoded["hw_city"][s : s + 48_000] for s in range(0, 192_000, 48_000)]
    ref = WindowEmbedder(model, EmbedSettings(layers=(1, 3), window_s=2, hop_s=2)).embed(wins)
    got = WindowEmbedder(model, EmbedSettings(layers=(1, 3), window_s=2, hop_s=2, compile=True)).embed(wins)
    for a, b in zip(ref, got, strict=True):
        for lay in (1, 3):
            assert _cos(a.means[lay], b.means[lay]) >= 0.9999


def test_compile_flag_is_parsed_by_both_jobs() -> None:
    import argparse

    from pipeline.cli import OneLineParser
    from pipeline.commands.run_flags import add_model_args

    p = OneLineParser(prog="x")
    add_model_args(p)
    assert p.parse_args(["--compile"]).compile is True and p.parse_args([]).compile is False
    assert isinstance(p, argparse.ArgumentParser)
