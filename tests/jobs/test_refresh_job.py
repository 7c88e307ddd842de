"""jobs/refresh_catalog.py: flags, dry run, JSON logs, run records and exit codes.

These need no model pass (dry runs and catalogs whose objects are all missing), so they run
without Ray. The embedding paths, crash recovery, SIGKILL and concurrent runs are covered by
tests/runs/test_refresh.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import lance
import pytest

from jobs.refresh_catalog import EXIT_ERROR_RATE, EXIT_LOCKED, build_parser, main
from pipeline.store.lease import StoreLock
from pipeline.store.tables import Store
from tests.conftest import GOLDEN
from tools.testkit.stores import write_catalog, write_tone

MODEL = ["--checkpoint", str(GOLDEN / "checkpoint.pt"), "--stats", str(GOLDEN / "stats.json"), "--layers", "1,3",
         "--precision", "fp32", "--window-s", "1", "--no-progress"]  # fmt: skip


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_flags_and_defaults() -> None:
    p = build_parser()
    a = p.parse_args(["--catalog", "c.csv", "--store", "s"])
    assert (a.chunk_size, a.retention_days, a.delete_missing, a.dry_run) == (1000, 7.0, True, False)
    assert (a.max_error_rate, a.log_format, a.layers, a.lock_wait_s) == (0.5, "text", (7, 12), 0.0)
    assert p.parse_args(["--catalog", "c", "--store", "s", "--keep-missing"]).delete_missing is False
    a = p.parse_args(["--catalog", "c", "--store", "s", "--chunk-size", "5", "--retention-days", "0",
                      "--window-s", "10", "--hop-s", "5", "--frames-hz", "5", "--batch-size", "4"])  # fmt: skip
    assert (a.chunk_size, a.retention_days, a.window_s, a.hop_s, a.frames_hz, a.batch_size) == (
        5,
        0,
        10,
        5,
        5,
        4,
    )
    for bad in (["--keep-missing", "--delete-missing"], ["--chunk-size", "0"], ["--retention-days", "-1"],
                ["--max-error-rate", "2"], ["--max-delete-fraction", "1.5"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            p.parse_args(["--catalog", "c", "--store", "s", *bad])
        assert e.value.code == 2
    with pytest.raises(SystemExit):
        p.parse_args(["--catalog", "c"])  # --store is required


def test_dry_run_prints_the_plan_logs_json_and_writes_nothing(tmp_path: Path, capsys) -> None:
    audio = tmp_path / "audio"
    audio.mkdir()
    rows = [("x1", write_tone(audio / "x1.wav", 1.0, 300.0), "X1"), ("x2", write_tone(audio / "x2.flac", 1.5, 400.0), "X2"),
            ("gone", str(audio / "gone.ogg"), "Missing")]  # fmt: skip
    cat = write_catalog(tmp_path / "cat.csv", rows)
    store = tmp_path / "store"
    args = ["--catalog", cat, "--store", str(store), "--dry-run", "--log-format", "json", *MODEL]
    assert main(args) == 0
    out, err = capsys.readouterr()
    # tracks not in the store are new whatever their object's version: no request is made for
    # them (a missing object becomes a fetch error row when the run fetches it)
    assert "dry run: nothing written" in out and "new 3" in out and "x1, x2, gone" in out
    events = _json_lines(err)
    plan = next(e for e in events if e["step"] == "plan")
    assert plan["new"] == 3 and plan["lookup_failed"] == 0 and plan["dry_run"] is True and plan["run_id"]
    assert not store.exists()
    capsys.readouterr()


def test_failed_lookups_exit_3_with_a_run_record_and_a_lock_exits_4(tmp_path: Path, capsys) -> None:
    cat = write_catalog(
        tmp_path / "cat.csv", [("m1", str(tmp_path / "m1.wav"), "M"), ("m2", str(tmp_path / "m2.wav"), "M")]
    )
    store = tmp_path / "store"
    args = [
        "--catalog",
        cat,
        "--store",
        str(store),
        "--max-error-rate",
        "0.5",
        "--log-format",
        "json",
        *MODEL,
    ]

    holder = StoreLock(Store(str(store)), "someone-else", ttl_s=60).acquire()
    try:
        assert main(args) == EXIT_LOCKED
        err = capsys.readouterr().err
        assert "locked" in err and "someone-else" in err
        assert not (store / "runs.lance").exists()
    finally:
        holder.release()

    assert main(args) == EXIT_ERROR_RATE  # both objects are missing: two fetch errors, rate 1 > 0.5
    out, err = capsys.readouterr()
    assert "failed 2" in out
    done = next(e for e in _json_lines(err) if e["step"] == "refresh finished")
    assert done["status"] == "failed" and done["new"] == 2 and done["failed"] == 2 and "stage_s" in done
    run = lance.dataset(str(store / "runs.lance")).to_table().to_pylist()[-1]
    assert run["run_id"] == done["run_id"] and run["kind"] == "refresh" and run["status"] == "failed"
    assert json.loads(run["report_json"])["plan"]["new"] == 2
    errs = lance.dataset(str(store / "errors.lance")).to_table().to_pylist()
    assert {e["track_id"] for e in errs} == {"m1", "m2"} and {e["stage"] for e in errs} == {"fetch"}
    assert StoreLock(Store(str(store)), "probe").holder() is None  # released after the run


def test_parquet_stores_are_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--catalog", "c.csv", "--store", str(tmp_path / "s"), "--format", "parquet"])
    assert e.value.code == 2 and "Lance" in capsys.readouterr().err
