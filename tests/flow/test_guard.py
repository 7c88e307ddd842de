"""The model stage's failure rules (pipeline/flow/guard.py) on the real small model, with faults
injected into its forward pass: a bad window is isolated, a fault of the system raises."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.engine.inference import EmbedSettings, WindowEmbedder, load_model
from pipeline.errors import ModelError, NonFiniteOutput
from pipeline.flow.guard import ModelGuard, check_finite_table
from tests.conftest import GOLDEN

POISON = 0.123456  # a window whose first sample is this value triggers the injected fault
SETTINGS = EmbedSettings(layers=(1, 3), window_s=2.0, hop_s=2.0)


@pytest.fixture(scope="module")
def model():
    return load_model("random:0", model_config=str(GOLDEN / "config.json"), device="cpu")


def windows(n: int, poisoned: tuple[int, ...] = ()) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = [(0.1 * rng.standard_normal(48000)).astype(np.float32) for _ in range(n)]
    for i in poisoned:
        out[i][0] = POISON
    return out


def inject(model, monkeypatch, fault):
    """Run ``fault(x)`` before the real forward pass of every model call (x: (B, N))."""
    real = model.hidden_states

    def hidden_states(x, layers, precision="fp32"):
        fault(x)
        hs = real(x, layers, precision=precision)
        return hs

    monkeypatch.setattr(model, "hidden_states", hidden_states)


def poisoned_rows(x) -> list[int]:
    return [b for b in range(x.shape[0]) if abs(float(x[b, 0]) - POISON) < 1e-6]


def test_one_bad_window_is_isolated_and_the_others_are_unchanged(model, monkeypatch) -> None:
    clean = WindowEmbedder(model, SETTINGS, max_batch=4).embed(windows(4, poisoned=(2,)))

    def fault(x):
        if poisoned_rows(x):
            raise RuntimeError("cannot compute this window")

    inject(model, monkeypatch, fault)
    guard = ModelGuard(WindowEmbedder(model, SETTINGS, max_batch=4))
    out = guard.run(windows(4, poisoned=(2,)))
    assert isinstance(out[2], RuntimeError) and "cannot compute" in str(out[2])
    for i in (0, 1, 3):
        for lay in SETTINGS.layers:
            np.testing.assert_allclose(out[i].means[lay], clean[i].means[lay], rtol=1e-5, atol=1e-6)


def test_a_batch_failing_the_same_way_alone_too_is_a_fault(model, monkeypatch) -> None:
    def fault(x):
        raise RuntimeError("weights do not fit")

    inject(model, monkeypatch, fault)
    with pytest.raises(ModelError, match="first 2 windows failed the same way"):
        ModelGuard(WindowEmbedder(model, SETTINGS, max_batch=4)).run(windows(3))
    guard = ModelGuard(WindowEmbedder(model, SETTINGS, max_batch=4))
    monkeypatch.undo()
    guard.run(windows(1))  # once the actor has computed a window, one batch failing whole is a fault too
    inject(model, monkeypatch, fault)
    with pytest.raises(ModelError, match="every window of a batch of 3 failed, alone too"):
        guard.run(windows(3))


def test_windows_failing_one_after_the_other_are_a_fault(model, monkeypatch) -> None:
    calls = []

    def fault(x):
        calls.append(x.shape[0])
        raise RuntimeError(f"failure {len(calls)}")  # a different message each time

    inject(model, monkeypatch, fault)
    guard = ModelGuard(WindowEmbedder(model, SETTINGS, max_batch=1))
    for _ in range(7):
        assert isinstance(guard.run(windows(1))[0], RuntimeError)
    with pytest.raises(ModelError, match="8 windows in a row"):
        guard.run(windows(1))


def test_a_bug_in_our_code_stops_at_once(model, monkeypatch) -> None:
    def fault(x):
        raise TypeError("unsupported operand")

    inject(model, monkeypatch, fault)
    with pytest.raises(ModelError, match="bug: TypeError: unsupported operand"):
        ModelGuard(WindowEmbedder(model, SETTINGS, max_batch=4)).run(windows(2))


def test_a_device_fault_stops_at_once(model, monkeypatch) -> None:
    def fault(x):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    inject(model, monkeypatch, fault)
    with pytest.raises(ModelError, match="device fault"):
        ModelGuard(WindowEmbedder(model, SETTINGS, max_batch=4)).run(windows(1))


def test_out_of_memory_retries_at_a_smaller_batch_first(model, monkeypatch) -> None:
    sizes = []

    def fault(x):
        sizes.append(int(x.shape[0]))
        if x.shape[0] > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    inject(model, monkeypatch, fault)
    emb = WindowEmbedder(model, SETTINGS, max_batch=8)
    out = ModelGuard(emb).run(windows(6))
    assert all(not isinstance(o, BaseException) for o in out)
    assert sizes == [6, 3, 3] and emb.max_batch == 3  # 6 windows fail, then two batches of 3 (half)


def test_out_of_memory_at_one_window_is_a_fault(model, monkeypatch) -> None:
    def fault(x):
        raise RuntimeError("CUDA out of memory")

    inject(model, monkeypatch, fault)
    with pytest.raises(ModelError, match="out of memory with one window per model call"):
        ModelGuard(WindowEmbedder(model, SETTINGS, max_batch=4)).run(windows(2))


def nan_for_poisoned(model, monkeypatch) -> None:
    real = model.hidden_states

    def hidden_states(x, layers, precision="fp32"):
        hs = real(x, layers, precision=precision)
        for b in poisoned_rows(x):
            for h in hs:
                h[b, 0, 0] = float("nan")
        return hs

    monkeypatch.setattr(model, "hidden_states", hidden_states)


def test_a_non_finite_window_is_an_error_and_most_non_finite_is_a_fault(model, monkeypatch) -> None:
    nan_for_poisoned(model, monkeypatch)
    guard = ModelGuard(WindowEmbedder(model, SETTINGS, max_batch=4))
    out = guard.run(windows(4, poisoned=(1,)))
    assert isinstance(out[1], NonFiniteOutput) and "NaN/Inf" in str(out[1])
    assert [isinstance(o, BaseException) for o in out] == [False, True, False, False]
    with pytest.raises(ModelError, match=r"NaN/Inf for \d+ of \d+ windows"):
        guard.run(windows(4, poisoned=(0, 1, 2, 3)))


def test_the_writers_last_check_refuses_non_finite_vectors() -> None:
    ok = pa.table({"layer_1": pa.FixedSizeListArray.from_arrays(pa.array([0.0, 1.0], pa.float32()), 2)})
    check_finite_table(ok, "windows")
    bad = pa.table({"layer_1": pa.FixedSizeListArray.from_arrays(pa.array([0.0, np.inf], pa.float32()), 2)})
    with pytest.raises(ModelError, match=r"windows\.layer_1"):
        check_finite_table(bad, "windows")
