"""The probe core on numpy arrays (``fit_probe``, ``cross_validate``, folds, metrics): the API the
track-level probes and frame-level evaluation share."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.insights.probe_metrics import bootstrap_ci, score
from pipeline.insights.probe_models import (
    FittedProbe,
    cross_validate,
    fit_linear,
    fit_probe,
    stratified_folds,
)
from pipeline.insights.probe_settings import FitSettings


def blobs(n: int, dim: int = 16, layers: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, layers, dim): the last layer around 3 centres (class i % 3), the others noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, layers, dim)).astype(np.float32)
    y = np.arange(n) % 3
    x[:, -1] += 2.0 * rng.standard_normal((3, dim)).astype(np.float32)[y]
    return x, y


def test_auto_picks_by_number_of_groups() -> None:
    x, y = blobs(120)
    s = FitSettings(linear_max_labels=100, max_epochs=20)
    assert fit_probe(x, y, "multiclass", settings=s).estimator == "mlp"
    groups = np.arange(120) // 4  # 30 tracks of 4 windows
    p = fit_probe(x, y // 1, "multiclass", groups=groups, settings=s)
    assert p.estimator == "linear" and p.info["groups"] == 30
    assert fit_probe(x[:, 0], y, "multiclass", settings=FitSettings()).estimator == "linear"  # (N, D) too


@pytest.mark.parametrize("estimator", ["linear", "mlp"])
def test_predict_shapes_and_roundtrip(estimator) -> None:
    x, y = blobs(150)
    p = fit_probe(x, y, "multiclass", settings=FitSettings(estimator=estimator, max_epochs=30))
    prob = p.predict_proba(x)
    assert prob.shape == (150, 3) and np.allclose(prob.sum(1), 1, atol=1e-5)
    assert np.mean(p.predict(x) == y) > 0.9
    assert len(p.layer_weights) == 2 and p.layer_weights[1] > p.layer_weights[0]
    again = FittedProbe.from_arrays(
        {"task": "multiclass", "estimator": estimator, "hidden": p.hidden}, p.arrays()
    )
    assert np.allclose(again.predict_proba(x), prob, atol=1e-6)


def test_linear_matches_sklearn_logistic_regression_when_wider_than_tall() -> None:
    """More features than rows: the fit runs in the rows' SVD coordinates; its probabilities equal
    scikit-learn's multinomial L2 logistic regression on the full standardised features."""
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(40, dim=60)  # 40 rows x 120 features
    p = fit_linear(x, y, "multiclass", 3, 0.5, FitSettings())
    z = ((x - x.mean(0)) / (x.std(0) + 1e-6)).reshape(40, -1)
    ref = LogisticRegression(C=0.5, class_weight="balanced", max_iter=5000, tol=1e-8).fit(z, y)
    assert np.allclose(p.predict_proba(x), ref.predict_proba(z), atol=2e-3)


def test_validation_split_given_and_refit() -> None:
    x, y = blobs(200)
    xv, yv = blobs(60, seed=1)
    s = FitSettings(estimator="mlp", max_epochs=40)
    p = fit_probe(x, y, "multiclass", validation=(xv, yv), settings=s)
    assert (
        p.info["refit"] and 1 <= p.info["epochs"] <= p.info["epochs_run"] <= 40 and p.info["val_groups"] == 60
    )
    lin = fit_probe(x, y, "multiclass", validation=(xv, yv), settings=FitSettings(estimator="linear"))
    assert lin.info["strength"] in FitSettings().c_grid


def test_regression_and_multilabel() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 1, 12)).astype(np.float32)
    w = rng.standard_normal((12, 2))
    y = x[:, 0] @ w * 5 + 100
    cv = cross_validate(x, y, "regression")
    assert score("regression", y, cv.oof)["r2"] > 0.95 and cv.estimator == "linear"
    tags = (x[:, 0] @ w > 0).astype(np.float32)
    p = fit_probe(x, tags, "multilabel")
    assert p.predict(x).shape == (300, 2) and np.mean(p.predict(x) == tags) > 0.9


def test_folds_keep_groups_and_singletons() -> None:
    strata = np.array([0] * 9 + [1] * 9 + [2] * 3)
    groups = np.repeat(np.arange(7), 3)  # groups of 3 rows; the last group is class 2 alone
    fold = stratified_folds(strata, 3, seed=0, groups=groups)
    for g in range(7):
        assert len(set(fold[groups == g])) == 1
    assert np.all(fold[strata == 2] == -1)
    cv = cross_validate(*blobs(30), "multiclass", groups=np.arange(30) // 2)
    assert all(len(set(cv.fold[np.arange(30) // 2 == g])) == 1 for g in range(15))


def test_metrics_equal_sklearn_and_bootstrap_brackets() -> None:
    from sklearn import metrics as skm

    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 4, 80), rng.random((80, 4))
    hat = p.argmax(1)
    m = score("multiclass", y, p)
    assert m["macro_f1"] == pytest.approx(
        skm.f1_score(y, hat, average="macro", labels=np.unique(np.concatenate([y, hat])))
    )
    yl, pl = (rng.random((80, 3)) > 0.6).astype(float), np.round(rng.random((80, 3)), 1)  # ties
    ml = score("multilabel", yl, pl)
    assert ml["roc_auc"] == pytest.approx(np.mean([skm.roc_auc_score(yl[:, j], pl[:, j]) for j in range(3)]))
    assert ml["average_precision"] == pytest.approx(
        np.mean([skm.average_precision_score(yl[:, j], pl[:, j]) for j in range(3)])
    )
    yr, pr = rng.random((80, 2)), rng.random((80, 2))
    assert score("regression", yr, pr)["r2"] == pytest.approx(skm.r2_score(yr, pr))
    lo, hi = bootstrap_ci("multiclass", y, p, n=300)["accuracy"]
    assert lo < m["accuracy"] < hi


def test_bad_input_one_line_errors() -> None:
    x, y = blobs(20)
    with pytest.raises(ValueError, match="must match"):
        fit_probe(x, y[:5], "multiclass")
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        fit_probe(bad, y, "multiclass")
    with pytest.raises(ValueError, match="estimator must be one of"):
        FitSettings(estimator="forest")
    with pytest.raises(ValueError, match=r"\(N, D\) or \(N, L, D\)"):
        fit_probe(np.zeros(5), np.zeros(5), "regression")


def test_format_1_probe_directory_still_loads(tmp_path) -> None:
    """A probe saved before the linear estimator existed (torch state of the MARBLE net, card
    without ``estimator`` / ``hidden``) loads as an MLP and predicts what its net computes."""
    import json

    import torch
    from safetensors.torch import save_file

    from pipeline.insights.probe_mlp import build_net
    from pipeline.insights.probes import Probe

    torch.manual_seed(0)
    net = build_net(2, 8, 3, 16, 0.2).eval()
    with torch.no_grad():
        net.layer_logits.copy_(torch.tensor([0.3, -0.2]))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "probe.safetensors"))
    card = {"format": 1, "name": "g", "task": "multiclass", "layers": [6, 12], "labels": ["a", "b", "c"],
            "dim": 8, "head": "mlp", "model_id": "m", "settings_id": "s", "settings": {"hidden": 16}}  # fmt: skip
    (tmp_path / "probe.json").write_text(json.dumps(card))
    p = Probe.load(str(tmp_path))
    x = np.random.default_rng(0).standard_normal((5, 2, 8)).astype(np.float32)
    with torch.no_grad():
        want = torch.softmax(net(torch.from_numpy(x)), 1).numpy()
    assert p.model.estimator == "mlp" and np.allclose(p.predict(x), want, atol=1e-6)


def test_a_layer_sweep_trains_one_head_per_layer_in_one_pass() -> None:
    """``head_layers``: head h reads only its layer (or the learned weights for -1), each keeps
    its own best epoch; the state round-trips through arrays; the linear estimator refuses it."""
    from pipeline.insights.probe_models import FittedProbe

    rng = np.random.default_rng(0)

    def planted(n: int) -> tuple[np.ndarray, np.ndarray]:  # layer 1 holds the class, layer 0 noise
        y = rng.integers(0, 3, n)
        x = rng.standard_normal((n, 2, 6)).astype(np.float32)
        x[:, 1, :3] += 4 * np.eye(3, dtype=np.float32)[y]
        return x, y

    (xt, yt), (xv, yv), (xs, ys) = planted(300), planted(100), planted(300)
    s = FitSettings(estimator="mlp", hidden=0, lr=1e-2, batch_size=64, max_epochs=30, refit=False)
    p = fit_probe(xt, yt, "multiclass", validation=(xv, yv), settings=s, head_layers=(0, 1, -1))
    prob = p.predict_proba(xs)
    assert prob.shape == (300, 3, 3) and np.allclose(prob.sum(-1), 1, atol=1e-5)
    acc = (prob.argmax(-1) == ys[:, None]).mean(0)
    assert acc[1] > 0.95 and acc[2] > 0.95 and acc[0] < 0.5, acc
    assert len(p.info["head_epochs"]) == 3 and len(p.info["best_val_loss"]) == 3
    assert int(np.argmax(p.layer_weights)) == 1
    again = FittedProbe.from_arrays({"task": "multiclass", "estimator": "mlp", "hidden": 0}, p.arrays())
    assert np.allclose(again.predict_proba(xs), prob, atol=1e-6)
    with pytest.raises(ValueError, match="mlp estimator"):
        fit_probe(xt, yt, "multiclass", settings=FitSettings(estimator="linear"), head_layers=(0, -1))
