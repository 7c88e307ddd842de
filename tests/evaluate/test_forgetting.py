"""``jobs/evaluate.py --mode finetune --forgetting-task``: fine-tune the small random-weight golden
model on one rendered task (key on triad progressions, Ray Train, two CPU workers), then the
forgetting report — the shared linear probe's cross-validated accuracy of a hidden state on a
second task (genre = instrument on rendered phrases) for the base and the fine-tuned backbone —
lands in results.json and results.md, and its numbers equal a direct recomputation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.commands.evaluate import evaluate_main
from pipeline.evaluate.finetune_forgetting import (
    forgetting_tracks,
    paired_change_ci,
    probe_correct,
    track_features,
)
from pipeline.evaluate.tasks import get_task
from tests.conftest import GOLDEN
from tests.evaluate.conftest import MODEL_ARGS, PROBE_ARGS

LAYER = 2  # of the golden model's hidden states 0..3


def test_finetune_reports_forgetting_on_a_second_task(
    ray_cluster, triads: Path, timbre, tmp_path: Path
) -> None:
    out = tmp_path / "ft"
    argv = ["--task", "key", "--dataset", str(triads), *MODEL_ARGS, "--mode", "finetune", "--steps", "2",
            "--checkpoint-every", "2", "--workers", "2", "--finetune-layer", str(LAYER), "--forgetting-task", "genre",
            "--forgetting-dataset", str(timbre[0]), "--forgetting-layer", str(LAYER), "--output", str(out),
            *PROBE_ARGS]  # fmt: skip
    assert evaluate_main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    fo = res["forgetting"]
    finetuned = out / "finetune" / "finetuned.safetensors"
    assert fo["finetuned_model_id"] == res["model_id"] != fo["base_model_id"]

    tracks = forgetting_tracks("genre", str(timbre[0]))
    labels = np.array([t.label for t in tracks])
    window = get_task("genre").profile.window_s
    x_base, base_id = track_features(str(GOLDEN / "checkpoint.pt"), tracks, LAYER, str(GOLDEN / "stats.json"),
                                     str(GOLDEN / "config.json"), window)  # fmt: skip
    x_ft, ft_id = track_features(str(finetuned), tracks, LAYER, window_s=window)
    before, folds = probe_correct(x_base, labels)
    after, _ = probe_correct(x_ft, labels)
    assert (fo["base_model_id"], fo["finetuned_model_id"]) == (base_id, ft_id)
    assert (fo["task"], fo["layer"], fo["metric"], fo["folds"], fo["tracks"]) == (
        "genre", LAYER, "accuracy", folds, len(tracks))  # fmt: skip
    assert fo["before"] == pytest.approx(before.mean()) and fo["after"] == pytest.approx(after.mean())
    assert fo["delta"] == pytest.approx(after.mean() - before.mean())
    assert fo["delta_ci95"] == pytest.approx(list(paired_change_ci(before, after, 200)))
    md = (out / "results.md").read_text()
    assert (
        "## Forgetting" in md and f"{100 * fo['before']:.1f} %" in md and f"{100 * fo['after']:.1f} %" in md
    )


def test_forgetting_flags_are_checked_before_any_work(tmp_path: Path, capsys) -> None:
    base = ["--dataset", str(tmp_path), "--checkpoint", "random:0", "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        evaluate_main(["--task", "genre", *base, "--forgetting-task", "key"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().endswith("--forgetting-task needs --mode finetune")
    with pytest.raises(ValueError, match="genre or key, not beat"):
        forgetting_tracks("beat", str(tmp_path))
