"""Actor pool sizes: ``N`` or ``MIN:MAX`` from the command line, bounded by the work, and the
pools of a real run never grow past their maximum."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pipeline.cli import pool_size
from pipeline.commands.runs import embed_parser
from pipeline.flow.runtime import pool_bounds
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


# --------------------------------------------------------------------------- pool shape and memory


def _configs():
    import json

    from musicfm import MusicFMConfig
    from tests.conftest import GOLDEN

    golden = {k: v for k, v in json.loads((GOLDEN / "config.json").read_text()).items() if k != "stats_keys"}
    mid = MusicFMConfig(encoder_dim=512, encoder_depth=4, conv_dim=128, num_heads=8, ffn_dim=2048)
    return MusicFMConfig(), MusicFMConfig(**golden), mid


def test_model_cost_matches_counted_flops_and_sizes() -> None:
    """The computed FLOPs are the counted ones (bench/flops.py's counter, within 10 %) and the
    weights are the parameters' bytes (within 10 %)."""
    from bench.flops import count_flops
    from musicfm import MusicFM25Hz
    from pipeline.flow.runtime import model_cost

    full, golden, mid = _configs()
    assert (
        abs(model_cost(full, 30.0).gflop_per_audio_s - 41.8) < 0.05 * 41.8
    )  # counted: docs/sizing_decode.md
    for cfg in (golden, mid):
        model = MusicFM25Hz(cfg).eval()
        counted = count_flops(model, 1.0)["gflop_per_audio_s"]
        cost = model_cost(cfg, 1.0)
        assert abs(cost.gflop_per_audio_s - counted) < 0.1 * counted, (cost, counted)
        params = sum(p.numel() for p in model.parameters()) * 4
        assert abs(cost.weight_bytes - params) < 0.1 * params, (cost.weight_bytes, params)
        assert model_cost(cfg, 1.0, "bf16").window_bytes < cost.window_bytes


_ACT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from musicfm import MusicFM25Hz, MusicFMConfig
torch.set_num_threads(1)
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
cfg = MusicFMConfig(encoder_dim=512, encoder_depth=4, conv_dim=128, num_heads=8, ffn_dim=2048)
m = MusicFM25Hz(cfg).eval()
x = torch.zeros(int(sys.argv[2]), 24000 * 5)
with torch.inference_mode():  # a first forward: lazy initialisation is not the batch's cost
    m.hidden_states(x[:1], [4])
with open("/proc/self/clear_refs", "w") as f:  # VmHWM restarts from the current RSS (Linux >= 4.0)
    f.write("5")
rss0 = status("VmRSS")
with torch.inference_mode():
    m.hidden_states(x, [4])
print(status("VmHWM") - rss0)
"""


def test_activation_memory_bounds_a_measured_forward() -> None:
    """A window in a batch takes less memory than model_cost's window_bytes (measured: the peak RSS
    over the forward of a 4 x 512 model at batch 1 and 3, 5 s windows, the workers' allocator; the
    peak is reset just before the forward, so the import's and the first call's peaks are not in it)."""
    import os
    import subprocess
    import sys

    from pipeline.flow.runtime import model_cost, worker_runtime_env
    from tests.conftest import REPO

    env = {**os.environ, **worker_runtime_env().get("env_vars", {})}
    peaks = [
        int(subprocess.run([sys.executable, "-c", _ACT, str(REPO), str(b)], env=env, capture_output=True,
                           text=True, timeout=300, check=True).stdout.split()[-1])
        for b in (1, 3)
    ]  # fmt: skip
    cost = model_cost(_configs()[2], 5.0)
    assert 0 < (peaks[1] - peaks[0]) / 2 <= cost.window_bytes, (peaks, cost)
    assert peaks[0] <= cost.window_bytes + cost.weight_bytes + cost.process_bytes


def test_pool_shape_follows_the_model_loaded(monkeypatch) -> None:
    """Threads per CPU model actor come from the model's FLOPs per audio second: the golden and a
    4 x 512 model get one single-threaded actor per core; the full-size model one actor with
    every core of a 2-core node (its decoders niced below it), 4 actors of 16 threads on 64."""
    from pipeline.flow import runtime

    full, golden, mid = _configs()
    costs = {
        name: runtime.model_cost(c, 30.0) for name, c in (("full", full), ("golden", golden), ("mid", mid))
    }
    monkeypatch.setattr(runtime, "largest_node_cpus", lambda: 2)
    assert [runtime.default_cpu_model_actors(costs[k]) for k in ("golden", "mid", "full")] == [2, 2, 1]
    plan = runtime.cpu_model_plan(decode_cpus=1, model_actors=runtime.default_cpu_model_actors(costs["full"]))
    assert (plan.threads, plan.decode_niceness) == (2, runtime.CPU_DECODE_NICENESS)
    monkeypatch.setattr(runtime, "largest_node_cpus", lambda: 64)
    assert runtime.default_cpu_model_actors(costs["full"]) == 4
    assert runtime.threads_per_model_actor(costs["full"]) == 5


def test_pools_fit_the_node_memory_or_refuse_in_one_line() -> None:
    from pipeline.flow.runtime import GPU_HOST_BYTES, ModelCost, plan_pools

    gib = 1024**3
    cost = ModelCost(gflop_per_audio_s=40, weight_bytes=gib, window_bytes=gib // 2, process_bytes=gib // 2)
    dec = gib // 2
    # roomy: the CPU rule's actors at the default batch, each declaring its footprint
    p = plan_pools(cost, model_actors=2, decoders_per_node=1, decode_memory=dec, batch_size=None, gpus=0,
                   node_memory=64 * gib)  # fmt: skip
    assert (p.model_actors, p.batch_size, p.model_memory, p.decode_memory) == (2, 8, int(5.5 * gib), dec)
    # 8 GiB: both actors fit at a smaller batch; 4 GiB: one actor, its batch what fits beside the decoder
    p = plan_pools(cost, 2, 1, dec, None, 0, 8 * gib)
    assert (p.model_actors, p.batch_size) == (2, 4) and 2 * p.model_memory + dec <= 8 * gib
    p = plan_pools(cost, 2, 1, dec, None, 0, 4 * gib)
    assert (p.model_actors, p.batch_size) == (1, 4) and p.model_memory + dec <= 4 * gib
    # --batch-size is kept; GPU actors declare their host memory only
    assert plan_pools(cost, 2, 1, dec, 4, 0, 64 * gib).batch_size == 4
    p = plan_pools(cost, 3, 1, dec, None, 1, 16 * gib)
    assert (p.model_actors, p.batch_size, p.model_memory) == (3, None, int(1.5 * gib) + GPU_HOST_BYTES)
    with pytest.raises(ValueError) as e:
        plan_pools(cost, 1, 1, dec, None, 0, 2 * gib)
    msg = str(e.value)
    assert "\n" not in msg and "one model actor needs 2.0 GiB" in msg and "at least 2.5 GiB" in msg


def _resource_recording_stage(path: str) -> type:
    """An EmbedStage that first writes the Ray resources its actor was given to ``path`` (a class
    made here, so that cloudpickle ships it with ``path`` to the worker)."""

    class ResourceRecordingEmbedStage:
        def __init__(self, **kw) -> None:
            import json

            import ray

            from pipeline.flow.stages import EmbedStage

            with open(path, "w") as f:
                json.dump(ray.get_runtime_context().get_assigned_resources(), f)
            self.inner = EmbedStage(**kw)

        def __call__(self, batch):
            return self.inner(batch)

    return ResourceRecordingEmbedStage


def _small_job(tmp_path: Path, *extra: str):
    audio = tmp_path / "a"
    audio.mkdir(exist_ok=True)
    rows = [(f"t{i}", write_tone(audio / f"t{i}.wav", 1.5, 200 + 40 * i), f"T{i}") for i in range(2)]
    cat = write_catalog(tmp_path / "c.csv", rows)
    args = embed_parser().parse_args(
        ["--catalog", cat, "--output", str(tmp_path / "s"), "--checkpoint", CKPT, "--stats", STATS,
         "--layers", "1,3", "--precision", "fp32", "--window-s", "1", *extra]
    )  # fmt: skip
    return embed_job_from_args(args)


def test_model_actors_request_their_memory_from_ray(ray_cluster, tmp_path: Path) -> None:
    import json

    from pipeline.flow.streaming import size_pools
    from pipeline.runs.model_info import probe_model

    job = _small_job(tmp_path, "--gpu-actors", "1")
    stage = _resource_recording_stage(str(tmp_path / "res.json"))
    report = run_embed(job, progress=False, model_stage=stage)
    assert report.status == "ok" and report.tracks_ok == 2
    # the report says how many cores the pass kept busy (this process's tree: the local cluster)
    assert report.busy_cores is not None and 0 < report.busy_cores < 64
    assert f"cores    {report.busy_cores:.2f} busy" in report.summary()
    got = json.loads((tmp_path / "res.json").read_text())
    gpus = int(ray_cluster.cluster_resources().get("GPU", 0))  # the session cluster declares one
    _model, _decode, pools = size_pools(job, probe_model(job, gpus), 2)
    assert got.get("memory") == pools.model_memory > 0 and pools.decode_memory > 0


def test_a_node_too_small_for_one_model_actor_is_refused_before_any_work(
    ray_cluster, tmp_path: Path, monkeypatch
) -> None:
    import pipeline.flow.streaming as streaming
    from pipeline.errors import RunFailed

    monkeypatch.setattr(streaming, "largest_node_memory", lambda: 512 * 1024**2)
    with pytest.raises(RunFailed) as e:
        run_embed(_small_job(tmp_path), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "before any commit" in msg and "one model actor needs" in msg, msg
