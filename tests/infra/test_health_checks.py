"""The head's node-loss health checks: every Ray head under infra/ and the local cluster a job
starts run with :data:`pipeline.flow.health.NODE_HEALTH_CHECKS`, the values the node-loss test
(tests/runs/test_multinode.py) runs with, so the configuration and the test cannot drift."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import yaml

from pipeline.flow.health import NODE_HEALTH_CHECKS, head_env
from tests.infra.test_infra import CLUSTER_YAML, REPO, group_containers, ray_cluster_specs


def test_the_settings_are_the_ones_that_make_node_loss_survivable() -> None:
    # ~1.5 s to declare a node dead: 3 failed checks 500 ms apart, from the moment it joins
    assert NODE_HEALTH_CHECKS == {
        "health_check_period_ms": 500,
        "health_check_failure_threshold": 3,
        "health_check_initial_delay_ms": 0,
    }
    assert head_env() == {
        "RAY_health_check_period_ms": "500",
        "RAY_health_check_failure_threshold": "3",
        "RAY_health_check_initial_delay_ms": "0",
    }


def test_every_kuberay_head_sets_them_and_no_worker_overrides_them() -> None:
    heads = 0
    for where, spec in ray_cluster_specs():
        for group, container in group_containers(spec):
            env = {e["name"]: e.get("value") for e in container.get("env") or []}
            mine = {k: v for k, v in env.items() if k.startswith("RAY_health_check")}
            if group == "head":
                heads += 1
                assert mine == head_env(), f"{where} head: {mine}"
            else:
                assert not mine, f"{where} {group}: health checks belong on the head"
    # the interactive RayCluster, the embed RayJob and the nightly refresh RayJob
    assert heads == 3


def test_the_cluster_launcher_head_starts_with_them() -> None:
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    cmd = next(c for c in cfg["head_start_ray_commands"] if "ray start --head" in c)
    before = cmd[: cmd.index("ray start --head")]
    exported = dict(re.findall(r"\b(RAY_health_check_\w+)=(\S+?);?(?=\s|$)", before))
    assert exported == head_env(), exported
    assert not any("RAY_health_check" in c for c in cfg["worker_start_ray_commands"])


def test_the_local_cluster_a_job_starts_runs_with_them() -> None:
    # a fresh process (the test session has its own Ray): ensure_ray starts a local cluster, whose
    # head was given the settings (read back from the node's startup parameters)
    code = textwrap.dedent(
        """
        import json
        import ray
        from pipeline.flow.runtime import ensure_ray

        ensure_ray()
        node = ray._private.worker._global_node  # the head this process started
        print("CONFIG " + json.dumps(node._ray_params._system_config))
        ray.shutdown()
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_raylet_start_wait_time_s": "300",
    }
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("CONFIG "))
    config = json.loads(line[len("CONFIG ") :])
    assert {k: config.get(k) for k in NODE_HEALTH_CHECKS} == NODE_HEALTH_CHECKS
