"""``--precision bf16`` on a CPU without bf16 units (no AVX512-BF16 / AMX-BF16) is refused with one
line, never run on reference kernels for minutes per track. The CPU is simulated with
``MUSICFM_CPU_FLAGS`` (:data:`pipeline.engine.device.CPU_FLAGS_ENV`), which replaces the flags of
``/proc/cpuinfo`` in the job's process and in the Ray workers it starts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.engine.device import CPU_BF16_REFUSAL, CPU_FLAGS_ENV
from tests.conftest import REPO
from tools.testkit.stores import write_catalog, write_tone

NO_BF16 = "fpu sse sse2 avx avx2 fma"  # e.g. an AMD EPYC (Zen 2/3) or a pre-2020 Intel laptop


def _env(flags: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_raylet_start_wait_time_s": "300",
        CPU_FLAGS_ENV: flags,
    }
    env.pop("RAY_ADDRESS", None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the model runs on this CPU
    return env


def _catalog(tmp_path: Path) -> str:
    rows = [(f"b{i}", write_tone(tmp_path / f"b{i}.wav", 2.0, 220.0 + 30 * i), f"T{i}") for i in range(2)]
    return write_catalog(tmp_path / "catalog.csv", rows)


def test_the_jobs_refuse_bf16_at_once_in_one_line(tmp_path: Path) -> None:
    catalog = _catalog(tmp_path)
    for job, out in (("embed_catalog.py", "--output"), ("refresh_catalog.py", "--store")):
        cmd = [
            sys.executable,
            f"jobs/{job}",
            "--catalog",
            catalog,
            out,
            str(tmp_path / "s"),
            "--precision",
            "bf16",
        ]
        r = subprocess.run(cmd, cwd=REPO, env=_env(NO_BF16), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (job, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].endswith(CPU_BF16_REFUSAL), (job, r.stderr)
        assert not (tmp_path / "s").exists()  # nothing written, nothing started


@pytest.mark.slow  # 3-4 min on the loaded 2-core machine (a Ray start, then the pool's failed actor starts)
def test_a_cpu_model_actor_without_bf16_units_fails_the_run_with_the_reason(tmp_path: Path) -> None:
    # as on a cluster (the CLI's early check is for local runs): the model actor checks its own CPU
    code = textwrap.dedent(
        """
        import sys
        from pipeline.errors import RunFailed
        from pipeline.runs.embed import run_embed
        from tools.testkit.stores import embed_job

        try:
            run_embed(embed_job(sys.argv[1], sys.argv[2], precision="bf16"), progress=False)
        except RunFailed as e:
            print("FAILED " + str(e).splitlines()[0])
        """
    )
    store = tmp_path / "store"
    r = subprocess.run(
        [sys.executable, "-c", code, _catalog(tmp_path), str(store)],
        cwd=REPO, env=_env(NO_BF16), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    failed = [x for x in r.stdout.splitlines() if x.startswith("FAILED ")]
    assert failed and "before any commit" in failed[0] and "no bf16 units" in failed[0], r.stdout[-2000:]
    tracks = store / "tracks.lance"
    assert not tracks.exists()  # nothing committed
