"""The README's "Two commands" section, run as written: CI (.ci/run) runs its two commands once
each; the install step brings the Debian packages the tests drive (or says in one line what to
run); and the demo command with its two follow-up search commands works end to end in a fresh
directory, with their real output checked."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _section() -> str:
    start = README.index("## Two commands")
    return README[start : README.index("\n## ", start + 1)]


def _blocks() -> list[list[str]]:
    """The sh code blocks of the section, as commands (comments dropped, continuations joined)."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", _section(), re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        out.append([line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")])
    return out


def _argv(cmd: str) -> list[str]:
    """A README command as this test runs it: this interpreter for .venv/bin/python, jobs/ from the repo."""
    argv = shlex.split(cmd)
    assert argv[0] == ".venv/bin/python", cmd
    return [sys.executable, str(REPO / argv[1]), *argv[2:]]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    env.update(RAY_raylet_start_wait_time_s="300")
    env.pop("RAY_ADDRESS", None)
    return env


def test_ci_runs_the_two_readme_commands_once_each() -> None:
    (demo, tests), _ = _blocks()
    assert demo == "bash scripts/install.sh && .venv/bin/python jobs/embed_catalog.py --demo"
    assert tests == "bash scripts/install.sh && bash scripts/test.sh"
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert ci.count(demo) == 1 and ci.count(tests) == 1
    assert sum("scripts/install.sh" in line for line in ci if not line.startswith("#")) == 2  # in them only


def _system_packages(tmp_path: Path, **paths: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MUSICFM_APT": "never", **paths}
    return subprocess.run(["bash", "scripts/system_packages.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_install_names_the_missing_debian_packages_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "chromium").write_text("#!/bin/sh\n")
    (tmp_path / "chromium").chmod(0o755)
    (tmp_path / "fluidsynth").write_text("#!/bin/sh\n")
    (tmp_path / "fluidsynth").chmod(0o755)
    (tmp_path / "gm.sf2").write_bytes(b"RIFF")
    present = dict(MUSICFM_CHROMIUM=str(tmp_path / "chromium"), MUSICFM_FLUIDSYNTH=str(tmp_path / "fluidsynth"),
                   MUSICFM_SOUNDFONT=str(tmp_path / "gm.sf2"))  # fmt: skip
    r = _system_packages(tmp_path, **present)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == ""
    r = _system_packages(tmp_path, **{**present, "MUSICFM_CHROMIUM": str(tmp_path / "none")})
    assert r.returncode == 0 and r.stderr.count("\n") == 1
    assert r.stderr.strip().endswith("run: sudo apt-get install -y chromium"), r.stderr
    missing = {k: str(tmp_path / "none") for k in present}
    r = _system_packages(tmp_path, **missing)
    assert r.stderr.strip().endswith("sudo apt-get install -y chromium fluidsynth fluid-soundfont-gm"), (
        r.stderr
    )
    assert "scripts/system_packages.sh" in (REPO / "scripts" / "install.sh").read_text()


def test_the_demo_and_its_two_search_commands_work_in_a_fresh_directory(tmp_path: Path) -> None:
    (demo_line, _), follow_ups = _blocks()
    demo = _argv(demo_line.split("&&", 1)[1].strip())
    r = subprocess.run(demo, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RANDOM-WEIGHT model" in r.stdout
    summary = json.loads(r.stdout.strip().splitlines()[-1].removeprefix("demo: "))
    assert summary["tracks_ok"] == 7 and summary["tracks_failed"] == 1  # the broken file, on purpose
    assert summary["top_hit"] == "kick_loop"  # its re-encoded copy finds it
    assert Path(summary["store"]) == tmp_path / "demo_store"

    by_track, by_audio = follow_ups
    r = subprocess.run(_argv(by_track), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if re.match(r"\s*[123]\s", line)]
    assert len(rows) == 3 and not any("a_minor_pad " in row for row in rows), r.stdout  # itself left out

    r = subprocess.run(_argv(by_audio), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["hits"][0]["track_id"] == "kick_loop" and res["hits"][0]["score"] > 0.99, res["hits"][:2]
