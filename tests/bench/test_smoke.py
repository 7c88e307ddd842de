"""Every benchmark runs in CI at a toy size, so none rots: each is started as a script from a
directory outside the repository (no ``PYTHONPATH``, no repository cwd), with the arguments below,
and must exit 0 and print something. No figure is checked here: the goals are the benchmarks' own
report. ``bench/model_forward.py`` and ``bench/pipeline_bench.py`` have their own smoke tests
beside this one, which also check the figures of their JSON."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import GOLDEN, REPO, SHARED

BENCH = REPO / "bench"
CONFIG = str(GOLDEN / "config.json")

#: Benchmark -> arguments of its smoke run (a few seconds of work each, on 2 cores).
SMOKE: dict[str, list[str]] = {
    "decode_formats.py": ["--quick", "--rates", "44100", "--formats", "wav16,flac"],
    "flops.py": ["--seconds", "2", "--config", CONFIG],
    # no GPU in CI: the same code paths on the CPU at toy sizes (small model, batch 2, 2 s)
    "gpu.py": ["--cpu-smoke", "--no-pipeline", "--precisions", "fp32"],
    "intelligence.py": ["--quick", "--parts", "duplicates,probe", "--dup-tracks", "500", "--probe-rows", "500"],
    "job_vs_loop.py": ["--hours", "0.01", "--max-tracks", "1"],
    "refresh.py": ["--n", "6", "--seconds", "1", "2", "--window-s", "1", "--no-warmup"],
    "resume.py": ["--tracks", "8", "--seconds", "1", "--chunk-size", "4", "--decode-cpus", "1"],
    "scale.py": ["--sizes", "200", "--files-max", "200", "--planners", "driver"],
    "search.py": ["--n", "2000", "--dim", "32", "--queries", "20", "--flat-queries", "5", "--index-types", "IVF_PQ", "--no-faiss"],
    "serve_load.py": ["--smoke"],
    "soak.py": ["--duration-s", "1", "--tracks", "4", "--drift", "1"],
    "long_file.py": ["--hours", "0.005"],
}  # fmt: skip
#: Benchmarks smoke-tested by their own test file (it checks their JSON too).
OWN_TEST = {
    "model_forward.py": "tests/bench/test_model_forward_smoke.py",
    "pipeline_bench.py": "tests/bench/test_pipeline_bench_smoke.py",
    "evaluate.py": "tests/evaluate/test_bench_smoke.py",
    "finetune.py": "tests/evaluate/test_bench_finetune_smoke.py",
}
#: Modules of bench/ that are not benchmarks.
HELPERS = {"procstat.py"}
#: The GPU benchmark's one command (it checks for CUDA, counts FLOPs, then runs bench/gpu.py).
GPU_SH = "gpu.sh"


def test_every_benchmark_has_a_smoke_run() -> None:
    scripts = {p.name for p in BENCH.glob("*.py")} - HELPERS
    assert scripts == set(SMOKE) | set(OWN_TEST), "a benchmark without a smoke run (add it to SMOKE)"
    assert len(scripts | {GPU_SH}) == 17 and (BENCH / GPU_SH).is_file()
    assert all((REPO / t).is_file() for t in OWN_TEST.values())


def test_no_benchmark_shadows_a_module() -> None:
    """A script's folder goes first on ``sys.path`` (and Ray workers may add the driver's cwd):
    no file of bench/ may be named like a package or module it or the pipeline imports."""
    import importlib.util

    repo_packages = {p.name for p in REPO.iterdir() if p.is_dir()} | {p.stem for p in REPO.glob("*.py")}
    clash = []
    for p in BENCH.glob("*.py"):
        other = importlib.util.find_spec(p.stem) if p.stem not in repo_packages else None
        if p.stem in repo_packages or p.stem in sys.stdlib_module_names or other is not None:
            clash.append(p.name)
    assert clash == []


def run_bench(script: str, args: list[str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """``python bench/<script> args`` (``bash bench/gpu.sh args``) from ``cwd``, with a clean
    environment for Ray."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", MUSICFM_SHARED=str(SHARED))
    env["PYTHON"] = sys.executable  # the interpreter gpu.sh runs
    cmd = ["bash" if script.endswith(".sh") else sys.executable, str(BENCH / script), *args]
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:  # say where it was
        out, err = (
            x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr)
        )
        pytest.fail(f"bench/{script} still running after {timeout_s:.0f} s\n{out[-3000:]}\n{err[-4000:]}")


@pytest.mark.timeout(660)
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_smoke_run_from_another_directory(script: str, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    proc = run_bench(script, SMOKE[script], tmp_path, timeout_s=600)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, (
        f"rc={proc.returncode} after {wall:.0f} s\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    )
    assert proc.stdout.strip(), "the benchmark printed nothing"


def test_gpu_sh_from_another_directory(tmp_path: Path) -> None:
    """Without CUDA, gpu.sh stops at once with one line that says so (exit 2); with CUDA, it runs
    the model-only rows at toy sizes (the CPU path of bench/gpu.py is smoke-tested above)."""
    import torch

    args = ["--no-pipeline", "--no-compile", "--precisions", "bf16", "--batches", "8", "--seconds", "2", "--repeats", "1"]  # fmt: skip
    proc = run_bench(GPU_SH, args, tmp_path, timeout_s=300)
    if torch.cuda.is_available():
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
        assert "GFLOP per audio second" in proc.stdout
    else:
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("gpu.sh: error: no CUDA device") and proc.stderr.count("\n") == 1
