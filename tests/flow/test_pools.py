"""Actor pool sizes: ``N`` or ``MIN:MAX`` from the command line, bounded by the work, and the
pools of a real run never grow past their maximum."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pipeline.cli import pool_size
from pipeline.flow.runtime import pool_bounds
from pipeline.runs.commands import embed_parser
from pipeline.runs.embed import run_embed
from pipeline.runs.settings import embed_job_from_args
from tools.testkit.stores import CKPT, STATS, write_catalog, write_tone


@pytest.mark.parametrize(("text", "want"), [("3", (3, 3)), ("1:4", (1, 4)), ("2:2", (2, 2))])
def test_pool_size_parses(text: str, want: tuple[int, int]) -> None:
    assert pool_size(text) == want


@pytest.mark.parametrize("text", ["0", "4:1", "a:b", "1:2:3", "", "-1:2"])
def test_pool_size_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="MIN:MAX"):
        pool_size(text)


def test_pool_bounds_follow_the_work() -> None:
    assert pool_bounds(None, 4, 100) == (4, 4)  # fixed
    assert pool_bounds(1, 4, 100) == (1, 4)  # autoscaling
    assert pool_bounds(2, 8, 3) == (2, 3)  # a small run does not start every actor
    assert pool_bounds(None, 8, 0) == (1, 1)


def test_flags_reach_the_job(capsys) -> None:
    args = embed_parser().parse_args(
        [
            "--catalog",
            "c.csv",
            "--output",
            "o",
            "--decode-cpus",
            "1:3",
            "--gpu-actors",
            "2",
            "--min-duration-s",
            "0.5",
        ]
    )
    job = embed_job_from_args(args)
    assert (job.decode_cpus_min, job.decode_cpus, job.gpu_actors_min, job.gpu_actors) == (1, 3, 2, 2)
    assert job.limits.min_samples == 12000
    with pytest.raises(SystemExit) as e:
        embed_parser().parse_args(["--catalog", "c", "--output", "o", "--decode-cpus", "3:1"])
    assert e.value.code == 2 and "MIN:MAX" in capsys.readouterr().err


def test_autoscaling_pool_stays_within_its_bounds(ray_cluster, tmp_path: Path) -> None:
    audio = tmp_path / "a"
    audio.mkdir()
    rows = [(f"t{i}", write_tone(audio / f"t{i}.wav", 1.5, 200 + 40 * i), f"T{i}") for i in range(6)]
    rows.append(("tiny", write_tone(audio / "tiny.wav", 0.2, 300), "tiny"))
    cat = write_catalog(tmp_path / "c.csv", rows)
    args = embed_parser().parse_args(
        ["--catalog", cat, "--output", str(tmp_path / "s"), "--checkpoint", CKPT, "--stats", STATS,
         "--layers", "1,3", "--precision", "fp32", "--window-s", "1", "--decode-cpus", "1:2",
         "--gpu-actors", "1:1", "--min-duration-s", "0.5", "--chunk-size", "3"]
    )  # fmt: skip
    report = run_embed(embed_job_from_args(args), progress=False, chunk_size=args.chunk_size)
    assert report.status == "ok" and report.tracks_ok == 6 and report.chunks >= 2
    assert 1 <= report.extra["actors"]["decode"] <= 2 and report.extra["actors"]["model"] == 1
    assert report.errors_by_type == {"TooShortError": 1}  # 0.2 s < --min-duration-s 0.5


def test_cpu_model_plan_without_gpus(monkeypatch) -> None:
    """One single-threaded model actor per core (at most 4) by default; decoders are niced only
    below a multi-threaded model actor."""
    from pipeline.flow import runtime

    monkeypatch.setattr(runtime, "largest_node_cpus", lambda: 2)
    assert runtime.default_cpu_model_actors() == 2
    plan = runtime.cpu_model_plan(decode_cpus=2, model_actors=2)
    assert (plan.reserve, plan.threads, plan.decode_niceness) == (0, 1, 0)
    plan = runtime.cpu_model_plan(decode_cpus=1, model_actors=1)  # --gpu-actors 1: two threads
    assert (plan.reserve, plan.threads, plan.decode_niceness) == (1, 2, runtime.CPU_DECODE_NICENESS)
    monkeypatch.setattr(runtime, "largest_node_cpus", lambda: 64)
    assert runtime.default_cpu_model_actors() == runtime.CPU_MODEL_ACTORS_MAX
    assert runtime.cpu_model_plan(decode_cpus=2, model_actors=4).threads == 16
    monkeypatch.setattr(runtime, "largest_node_cpus", lambda: 2)
    assert runtime.default_decode_cpus(gpus=0, model_actors=2) == 1  # one decoder per 4 CPUs, at least 1
    monkeypatch.setattr(runtime, "largest_node_cpus", lambda: 64)
    assert runtime.default_decode_cpus(gpus=0, model_actors=4) == 16


def test_worker_allocator_settings_reach_a_worker(ray_cluster, monkeypatch) -> None:
    """The decode / model actors' runtime_env adds the malloc tunables to the driver's own
    ``GLIBC_TUNABLES`` (an own setting of the same tunable wins), reaches a Ray worker, and
    ``MUSICFM_WORKER_MALLOC=default`` turns it off."""
    import ray

    from pipeline.flow import runtime

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1024:glibc.malloc.arena_max=2")
    env = runtime.worker_runtime_env()["env_vars"]["GLIBC_TUNABLES"].split(":")
    assert env[:2] == ["glibc.malloc.trim_threshold=1024", "glibc.malloc.arena_max=2"]
    assert set(env[2:]) == {"glibc.malloc.hugetlb=1", "glibc.malloc.mmap_threshold=4294967296"}
    monkeypatch.delenv("GLIBC_TUNABLES")

    @ray.remote(num_cpus=0)
    def tunables() -> str | None:
        import os

        return os.environ.get("GLIBC_TUNABLES")

    got = ray.get(tunables.options(runtime_env=runtime.worker_runtime_env()).remote())
    assert got == ":".join(runtime.WORKER_MALLOC_TUNABLES)
    monkeypatch.setenv("MUSICFM_WORKER_MALLOC", "default")
    assert runtime.worker_runtime_env() == {}
